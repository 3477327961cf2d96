"""The server side of mutual TLS: a context that checks every client's
certificate chain, validity and revocation (and OpenSSL checks its
handshake signature), says why it refused a client, and may restrict access
to certain identities.  The client side of the same coin: pinning the
server's certificate or public key.

How the reasons are learnt: a verify callback (C) records the first
verification error of each connection and the client's leaf certificate;
an info callback (C) sees the fatal alert the server is about to send and
hands both to Python (``on_reject``).  CPython keeps a context's verify
callback when ``verify_mode`` changes, so the hooks survive later settings.

A refusal is a decision about the client's certificate; a handshake that
fails for any other reason (the client hung up, no TLS version or cipher in
common, plain HTTP on the TLS port) is no refusal: it is logged at DEBUG
level, and :func:`describe_failure` names it for a server's own log.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import itertools
import logging
import os
import re
import socket
import ssl
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ._api import load_card_key
from ._context import options_lock, ssl_ctx_pointer
from ._errors import ConfigError, CrlError, OpenSSLError
from ._fork import ForkSafeLock
from ._lib import consume_errors, ffi, lib, text
from ._pin import PinArg

__all__ = ["Rejection", "describe_failure", "load_crls", "pin_of", "server_context"]

log = logging.getLogger("mtls_engine.server")

# X509_V_ERR_* codes (stable across OpenSSL 1.1.1-3.x) grouped by the
# reason a server operator acts on.
_UNKNOWN_CA = {2, 18, 19, 20, 21, 24, 27, 28}
_CRL_PROBLEMS = {3, 6, 8, 11, 12, 15, 16, 33, 35, 36, 44}
_REASON_BY_VERIFY = {9: "not_yet_valid", 10: "expired", 23: "revoked", 4: "bad_certificate", 7: "bad_certificate",
                     26: "wrong_purpose", 50: "not_allowed"}  # fmt: skip
_SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE = 199
_SSL_R_BAD_SIGNATURE = 123
_ALERT_CERTIFICATE_REQUIRED = 116
_ALERT_DECRYPT_ERROR = 51
_ALERT_HANDSHAKE_FAILURE = 40
# Alerts a server sends about the client's certificate when no verification
# error explains them (a certificate OpenSSL cannot use, for instance).
_CERTIFICATE_ALERTS = {42, 43, 44, 45, 46, 48, 49}

REASONS = (
    "no_certificate",  # the client sent no certificate
    "unknown_ca",  # its chain does not lead to a trusted client CA
    "expired",  # a certificate in the chain has expired
    "not_yet_valid",  # a certificate in the chain is not valid yet
    "revoked",  # a certificate in the chain is on a CRL
    "crl_error",  # revocation could not be checked (no CRL, expired CRL, bad CRL signature)
    "bad_certificate",  # a certificate's own signature does not verify
    "wrong_purpose",  # not a client-authentication certificate
    "bad_signature",  # the handshake signature (CertificateVerify) does not verify: not the key's holder
    "not_allowed",  # a valid certificate the access rule refuses
    "invalid_certificate",  # any other fault of the client's certificate or chain (the detail says which)
)


@dataclass(frozen=True)
class Rejection:
    """Why a server refused a client's certificate, as much as is known:
    ``reason`` is one of :data:`REASONS`, ``alert`` the TLS alert sent.

    ``subject``/``issuer``/``serial`` describe the client's certificate
    (None when it sent none); ``failed_subject`` and ``depth`` the
    certificate that failed verification when it is not the client's own
    (an intermediate CA, ``depth`` >= 1)."""

    reason: str
    detail: str
    peer: str | None
    alert: int
    subject: str | None = None
    issuer: str | None = None
    serial: str | None = None
    depth: int | None = None
    failed_subject: str | None = None

    def __str__(self) -> str:
        who = f"client {self.peer}" if self.peer else "a client"
        what = f" ({self.subject}, serial {self.serial})" if self.subject else ""
        chain = f"; failing certificate at depth {self.depth}: {self.failed_subject}" if self.depth else ""
        return f"refused {who}{what}: {self.reason} — {self.detail}{chain}"


RejectHandler = Callable[[Rejection], None]
PeerRule = Callable[[x509.Certificate], bool]


class _Hooks:
    """What mtls_engine's C callbacks on one context ask Python: the server's
    refusal handler, the peer rule (access rule or server pins), and, for a
    client, where to present the card."""

    def __init__(self, hooks_id: int) -> None:
        self.id = hooks_id
        self.on_reject: RejectHandler | None = None
        self.rule: PeerRule | None = None
        self.present: Callable[[str], bool] | None = None

    @property
    def flags(self) -> int:
        return (1 if self.rule is not None else 0) | (2 if self.present is not None else 0)


_REGISTRY: dict[int, _Hooks] = {}
_BY_CONTEXT: weakref.WeakKeyDictionary[ssl.SSLContext, _Hooks] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = ForkSafeLock()
_IDS = itertools.count(1)


def _update(ctx: ssl.SSLContext, **changes: Any) -> None:
    """Set ``changes`` on the one _Hooks of ``ctx`` (made on first use; gone
    with ``ctx``) and install the C callbacks with what it now asks.

    One step under the locks: the C call runs without the GIL, so two
    threads setting different hooks of one context could otherwise each
    write the flags they computed, the later one without the other's (an
    access rule or pin no longer enforced); and it may set an option (see
    _context.options_lock)."""
    with _REGISTRY_LOCK, options_lock:
        ptr = ssl_ctx_pointer(ctx)
        hooks = _BY_CONTEXT.get(ctx)
        if hooks is None:
            hooks = _BY_CONTEXT[ctx] = _Hooks(next(_IDS))
            _REGISTRY[hooks.id] = hooks
            weakref.finalize(ctx, _REGISTRY.pop, hooks.id, None)
        for name, value in changes.items():
            setattr(hooks, name, value)
        if not lib.mtls_install_peer_hooks(ptr, hooks.id, hooks.flags):
            raise OpenSSLError("cannot install the peer verification callbacks", consume_errors())


def _install(ctx: ssl.SSLContext, on_reject: RejectHandler | None, rule: PeerRule | None) -> None:
    _update(ctx, on_reject=on_reject, rule=rule)


def present_matcher(present_to: Iterable[str] | Callable[[str], bool]) -> Callable[[str], bool]:
    """A predicate over server names from host names (exact, any case),
    ``*.example.org`` (any name under example.org, not itself) and IP
    addresses; or the user's own callable."""
    if callable(present_to):
        return present_to
    if isinstance(present_to, (str, bytes)):
        raise ConfigError("present_to= takes a list of host names (or a callable), not a single string")
    exact: set[str] = set()
    suffixes: list[str] = []
    for entry in present_to:
        name = str(entry).strip().lower().rstrip(".")
        if name.startswith("*.") and "*" not in name[2:] and len(name) > 2:
            suffixes.append(name[1:])
        elif name and "*" not in name and not any(c in name for c in "/@ "):
            exact.add(_normal_host(name))
        else:
            raise ConfigError(
                f"present_to= entry {entry!r} is not a host name, an IP address or '*.domain' (a leading '*.' "
                "is the only wildcard)"
            )

    def match(host: str) -> bool:
        h = _normal_host(host.lower().rstrip("."))
        return h in exact or any(h.endswith(s) for s in suffixes)

    return match


def _normal_host(name: str) -> str:
    try:
        return ipaddress.ip_address(name.strip("[]")).compressed
    except ValueError:
        return name


def present_only_to(ctx: ssl.SSLContext, present_to: Iterable[str] | Callable[[str], bool]) -> None:
    """Send ``ctx``'s client certificate only to the servers ``present_to``
    admits; other servers that ask get no certificate."""
    _update(ctx, present=present_matcher(present_to))


@ffi.def_extern(error=0)  # type: ignore[untyped-decorator]
def mtls_py_present(hooks_id: int, host: Any) -> int:
    """Whether to present the card to this server; any error: no (fail closed)."""
    hooks = _REGISTRY.get(hooks_id)
    if hooks is None or hooks.present is None:
        return 0
    try:
        name = ffi.string(host).decode("ascii", "replace")
        if hooks.present(name):
            return 1
        log.info("not presenting the card's certificate to %s (not in present_to)", name)
        return 0
    except Exception:
        log.exception("the present_to predicate raised; the card is not presented")
        return 0


@ffi.def_extern(error=0)  # type: ignore[untyped-decorator]
def mtls_py_peer_rule(hooks_id: int, der: Any, length: int) -> int:
    """The access rule / pin check, on the handshake's thread.  Any error
    refuses (fail closed)."""
    hooks = _REGISTRY.get(hooks_id)
    if hooks is None or hooks.rule is None:
        return 0
    try:
        cert = x509.load_der_x509_certificate(bytes(ffi.buffer(der, length)))
        return 1 if hooks.rule(cert) else 0
    except Exception:
        log.exception("the peer rule raised; the peer is refused")
        return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def mtls_py_rejected(hooks_id: int, alert: int, ssl_reason: int, rec: Any, peer: Any) -> None:
    hooks = _REGISTRY.get(hooks_id)
    if hooks is None:
        return
    try:
        rejection = _rejection(alert, ssl_reason, rec, text(peer) or None)
        if rejection is None:  # not about the certificate: no refusal
            _failures.last = (alert, ssl_reason)
            if log.isEnabledFor(logging.DEBUG):
                what = _failure_text(_reason_key(ssl_reason), alert, started=True)
                log.debug("handshake with %s failed: %s", text(peer) or "a client", what)
            return
        if hooks.on_reject is not None:
            hooks.on_reject(rejection)
        else:
            log.warning("%s", rejection)
    except Exception:
        log.exception("the on_reject handler raised")


def _field(buf: Any) -> str | None:
    return text(buf) if buf[0] != b"\x00" else None


def _rejection(alert: int, ssl_reason: int, rec: Any, peer: str | None) -> Rejection | None:
    """The refusal the fatal ``alert`` stands for, or None when the handshake
    failed for a reason that is not the client's certificate."""
    code = int(rec.verify_error)
    if code:
        reason = _REASON_BY_VERIFY.get(code) or (
            "unknown_ca" if code in _UNKNOWN_CA else "crl_error" if code in _CRL_PROBLEMS else "invalid_certificate"
        )
        detail = text(lib.X509_verify_cert_error_string(code))
        if code == 50:
            detail = "the access rule does not admit this certificate"
    elif alert == _ALERT_CERTIFICATE_REQUIRED or ssl_reason == _SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
        reason, detail = "no_certificate", "the client sent no certificate"
    elif alert == _ALERT_DECRYPT_ERROR or ssl_reason == _SSL_R_BAD_SIGNATURE:
        reason = "bad_signature"
        detail = "the client's handshake signature does not verify with its certificate's key"
    elif alert in _CERTIFICATE_ALERTS:
        reason = "invalid_certificate"
        detail = f"sent alert {alert_name(alert)}" + (f" ({_openssl_reason(ssl_reason)})" if ssl_reason else "")
    else:
        return None
    serial = _field(rec.leaf_serial)
    depth = int(rec.depth) if code else None
    return Rejection(
        reason=reason,
        detail=detail,
        peer=peer,
        alert=alert,
        subject=_field(rec.leaf_subject),
        issuer=_field(rec.leaf_issuer),
        serial=f"{int(serial, 16):x}" if serial else None,
        depth=depth,
        failed_subject=_field(rec.subject) if depth else None,
    )


# -- handshakes that failed for another reason -------------------------------------

# Alerts Python's table (ssl.AlertDescription) lacks (RFC 8446, RFC 7507, RFC 7301).
_MORE_ALERTS = {86: "inappropriate_fallback", 109: "missing_extension", 116: "certificate_required",
                120: "no_application_protocol"}  # fmt: skip
_failures = threading.local()  # the last failure the alert callback saw on this thread


def alert_name(alert: int) -> str:
    """A TLS alert by its RFC name (``handshake_failure`` for 40)."""
    try:
        return ssl.AlertDescription(alert).name[len("ALERT_DESCRIPTION_") :].lower()
    except ValueError:
        return _MORE_ALERTS.get(alert, f"unknown alert {alert}")


def _openssl_reason(ssl_reason: int) -> str:
    """OpenSSL's words for one of its SSL-library reason codes."""
    words = lib.ERR_reason_error_string(lib.ERR_PACK(lib.ERR_LIB_SSL, 0, ssl_reason))
    return text(words) if words != ffi.NULL else f"reason {ssl_reason}"


def _reason_key(ssl_reason: int) -> str:
    """An OpenSSL reason code as CPython's ``SSLError.reason`` names it."""
    return _openssl_reason(ssl_reason).upper().replace(" ", "_") if ssl_reason else ""


_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH",
            "UNEXPECTED_MESSAGE", "UNSUPPORTED_SSL_VERSION"}  # fmt: skip
_NO_COMMON = {
    "UNSUPPORTED_PROTOCOL": "no TLS version in common",
    "UNKNOWN_PROTOCOL": "no TLS version in common",  # an SSL 2.0-format hello
    "VERSION_TOO_LOW": "no TLS version in common",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version in common",
    "NO_SHARED_CIPHER": "no cipher suite in common",
    "NO_CIPHERS_AVAILABLE": "no cipher suite in common",
    "NO_SHARED_SIGNATURE_ALGORITHMS": "no signature algorithm in common",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no signature algorithm in common",
    "NO_SUITABLE_KEY_SHARE": "no key exchange group in common",
    "NO_SHARED_GROUPS": "no key exchange group in common",
    "INAPPROPRIATE_FALLBACK": "a downgraded retry (the client's TLS_FALLBACK_SCSV)",
}
_PEER_ALERT = re.compile(r"^(?:SSLV3|TLSV1|TLSV13)_ALERT_([A-Z_]+)$")
_ABOUT_OUR_CERTIFICATE = {"bad_certificate", "unsupported_certificate", "certificate_revoked", "certificate_expired",
                          "certificate_unknown", "unknown_ca", "bad_certificate_status_response"}  # fmt: skip


def peer_alert(reason: str) -> str | None:
    """The name of the alert the peer sent, from OpenSSL's reason as
    ``SSLError.reason`` gives it (``SSLV3_ALERT_HANDSHAKE_FAILURE``:
    ``handshake_failure``); None when the reason is no received alert."""
    m = _PEER_ALERT.match(reason)
    return m.group(1).lower() if m else None


def _failure_text(key: str, alert: int | None, *, started: bool) -> str:
    """Words for a failed handshake from OpenSSL's reason (``key``, as
    CPython names it), the alert this side sent, and whether the client got
    as far as a ClientHello."""
    sent = f" (sent alert {alert_name(alert)})" if alert else ""
    if key == "UNEXPECTED_EOF_WHILE_READING":
        return "the client hung up during the TLS handshake" if started else "closed without a TLS handshake"
    if key in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
        return "plain HTTP on this HTTPS port (the client should use https://)"
    if key in _NOT_TLS and not started:
        return "not a TLS handshake (the client's first bytes are no ClientHello)"
    if key in _NO_COMMON:
        return _NO_COMMON[key] + sent
    name = peer_alert(key)
    if name is not None:
        mistrust = " (it does not accept this server's certificate)" if name in _ABOUT_OUR_CERTIFICATE else ""
        return f"the client ended the handshake with alert {name}{mistrust}"
    what = key.lower().replace("_", " ") if key else "failed"
    return f"TLS handshake failed: {what}{sent}"


def describe_failure(exc: BaseException | None) -> str:
    """What a server-side handshake that raised ``exc`` and was no refusal
    of the client's certificate came to, in a few words (no exception
    text): a hang-up, a port check, plain HTTP, no version or cipher in
    common, the client's own alert.  Call it on the handshake's thread,
    once per failed handshake (it uses what OpenSSL's alert callback saw)."""
    seen = getattr(_failures, "last", None)
    _failures.last = None
    if seen is not None and isinstance(exc, ssl.SSLError) and exc.reason and exc.reason != _reason_key(seen[1]):
        seen = None  # left by an earlier handshake on this thread
    alert, ssl_reason = seen if seen is not None else (None, 0)
    if isinstance(exc, ssl.SSLError):
        key = str(exc.reason or "") or _reason_key(ssl_reason)
        if isinstance(exc, ssl.SSLEOFError) and not key:
            key = "UNEXPECTED_EOF_WHILE_READING"
        return _failure_text(key, alert, started=seen is not None)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no TLS handshake in time" if seen is None else "the client stalled during the TLS handshake"
    if isinstance(exc, ConnectionResetError):
        return "the client reset the connection during the TLS handshake"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "the client closed the connection during the TLS handshake"
    if isinstance(exc, OSError) and exc.errno:
        return f"TLS handshake failed: {os.strerror(exc.errno).lower()}"
    return "TLS handshake failed"


# -- CRLs ----------------------------------------------------------------------


def _trusted_cas(ctx: ssl.SSLContext) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in ctx.get_ca_certs(binary_form=True)]


def _verify_crl_signature(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def read_crls(path: str | os.PathLike[str], cas: Sequence[x509.Certificate]) -> list[x509.CertificateRevocationList]:
    """Every CRL in ``path`` (PEM, several allowed, or one DER), each checked:
    readable, issued by one of ``cas`` and signed by it, and current."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CrlError(f"cannot read the CRL file {name!r}: {exc.strerror}; pass crlfile= a PEM or DER CRL") from None
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            blocks = [b"-----BEGIN X509 CRL-----" + part.split(b"-----END X509 CRL-----")[0] + b"-----END X509 CRL-----"
                      for part in data.split(b"-----BEGIN X509 CRL-----")[1:]]  # fmt: skip
            crls = [x509.load_pem_x509_crl(b) for b in blocks]
        else:
            crls = [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise CrlError(f"{name!r} holds no readable CRL ({exc}); it must be a PEM or DER X.509 CRL") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        candidates = [ca for ca in cas if ca.subject == crl.issuer]
        if not candidates:
            known = "; ".join(ca.subject.rfc4514_string() for ca in cas) or "none"
            raise CrlError(
                f"the CRL in {name!r} is issued by {issuer}, which is not one of the trusted client CAs "
                f"({known}); add that CA's certificate to client_cafile, or use the CRL of a trusted CA"
            )
        if not any(_verify_crl_signature(crl, ca) for ca in candidates):
            raise CrlError(
                f"the CRL in {name!r} claims to be issued by {issuer} but is not signed by that CA's key; "
                "get the CRL from the CA itself"
            )
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            raise CrlError(
                f"the CRL in {name!r} from {issuer} expired on {next_update:%Y-%m-%d %H:%M} UTC (its nextUpdate); "
                "fetch a current CRL from the CA"
            )
        if crl.last_update_utc > now + datetime.timedelta(minutes=5):
            raise CrlError(
                f"the CRL in {name!r} from {issuer} is not valid yet (lastUpdate "
                f"{crl.last_update_utc:%Y-%m-%d %H:%M} UTC); check this machine's clock"
            )
    return crls


def load_crls(ctx: ssl.SSLContext, crlfile: str | os.PathLike[str], *, chain: bool | None = None) -> int:
    """Check ``ctx``'s peers against the CRLs in ``crlfile`` from now on,
    replacing the CRLs loaded before (a running server takes a new CRL this
    way without a restart; connections in progress are not dropped).
    ``chain=True`` checks every certificate of the chain (a CRL is then
    needed for every CA), ``False`` only the leaf; None keeps the current
    setting (leaf when none).  Returns the number of CRLs loaded."""
    crls = read_crls(crlfile, _trusted_cas(ctx))
    ders = [crl.public_bytes(serialization.Encoding.DER) for crl in crls]
    bufs = [ffi.new("unsigned char[]", d) for d in ders]
    arr = ffi.new("const unsigned char *[]", bufs)
    lens = ffi.new("size_t[]", [len(d) for d in ders])
    if not lib.mtls_set_crls(ssl_ctx_pointer(ctx), arr, lens, len(ders)):
        raise OpenSSLError("OpenSSL refused the CRLs", consume_errors())
    flags = ctx.verify_flags
    if chain is True or (chain is None and flags & ssl.VERIFY_CRL_CHECK_CHAIN == ssl.VERIFY_CRL_CHECK_CHAIN):
        ctx.verify_flags = flags | ssl.VERIFY_CRL_CHECK_CHAIN
    else:
        ctx.verify_flags = (flags & ~ssl.VERIFY_CRL_CHECK_CHAIN) | ssl.VERIFY_CRL_CHECK_LEAF
    return len(crls)


# -- access rules and pins -------------------------------------------------------

AllowArg = Union[PeerRule, Iterable[str], None]


def _san_values(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    out = {f"dns:{v.lower()}" for v in san.get_values_for_type(x509.DNSName)}
    out |= {f"email:{v.lower()}" for v in san.get_values_for_type(x509.RFC822Name)}
    out |= {f"uri:{v}" for v in san.get_values_for_type(x509.UniformResourceIdentifier)}
    return out


def access_rule(allow: AllowArg) -> PeerRule | None:
    """A rule from ``allow``: a callable ``(certificate) -> bool``, or a list
    of identities, each ``subject:<RFC 4514 name>``, ``serial:<hex>``,
    ``dns:<name>``, ``email:<address>`` or ``uri:<uri>``."""
    if allow is None:
        return None
    if callable(allow):
        return allow
    if isinstance(allow, (str, bytes)):
        raise ConfigError("allow= takes a list of identities (or a callable), not a single string")
    subjects, serials, sans = set(), set(), set()
    for entry in allow:
        kind, sep, value = str(entry).partition(":")
        kind = kind.lower()
        if not sep or not value:
            raise ConfigError(f"allow= entry {entry!r} is not 'kind:value' (subject:, serial:, dns:, email:, uri:)")
        if kind == "subject":
            subjects.add(x509.Name.from_rfc4514_string(value))
        elif kind == "serial":
            try:
                serials.add(int(value.replace(":", ""), 16))
            except ValueError:
                raise ConfigError(f"allow= entry {entry!r}: the serial must be hexadecimal") from None
        elif kind in ("dns", "email"):
            sans.add(f"{kind}:{value.lower()}")
        elif kind == "uri":
            sans.add(f"uri:{value}")
        else:
            raise ConfigError(
                f"allow= entry {entry!r}: unknown kind {kind!r}; use subject:, serial:, dns:, email:, uri:"
            )

    def rule(cert: x509.Certificate) -> bool:
        return cert.subject in subjects or cert.serial_number in serials or bool(_san_values(cert) & sans)

    return rule


def pin_of(cert: x509.Certificate | bytes | str | os.PathLike[str]) -> str:
    """The public-key pin of a certificate (PEM/DER bytes, a file, or a
    ``cryptography`` certificate): ``sha256/`` + base64 of the SHA-256 of its
    SubjectPublicKeyInfo, as HPKP and curl's ``--pinnedpubkey`` write it."""
    if isinstance(cert, (str, os.PathLike)):
        with open(os.fspath(cert), "rb") as f:
            cert = f.read()
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert) if b"-----BEGIN" in cert else x509.load_der_x509_certificate(cert)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def pin_rule(pins: Iterable[str]) -> PeerRule:
    """A rule admitting a peer whose public key (``sha256/<base64>``) or
    whole certificate (SHA-256 fingerprint in hex, colons allowed) is pinned."""
    keys, certs = set(), set()
    for p in pins:
        if p.startswith("sha256/"):
            try:
                raw = base64.b64decode(p[7:], validate=True)
            except binascii.Error:
                raw = b""
            if len(raw) != 32:
                raise ConfigError(f"server pin {p!r} is not sha256/ + the base64 of 32 bytes (see mtls_engine.pin_of)")
            keys.add(raw)
        else:
            hexed = p.replace(":", "").lower()
            try:
                raw = bytes.fromhex(hexed)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ConfigError(
                    f"server pin {p!r} is neither sha256/<base64 of the public key's SHA-256> nor a certificate's "
                    "SHA-256 fingerprint in hex"
                )
            certs.add(raw)
    if not keys and not certs:
        raise ConfigError("server_pins= is empty: give at least one pin, or None for no pinning")

    def rule(cert: x509.Certificate) -> bool:
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ok = (
            hashlib.sha256(spki).digest() in keys
            or hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest() in certs
        )
        if not ok:
            log.warning("the server's certificate (%s) matches none of the pinned keys or certificates",
                        cert.subject.rfc4514_string())  # fmt: skip
        return ok

    return rule


def pin_server(ctx: ssl.SSLContext, pins: Iterable[str]) -> None:
    """Make a client context accept only servers whose key or certificate is
    pinned (on top of the normal chain and host-name checks)."""
    _update(ctx, rule=pin_rule(list(pins)))


# -- the server context ------------------------------------------------------------


def server_context(
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str],
    client_cafile: str | os.PathLike[str],
    crlfile: str | os.PathLike[str] | None = None,
    module: str | os.PathLike[str] | None = None,
    pin: PinArg = None,
    backend: str = "auto",
    *,
    crl_chain: bool = False,
    on_reject: RejectHandler | None = None,
    allow: AllowArg = None,
    resumption: bool = False,
    send_ca_names: bool = True,
    force: bool = False,
) -> ssl.SSLContext:
    """A server ``SSLContext`` that requires a client certificate and checks
    it: chain to a CA in ``client_cafile``, validity period, revocation
    against ``crlfile`` (the leaf; every CA too with ``crl_chain=True``), the
    client's handshake signature, and the optional ``allow`` rule.  TLS 1.2
    or newer.

    ``key`` is a PEM key file or a ``pkcs11:`` URI (a key on an HSM or
    token, with ``module``/``pin``/``backend`` as for ``load_card_key``;
    ``cert`` None then takes the token's certificate).  ``on_reject`` gets
    a :class:`Rejection` for every client whose certificate was refused
    (default: a warning on the ``mtls_engine.server`` logger); a handshake
    that fails for another reason (hang-up, no version or cipher in common)
    is no refusal: a DEBUG line on that logger.  Session resumption is off unless
    ``resumption=True``, so every connection is checked against the CRLs
    as they are at that moment.

    The server tells each client which CAs it accepts (the subject names of
    the CAs it trusts, CAs loaded into the context later included), so that
    a client holding several certificates can pick the right one;
    ``send_ca_names=False`` names none, for a server that must not reveal
    its CA list."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=os.fspath(client_cafile))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the client CA file {os.fspath(client_cafile)!r}: {exc}; pass client_cafile= a PEM file "
            "of the CAs whose clients this server accepts"
        ) from None
    key_text = os.fspath(key)
    if key_text[:7].lower() == "pkcs11:":
        load_card_key(ctx, key_text, cert=cert, module=module, pin=pin, backend=backend, force=force, server=True)
    else:
        if cert is None:
            raise ConfigError(
                "cert= is needed with a key file (only a pkcs11: key can take its certificate from the token)"
            )
        try:
            ctx.load_cert_chain(os.fspath(cert), key_text)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the server certificate/key ({os.fspath(cert)!r}, {key_text!r}): {exc}"
            ) from None
    if not resumption:
        lib.mtls_no_resumption(ssl_ctx_pointer(ctx))
        ctx.options |= ssl.OP_NO_TICKET
    _install(ctx, on_reject, access_rule(allow))
    with options_lock:
        named = lib.mtls_set_client_ca_names(ssl_ctx_pointer(ctx), 1 if send_ca_names else 0)
    if not named:
        raise OpenSSLError("cannot set the client CA names the server sends", consume_errors())
    if crlfile is not None:
        load_crls(ctx, crlfile, chain=crl_chain)
    return ctx
