"""The public entry points: attach a card key to an ``ssl.SSLContext``."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable
from functools import cached_property

from . import _backends
from ._context import options_lock, ssl_ctx_pointer
from ._errors import (
    CertificateError,
    CertKeyMismatch,
    ConfigError,
    ObjectNotFound,
    OpenSSLError,
    UriError,
)
from ._lib import consume_errors, ffi, lib
from ._log import log
from ._p11 import KeyObject, Module, TokenInfo
from ._pin import MEMORY, PinArg, pin_getter
from ._protect import protect_if_asked
from ._reconnect import Card
from ._record import dataclass, field
from ._secret import wipe
from ._uri import ParsedUri, parse

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Union

    from cryptography import x509

    # Where a client presents the card: host names / patterns, or a predicate.
    PresentTo = Union[Iterable[str], Callable[[str], bool], None]

__all__ = ["CardKey", "client_context", "load_card_key"]

MODULE_ENV = "MTLS_ENGINE_MODULE"


# PKCS#1 v1.5 only, for RSA keys on tokens without RSA-PSS (see _restrict_to_pkcs1).
_PKCS1_SIGALGS = b"RSA+SHA256:RSA+SHA384:RSA+SHA512"
# What a server with such a key still accepts from clients (OpenSSL's usual set).
_CLIENT_AUTH_SIGALGS = (
    b"ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:ed25519:ed448:RSA-PSS+SHA256:RSA-PSS+SHA384:RSA-PSS+SHA512:"
    b"rsa_pss_pss_sha256:rsa_pss_pss_sha384:rsa_pss_pss_sha512:RSA+SHA256:RSA+SHA384:RSA+SHA512"
)


@dataclass(frozen=True)
class CardKey:
    """What ``load_card_key`` attached (no secrets)."""

    backend: str
    backend_reason: str
    module: str
    token: TokenInfo
    key_label: str
    key_id: bytes
    key_type: str
    certificate_der: bytes = field(repr=False)
    notes: tuple[str, ...] = ()

    @cached_property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate (cryptography is imported on first use)."""
        from cryptography import x509

        return x509.load_der_x509_certificate(self.certificate_der)

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


def _module_path(module: str | os.PathLike[str] | None, uri: ParsedUri) -> str:
    """The module to use: the argument, else the URI's module-path, else
    $MTLS_ENGINE_MODULE, else the p11-kit-registered module holding the
    URI's token (ModuleLoadError, TokenNotFound, AmbiguousUri)."""
    if module is not None:
        return os.fspath(module)
    if uri.module_path:
        return uri.module_path
    env = os.environ.get(MODULE_ENV)
    if env:
        return env
    from ._registry import choose  # only when nothing names a module

    found, _token = choose(uri)
    log.debug("using %s, %s", found.path, found.origin)
    return found.path


def _read_cert_file(path: str) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CertificateError(
            f"cannot read certificate file {path!r}: {exc.strerror}; pass cert= a PEM file, a "
            "pkcs11: URI, or None for the certificate stored next to the key"
        ) from None
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CertificateError(f"{path!r} holds no readable X.509 certificate ({exc})") from None
    return [c.public_bytes(Encoding.DER) for c in certs]


def _x509(der: bytes) -> Any:
    buf = ffi.new("unsigned char[]", der)
    pp = ffi.new("unsigned char **", buf)
    cert = lib.d2i_X509(ffi.NULL, ffi.cast("const unsigned char **", pp), len(der))
    if cert == ffi.NULL:
        raise CertificateError(f"OpenSSL cannot decode a certificate ({'; '.join(consume_errors())})")
    return ffi.gc(cert, lib.X509_free)


def _matches(cert: Any, pkey: Any) -> bool:
    ok = bool(lib.X509_check_private_key(cert, pkey))
    consume_errors()
    return ok


def _token_certificates(module: Module, token: TokenInfo, key: KeyObject, cert: str | None) -> tuple[list[bytes], str]:
    """Candidate leaf certificates (DER) on the token, and what was searched."""
    if cert is None:
        if not key.id:
            raise ObjectNotFound(
                f"the key {key.label!r} on {token} has no CKA_ID, so its certificate cannot be "
                "found; pass cert= a PEM file or a pkcs11: URI"
            )
        ders = module.certificates(token.slot_id, [(lib.CKA_ID, key.id)])
        what = f"a certificate with id {key.id.hex()} (the key's id) on {token}"
        return ders, what
    curi = parse(cert, what="certificate")
    if curi.object_type not in (None, "cert"):
        raise UriError(f"the certificate URI {curi.safe!r} must have type=cert (or no type)")
    ctoken = module.find_token(curi)
    ders = module.certificates(ctoken.slot_id, curi.object_template())
    return ders, f"a certificate matching {curi.describe_object()} on {ctoken}"


def certificate_candidates(
    mod: Module, token: TokenInfo, key_obj: KeyObject, cert: str | None
) -> tuple[list[bytes], list[bytes], str]:
    """(candidate leaf certificates, extra chain certificates, what was
    searched), all DER, for ``cert`` as load_card_key takes it."""
    if cert is None or cert[:7].lower() == "pkcs11:":
        candidates, searched = _token_certificates(mod, token, key_obj, cert)
        if not candidates:
            raise ObjectNotFound(
                f"no certificate found: looked for {searched}. Store the certificate on the token "
                "with the key's CKA_ID, or pass cert= a PEM file"
            )
        return candidates, [], searched
    ders = _read_cert_file(cert)
    return ders[:1], ders[1:], repr(cert)


def pick_leaf(
    candidates: list[bytes], searched: str, pkey: Any, key_obj: KeyObject, token: TokenInfo
) -> tuple[bytes, Any]:
    """The candidate certificate that belongs to ``pkey`` (DER, X509*).
    Certificate objects that are no readable X.509 certificate are passed
    over; if nothing else is left, that is the error."""
    readable = []
    for der in candidates:
        try:
            readable.append((der, _x509(der)))
        except CertificateError:
            continue
    unreadable = len(candidates) - len(readable)
    if not readable:
        raise CertificateError(
            f"looked for {searched} and found {unreadable} certificate object(s), none of them a readable "
            "X.509 certificate; write the key's certificate to the token again (pkcs11-tool --write-object "
            "CERT.der --type cert --id ID) or pass cert= a PEM file"
        )
    matching = [(der, cert) for der, cert in readable if _matches(cert, pkey)]
    if not matching:
        from cryptography import x509

        subjects = ", ".join(_subject(x509, der) for der, _ in readable)
        extra = f"; {unreadable} more could not be read" if unreadable else ""
        raise CertKeyMismatch(
            f"the certificate ({searched}: {subjects}{extra}) does not belong to the private key "
            f"{key_obj.label!r} (id {key_obj.id.hex()}) on {token}; use the certificate issued "
            "for this key"
        )
    # Several certificates for the same key (typically a renewal): take the
    # one valid longest, which is what a user renewing expects.
    der, cert = matching[0]
    for other_der, other in matching[1:]:
        if lib.ASN1_TIME_compare(lib.X509_get0_notAfter(other), lib.X509_get0_notAfter(cert)) > 0:
            der, cert = other_der, other
    return der, cert


def _subject(x509: Any, der: bytes) -> str:
    try:
        return str(x509.load_der_x509_certificate(der).subject.rfc4514_string())
    except ValueError:
        return "(a certificate cryptography cannot read)"


def load_card_key(
    ctx: ssl.SSLContext,
    key: str,
    cert: str | os.PathLike[str] | None = None,
    module: str | os.PathLike[str] | None = None,
    pin: PinArg = None,
    backend: str = "auto",
    *,
    force: bool = False,
    server: bool = False,
    present_to: PresentTo = None,
) -> CardKey:
    """Attach the token's private key ``key`` (a ``pkcs11:`` URI) and its
    certificate to ``ctx``; every handshake signature is then made by the
    token.  ``pin``: a str/bytes PIN, a callable ``(TokenInfo) -> PIN``
    (e.g. ``pin_source("env:VAR")``), or None (a pinpad reader, a token
    without login, or the URI's ``pin-source``).  mtls_engine does not log
    in to a token whose PIN is locked or on its final try; ``force=True``
    allows the final try (with a PinWarning).  ``server=True`` for a
    server's context (the card key then signs the server's handshakes).
    ``cert``: None for the certificate stored with the key's id, a
    ``pkcs11:`` URI, or a PEM/DER file (extra PEM certificates become the
    chain).  ``present_to``: host names (``*.example.org`` for any name
    under it) or a callable ``(host) -> bool``; the card's certificate is
    then sent only to those servers, and any other server that asks gets
    none (the card signs nothing for it).  ``module``: the PKCS#11 library;
    None: the URI's module-path, $MTLS_ENGINE_MODULE, else the module
    registered with p11-kit that holds the URI's token.  Logs in at most
    once; raises a subclass of ``mtls_engine.Error``.
    """
    lib.ERR_clear_error()
    try:
        ssl_ctx_pointer(ctx)  # is it an SSLContext we can use, before touching the card
        loaded = resolve_card_key(key, cert, module, pin, backend, force=force)
        return attach(ctx, loaded, server=server, present_to=present_to)
    finally:
        consume_errors()  # leave nothing for _ssl to misreport later


@dataclass(frozen=True)
class LoadedKey:
    """A card key found, logged in and loaded through its backend, ready to
    be attached to any number of contexts without touching the card again."""

    info: CardKey
    leaf: Any = field(repr=False)  # X509 *
    chain: tuple[Any, ...] = field(repr=False)  # X509 *
    pkey: Any = field(repr=False)  # EVP_PKEY *
    pkcs1_only: bool = False
    card: Card | None = field(default=None, repr=False)  # reaches the token again after it was lost


def resolve_card_key(
    key: str,
    cert: str | os.PathLike[str] | None = None,
    module: str | os.PathLike[str] | None = None,
    pin: PinArg = None,
    backend: str = "auto",
    *,
    force: bool = False,
) -> LoadedKey:
    protect_if_asked()  # before any PIN is read
    key_uri = parse(key, what="key")
    if key_uri.object_type not in (None, "private"):
        raise UriError(f"the key URI {key_uri.safe!r} must name a private key (type=private)")
    chosen, reason = _backends.choose(backend)
    cert_arg = None if cert is None else os.fspath(cert)
    get_pin = pin_getter(pin, key_uri)
    mod = Module.load(_module_path(module, key_uri))
    token = mod.find_token(key_uri)
    verified_pin = mod.login(token, get_pin, pin_memory=MEMORY, allow_final_try=force)
    try:
        key_obj = mod.find_private_key(token, key_uri)
        candidates, chain_ders, searched = certificate_candidates(mod, token, key_obj, cert_arg)
        pkey = _backends.load_private_key(chosen, mod, token, key_obj, verified_pin)
    finally:
        wipe(verified_pin)
    leaf_der, leaf = pick_leaf(candidates, searched, pkey, key_obj, token)
    notes: tuple[str, ...] = ()
    if key_obj.key_type == lib.CKK_RSA:
        if not can_sign_pss(mod, token, key_obj):
            notes = (_PKCS1_NOTE,)
        elif mod.isolated and not _test_signature(pkey, pss=True):
            notes = (_PSS_RPC_NOTE,)
    pkcs1_only = bool(notes)
    for note in notes:
        log.warning("%s (key %r on %s)", note, key_obj.label, token)
    info = CardKey(
        backend=chosen,
        backend_reason=reason,
        module=mod.path,
        token=token,
        key_label=key_obj.label,
        key_id=key_obj.id,
        key_type=_key_type_name(pkey),
        certificate_der=leaf_der,
        notes=notes,
    )
    card = Card(module=mod, key_uri=key_uri, token=token, key=key_obj, leaf=leaf, backend=chosen,
                get_pin=get_pin, force=force, pkey=pkey)  # fmt: skip
    return LoadedKey(info, leaf, tuple(_x509(der) for der in chain_ders), pkey, pkcs1_only, card)


def attach(ctx: ssl.SSLContext, loaded: LoadedKey, *, server: bool = False, present_to: PresentTo = None) -> CardKey:
    """Put a loaded card key (certificate, chain, key) on ``ctx``."""
    ssl_ctx = ssl_ctx_pointer(ctx)
    if server and present_to is not None:
        raise ConfigError("present_to= is for clients: a server presents its certificate to every client")
    if not lib.SSL_CTX_use_certificate(ssl_ctx, loaded.leaf):
        raise OpenSSLError("OpenSSL refused the certificate for this context", consume_errors())
    for chain_cert in loaded.chain:
        if not lib.SSL_CTX_add1_chain_cert(ssl_ctx, chain_cert):
            raise OpenSSLError("OpenSSL refused a chain certificate", consume_errors())
    if not lib.SSL_CTX_use_PrivateKey(ssl_ctx, loaded.pkey):
        raise OpenSSLError("OpenSSL refused the card key for this context", consume_errors())
    if not lib.SSL_CTX_check_private_key(ssl_ctx):
        raise CertKeyMismatch("OpenSSL reports that the certificate and the card key do not match")
    if loaded.card is not None:
        with options_lock:  # the card's hooks may set an option (OP_NO_RENEGOTIATION)
            loaded.card.attach(ctx, ssl_ctx)
    if loaded.pkcs1_only:
        _restrict_to_pkcs1(ctx, ssl_ctx, server)
    if present_to is not None:
        from ._server import present_only_to

        present_only_to(ctx, present_to)
    return loaded.info


def _key_type_name(pkey: Any) -> str:
    kid = lib.EVP_PKEY_get_id(pkey)
    bits = lib.EVP_PKEY_get_bits(pkey)
    if kid == lib.EVP_PKEY_RSA:
        return f"RSA-{bits}"
    if kid == lib.EVP_PKEY_EC:
        return f"EC-{bits}"
    return f"type {kid} ({bits} bits)"


def can_sign_pss(mod: Module, token: TokenInfo, key: KeyObject) -> bool:
    """Whether the token has RSA-PSS and the key's CKA_ALLOWED_MECHANISMS
    (when it sets any) allow it."""
    pss = lib.CKM_RSA_PKCS_PSS
    allowed = mod.allowed_mechanisms(token.slot_id, key.handle)
    return (allowed is None or pss in allowed) and pss in mod.mechanisms(token.slot_id)


_PKCS1_NOTE = "the token cannot sign RSA-PSS: using PKCS#1 v1.5 signatures and TLS 1.2 at most"
# Measured with p11-kit 0.24 and pkcs11-provider 1.0: the token lists
# CKM_RSA_PKCS_PSS, but p11-kit's RPC carries only the mechanisms it knows
# how to encode, and the provider's hash-and-sign PSS mechanisms are not
# among them (CKR_MECHANISM_INVALID); libp11's raw PSS crosses.
_PSS_RPC_NOTE = (
    "RSA-PSS signatures do not reach the token through this module (a test signature failed; p11-kit-client "
    "carries only some mechanisms): using PKCS#1 v1.5 signatures and TLS 1.2 at most"
)


def _test_signature(pkey: Any, *, pss: bool) -> bool:
    """One SHA-256 signature through the backend (RSA: PSS or PKCS#1 v1.5)."""
    tbs = b"mtls_engine: which RSA padding reaches the token?"
    sig = ffi.new("unsigned char[]", 1024)
    siglen = ffi.new("size_t *", 1024)
    lib.ERR_clear_error()
    ok = bool(lib.mtls_test_sign(pkey, b"SHA256", int(pss), tbs, len(tbs), sig, siglen))
    consume_errors()
    return ok


def _restrict_to_pkcs1(ctx: ssl.SSLContext, ssl_ctx: Any, server: bool) -> None:
    """Many cards cannot do RSA-PSS.  TLS 1.3 requires PSS for RSA, and TLS
    1.2 picks PSS when both sides offer it, so such a key fails every
    handshake with an opaque error.  When the token (or the key's
    CKA_ALLOWED_MECHANISMS) lacks RSA-PSS, sign with PKCS#1 v1.5 only and cap
    this context at TLS 1.2 (CardKey.notes and a log line say so)."""
    # A client signs its CertificateVerify with the "client sigalgs"; a
    # server signs with the general list, which OpenSSL also sends in its
    # CertificateRequest unless a client list is set.  So a server restricts
    # its own list and keeps offering clients every algorithm.
    if server:
        ok = lib.SSL_CTX_set1_sigalgs_list(ssl_ctx, _PKCS1_SIGALGS) and lib.SSL_CTX_set1_client_sigalgs_list(
            ssl_ctx, _CLIENT_AUTH_SIGALGS
        )
    else:
        ok = lib.SSL_CTX_set1_client_sigalgs_list(ssl_ctx, _PKCS1_SIGALGS)
    if not ok:
        raise OpenSSLError("cannot restrict signature algorithms to PKCS#1 v1.5", consume_errors())
    if ctx.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED or ctx.maximum_version > ssl.TLSVersion.TLSv1_2:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2


def client_context(
    key: str,
    cert: str | os.PathLike[str] | None = None,
    cafile: str | os.PathLike[str] | None = None,
    module: str | os.PathLike[str] | None = None,
    pin: PinArg = None,
    backend: str = "auto",
    *,
    capath: str | os.PathLike[str] | None = None,
    cadata: str | bytes | None = None,
    force: bool = False,
    server_pins: Iterable[str] | None = None,
    present_to: PresentTo = None,
) -> ssl.SSLContext:
    """A client ``SSLContext`` that proves itself with the card key and
    verifies the server (chain to ``cafile``/``capath``/``cadata``, or the
    system's CAs, and host name), TLS 1.2 or newer.  ``server_pins``:
    accept only a server whose public key (``sha256/<base64>``, see
    ``pin_of``) or certificate (SHA-256 fingerprint, hex) is listed — on top
    of, never instead of, the chain and host-name checks.  ``present_to``:
    see ``load_card_key``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile, capath=capath, cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if server_pins is not None:
        from ._server import pin_server

        pin_server(ctx, server_pins)
    load_card_key(ctx, key, cert=cert, module=module, pin=pin, backend=backend, force=force, present_to=present_to)
    return ctx
