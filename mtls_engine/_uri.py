"""RFC 7512 ``pkcs11:`` URIs, parsed and matched by p11-kit.

mtls_engine never shows a URI as given: messages, logs and reprs get
:func:`redact`'s form, with every query value masked and nothing shown
after a ``pin-value`` or an attribute it does not know.
"""

from __future__ import annotations

import codecs
import difflib
import re
import urllib.parse

from ._errors import PinError, UriError
from ._lib import ffi, lib
from ._record import dataclass, field
from ._secret import utf8_into, wipe

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Path and query attribute names p11-kit understands (RFC 7512 + p11-kit's).
_PATH_ATTRS = {
    "token", "manufacturer", "serial", "model", "object", "type", "id",
    "library-manufacturer", "library-description", "library-version",
    "slot-description", "slot-manufacturer", "slot-id",
}  # fmt: skip
_QUERY_ATTRS = {"pin-source", "pin-value", "module-name", "module-path"}

_KNOWN = sorted(_PATH_ATTRS | _QUERY_ATTRS)
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_QUERY_PART = re.compile(r"[^&;]+")


@dataclass(frozen=True)
class _Attr:
    """One ``name=value`` part of a URI as it may be shown: ``shown`` is the
    part for messages, ``name`` the attribute's name when it is safe to
    name (None: not shown, it may be part of a PIN)."""

    where: str  # "path" | "query"
    key: str  # lower-cased name, for checks only (never shown unless known)
    shown: str
    name: str | None


def _spans(uri: str, start: int) -> list[tuple[str, int, int]]:
    """Where each attribute of ``uri`` lies, as (path|query, begin, end):
    found by index, so that no slice of a value (a PIN) is made."""
    query = uri.find("?", start)
    path_end = len(uri) if query < 0 else query
    out = []
    i = start
    while i <= path_end:
        j = uri.find(";", i, path_end)
        j = path_end if j < 0 else j
        out.append(("path", i, j))
        i = j + 1
    if query >= 0:
        out += [("query", m.start(), m.end()) for m in _QUERY_PART.finditer(uri, query + 1)]
    return [(where, b, e) for where, b, e in out if e > b]


def _attrs(uri: str, start: int | None = None) -> list[_Attr]:
    """The attributes of ``uri`` (a ``pkcs11:`` URI from index ``start``,
    else after its scheme) in order, each with what may be shown of it.

    A PIN can hide anywhere after a ``pin-value`` (p11-kit keeps ``#``, ``?``,
    ``&`` and ``;`` in values, and a misplaced or misspelt attribute moves
    the rest of the PIN into names), so every query value is masked, and
    once a pin-value or an unknown attribute is met nothing after it is
    shown at all, names included."""
    if start is None:
        start = 7 if uri[:7].lower() == "pkcs11:" else 0
    out: list[_Attr] = []
    tainted = False
    for where, begin, end in _spans(uri, start):
        eq = uri.find("=", begin, end)
        raw_key = uri[begin : end if eq < 0 else eq]
        key = raw_key.strip().lower()
        known = _PATH_ATTRS if where == "path" else _QUERY_ATTRS
        if tainted:
            out.append(_Attr(where, key, "***", None))
            continue
        if key in known:
            shown = uri[begin:end] if where == "path" else f"{raw_key}=***" if eq >= 0 else raw_key
            out.append(_Attr(where, key, shown, raw_key.strip()))
            tainted = key == "pin-value"
            continue
        # Unknown, misplaced, or without a value: named only when it looks
        # like an attribute name and comes before anything PIN-bearing.
        name = raw_key.strip() if eq >= 0 and _NAME.fullmatch(key) else None
        out.append(_Attr(where, key, f"{name}=***" if name else "***", name))
        tainted = True
    return out


def has_pin_value_attribute(text: str) -> bool:
    """Whether ``text`` is a ``pkcs11:`` URI with a ``pin-value`` attribute
    anywhere (in its path or query, in any case, percent-encoded or not)."""
    lead = re.match(r"\s*", text)
    start = lead.end() if lead else 0
    if text[start : start + 7].lower() != "pkcs11:":
        return False
    return any(urllib.parse.unquote(a.key).strip() == "pin-value" for a in _attrs(text, start + 7))


def redact(uri: str) -> str:
    """``uri`` as it may be shown in messages and logs: every query value
    masked, and nothing after a ``pin-value`` or an unknown attribute."""
    if uri[:7].lower() != "pkcs11:":
        cut = re.search(r"[?;=&#]", uri)
        head = uri if cut is None else uri[: cut.start()]
        if not re.search(r"[/.:]", head):
            return f"<{len(uri)} characters, not shown in case they hold a PIN>"
        return head if cut is None else head + "…"
    attrs = _attrs(uri)
    path = ";".join(a.shown for a in attrs if a.where == "path")
    query = "&".join(a.shown for a in attrs if a.where == "query")
    return uri[:7] + path + ("?" + query if "?" in uri else "")


def _unknown(what: str, uri: str, attr: _Attr, index: int) -> UriError:
    """The error for an unknown or misplaced attribute, naming it only when
    that cannot show a PIN."""
    place = "query attribute" if attr.where == "query" else "attribute"
    decoded = urllib.parse.unquote(attr.key)
    if attr.name is not None:
        told = f"an unknown {place} {attr.name!r}"
    else:
        told = f"an unknown {place} (attribute {index} of the URI; not shown in case it is part of a PIN)"
    hint = ""
    if attr.where == "path" and attr.key in _QUERY_ATTRS:
        hint = f"; {attr.key} is a query attribute: put it after '?'"
    elif attr.where == "query" and attr.key in _PATH_ATTRS:
        hint = f"; {attr.key} is a path attribute: put it before '?'"
    elif decoded != attr.key and decoded in _KNOWN:
        hint = f"; write the name {decoded!r} without percent-encoding"
    else:
        close = difflib.get_close_matches(decoded, _KNOWN, n=1, cutoff=0.5)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    known = ", ".join(sorted(_QUERY_ATTRS if attr.where == "query" else _PATH_ATTRS))
    return UriError(f"the {what} URI {redact(uri)!r} has {told}{hint} (known ones: {known})")


@dataclass(frozen=True)
class ParsedUri:
    """A parsed URI; ``handle`` is the p11-kit ``P11KitUri *``."""

    text: str = field(repr=False)  # may hold a pin-value
    handle: Any = field(repr=False)
    object_type: str | None
    has_object_attrs: bool

    def __repr__(self) -> str:
        return f"ParsedUri({self.safe!r})"

    @property
    def safe(self) -> str:
        return redact(self.text)

    @property
    def pin_value(self) -> str | None:
        """The URI's PIN as text (a copy that cannot be wiped: mtls_engine
        itself uses :meth:`pin_value_bytes`)."""
        p = lib.p11_kit_uri_get_pin_value(self.handle)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8")

    @property
    def has_pin_value(self) -> bool:
        return bool(lib.p11_kit_uri_get_pin_value(self.handle) != ffi.NULL)

    def pin_value_bytes(self) -> bytearray | None:
        """A new copy of the percent-decoded ``pin-value``, for the caller to
        wipe (None: the URI has none)."""
        p = lib.p11_kit_uri_get_pin_value(self.handle)
        return None if p == ffi.NULL else bytearray(ffi.buffer(p, _c_strlen(p)))

    @property
    def pin_source(self) -> str | None:
        p = lib.p11_kit_uri_get_pin_source(self.handle)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8")

    @property
    def module_path(self) -> str | None:
        p = lib.p11_kit_uri_get_module_path(self.handle)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8")

    @property
    def module_name(self) -> str | None:
        """RFC 7512's module-name: the library's file name without folder and suffix."""
        p = lib.p11_kit_uri_get_module_name(self.handle)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8")

    def slot_id(self) -> int | None:
        sid = int(lib.p11_kit_uri_get_slot_id(self.handle))
        return None if sid == int(ffi.cast("CK_SLOT_ID", -1)) else sid

    def matches_module(self, info: Any) -> bool:
        return bool(lib.p11_kit_uri_match_module_info(self.handle, info))

    def matches_slot(self, slot_id: int, info: Any) -> bool:
        wanted = self.slot_id()
        if wanted is not None and wanted != slot_id:
            return False
        return bool(lib.p11_kit_uri_match_slot_info(self.handle, info))

    def matches_token(self, info: Any) -> bool:
        return bool(lib.p11_kit_uri_match_token_info(self.handle, info))

    def object_template(self) -> list[tuple[int, bytes]]:
        """(CKA_ID / CKA_LABEL / CKA_CLASS, value) pairs the URI fixes."""
        n = ffi.new("CK_ULONG *")
        attrs = lib.p11_kit_uri_get_attributes(self.handle, n)
        out = []
        for i in range(n[0]):
            a = attrs[i]
            out.append((int(a.type), bytes(ffi.buffer(a.pValue, a.ulValueLen))))
        return out

    def describe_object(self) -> str:
        parts = []
        for name in ("object", "id", "type"):
            value = self._raw_attr(name)
            if value is not None:
                parts.append(f"{name}={value}")
        return ";".join(parts) or "any object"

    def _raw_attr(self, name: str) -> str | None:
        for key, value in _split_path(self.text):
            if key == name:
                return value
        return None


def _split_path(uri: str) -> list[tuple[str, str]]:
    body = uri[len("pkcs11:") :]
    path = body.split("?", 1)[0]
    out = []
    for part in filter(None, path.split(";")):
        key, _, value = part.partition("=")
        out.append((key.strip().lower(), value))
    return out


def parse(uri: object, *, what: str = "key") -> ParsedUri:
    """Parse ``uri`` strictly; UriError says what is wrong and never echoes a
    PIN.  Unknown or repeated attributes are refused rather than ignored: a
    typo must not silently widen what the URI matches."""
    if not isinstance(uri, str):
        raise UriError(f"the {what} URI must be a str starting with 'pkcs11:', got {type(uri).__name__}")
    if "\x00" in uri:
        raise UriError(f"the {what} URI contains a NUL character; remove it")
    if not uri[:7].lower() == "pkcs11:":
        raise UriError(
            f"the {what} URI {redact(uri)!r} does not start with 'pkcs11:'; use an RFC 7512 URI "
            "such as 'pkcs11:token=card1;object=clientkey;type=private'"
        )
    query_at = uri.find("?")
    path = uri[7 : len(uri) if query_at < 0 else query_at]
    if path.startswith(";") or ";;" in path:
        # p11-kit stops reading at an empty attribute and ignores the rest,
        # the query included, without an error: the URI would match more.
        raise UriError(
            f"the {what} URI {redact(uri)!r} has an empty attribute (a leading ';' or ';;'); p11-kit would "
            "ignore every attribute after it. Remove the extra ';'"
        )
    seen: set[str] = set()
    for index, attr in enumerate(_attrs(uri), 1):
        if attr.key not in (_PATH_ATTRS if attr.where == "path" else _QUERY_ATTRS):
            raise _unknown(what, uri, attr, index)
        if attr.name is not None and attr.name != attr.key:
            raise UriError(
                f"the {what} URI {redact(uri)!r} writes {attr.name!r} in capitals; p11-kit knows attribute names "
                f"in lower case only: write {attr.key!r}"
            )
        if attr.key in seen:
            raise UriError(f"the {what} URI {redact(uri)!r} gives {attr.key!r} twice; give it once")
        seen.add(attr.key)
    types = [urllib.parse.unquote(v) for k, v in _split_path(uri) if k == "type"]
    obj_type = types[0] if types else None
    if obj_type is not None and obj_type not in ("private", "public", "cert", "secret-key", "data"):
        raise UriError(f"the {what} URI {redact(uri)!r} has an unknown type {obj_type!r}")
    try:
        raw = utf8_into(uri, nul=True)  # the URI may hold a PIN: a copy that is wiped
    except PinError:
        raise UriError(f"the {what} URI {redact(uri)!r} is not valid Unicode text") from None
    handle = ffi.gc(lib.p11_kit_uri_new(), lib.p11_kit_uri_free)
    try:
        rc = lib.p11_kit_uri_parse(ffi.from_buffer("char[]", raw), lib.P11_KIT_URI_FOR_ANY, handle)
    finally:
        wipe(raw)
    if rc != lib.P11_KIT_URI_OK:
        reason = ffi.string(lib.p11_kit_uri_message(rc)).decode()
        raise UriError(f"the {what} URI {redact(uri)!r} is malformed: {reason}")
    if lib.p11_kit_uri_any_unrecognized(handle):
        raise UriError(f"the {what} URI {redact(uri)!r} has a value p11-kit does not recognise")
    # Query values are read back as text (a PIN, a path): they must be UTF-8,
    # and hold no NUL, where p11-kit's C string would end: a PIN cut short
    # there would be sent, and cost a try.
    for where, begin, end in _spans(uri, 7):
        eq = uri.find("=", begin, end)
        key = uri[begin:eq].strip().lower() if eq >= 0 else ""
        if where == "query" and key in _QUERY_ATTRS and uri.find("%00", eq, end) >= 0:
            raise UriError(f"the {what} URI {redact(uri)!r} has a {key} with a NUL (%00) in it; remove it")
    for name, get in (("pin-value", lib.p11_kit_uri_get_pin_value), ("pin-source", lib.p11_kit_uri_get_pin_source),
                      ("module-path", lib.p11_kit_uri_get_module_path)):  # fmt: skip
        p = get(handle)
        if p != ffi.NULL:
            try:
                _check_utf8(p)
            except UnicodeDecodeError:
                raise UriError(
                    f"the {what} URI {redact(uri)!r} has a {name} that is not UTF-8 text once percent-decoded"
                ) from None
    has_obj = any(k in ("object", "id") for k, _ in _split_path(uri))
    return ParsedUri(uri, handle, obj_type, has_obj)


def _c_strlen(p: Any) -> int:
    n = 0
    while p[n] != b"\x00":
        n += 1
    return n


def _check_utf8(p: Any) -> None:
    """Raise UnicodeDecodeError unless the C string ``p`` is UTF-8, one byte
    at a time: no whole copy of a PIN is made to check it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for i in range(_c_strlen(p)):
        decoder.decode(p[i])
    decoder.decode(b"", final=True)


def format_uri(attrs: list[tuple[str, bytes]]) -> str:
    """A ``pkcs11:`` URI from (name, raw value) pairs, every byte outside
    RFC 3986's unreserved set percent-encoded."""
    parts = []
    for name, value in attrs:
        parts.append(f"{name}={urllib.parse.quote_from_bytes(value, safe='')}")
    return "pkcs11:" + ";".join(parts)
