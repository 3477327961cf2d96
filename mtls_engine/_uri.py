"""RFC 7512 ``pkcs11:`` URIs, parsed and matched by p11-kit.

mtls_engine never logs a URI as given: ``pin-value`` is masked first.
"""

from __future__ import annotations

import re
import urllib.parse

from ._errors import UriError
from ._lib import ffi, lib
from ._record import dataclass

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

_PIN_VALUE = re.compile(r"(pin-value=)[^&;?#]*", re.IGNORECASE)


def redact(uri: str) -> str:
    """The URI with any ``pin-value`` replaced, safe for messages and logs."""
    return _PIN_VALUE.sub(r"\1***", uri)


@dataclass(frozen=True)
class ParsedUri:
    """A parsed URI; ``handle`` is the p11-kit ``P11KitUri *``."""

    text: str
    handle: Any
    object_type: str | None
    has_object_attrs: bool

    @property
    def safe(self) -> str:
        return redact(self.text)

    @property
    def pin_value(self) -> str | None:
        p = lib.p11_kit_uri_get_pin_value(self.handle)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8")

    @property
    def pin_source(self) -> str | None:
        p = lib.p11_kit_uri_get_pin_source(self.handle)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8")

    @property
    def module_path(self) -> str | None:
        p = lib.p11_kit_uri_get_module_path(self.handle)
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


def _split_query(uri: str) -> list[tuple[str, str]]:
    if "?" not in uri:
        return []
    query = uri.split("?", 1)[1]
    out = []
    for part in filter(None, re.split(r"[&;]", query)):
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
    seen: set[str] = set()
    for key, _ in _split_path(uri):
        if key not in _PATH_ATTRS:
            raise UriError(
                f"the {what} URI {redact(uri)!r} has an unknown attribute {key!r}; known ones are "
                + ", ".join(sorted(_PATH_ATTRS))
            )
        if key in seen:
            raise UriError(f"the {what} URI {redact(uri)!r} gives {key!r} twice; give it once")
        seen.add(key)
    for key, _ in _split_query(uri):
        if key not in _QUERY_ATTRS:
            raise UriError(
                f"the {what} URI {redact(uri)!r} has an unknown query attribute {key!r}; known "
                "ones are " + ", ".join(sorted(_QUERY_ATTRS))
            )
        if key in seen:
            raise UriError(f"the {what} URI {redact(uri)!r} gives {key!r} twice; give it once")
        seen.add(key)
    types = [urllib.parse.unquote(v) for k, v in _split_path(uri) if k == "type"]
    obj_type = types[0] if types else None
    if obj_type is not None and obj_type not in ("private", "public", "cert", "secret-key", "data"):
        raise UriError(f"the {what} URI {redact(uri)!r} has an unknown type {obj_type!r}")
    try:
        raw = uri.encode("utf-8")
    except UnicodeEncodeError:
        raise UriError(f"the {what} URI {redact(uri)!r} is not valid Unicode text") from None
    handle = ffi.gc(lib.p11_kit_uri_new(), lib.p11_kit_uri_free)
    rc = lib.p11_kit_uri_parse(raw, lib.P11_KIT_URI_FOR_ANY, handle)
    if rc != lib.P11_KIT_URI_OK:
        reason = ffi.string(lib.p11_kit_uri_message(rc)).decode()
        raise UriError(f"the {what} URI {redact(uri)!r} is malformed: {reason}")
    if lib.p11_kit_uri_any_unrecognized(handle):
        raise UriError(f"the {what} URI {redact(uri)!r} has a value p11-kit does not recognise")
    # Query values are read back as text (a PIN, a path): they must be UTF-8.
    for name, get in (("pin-value", lib.p11_kit_uri_get_pin_value), ("pin-source", lib.p11_kit_uri_get_pin_source),
                      ("module-path", lib.p11_kit_uri_get_module_path)):  # fmt: skip
        p = get(handle)
        if p != ffi.NULL:
            try:
                ffi.string(p).decode("utf-8")
            except UnicodeDecodeError:
                raise UriError(
                    f"the {what} URI {redact(uri)!r} has a {name} that is not UTF-8 text once percent-decoded"
                ) from None
    has_obj = any(k in ("object", "id") for k, _ in _split_path(uri))
    return ParsedUri(uri, handle, obj_type, has_obj)


def format_uri(attrs: list[tuple[str, bytes]]) -> str:
    """A ``pkcs11:`` URI from (name, raw value) pairs, every byte outside
    RFC 3986's unreserved set percent-encoded."""
    parts = []
    for name, value in attrs:
        parts.append(f"{name}={urllib.parse.quote_from_bytes(value, safe='')}")
    return "pkcs11:" + ";".join(parts)
