"""Who a client is, from whatever an application server hands the app:
the TLS connection (``ssl.SSLObject``/``ssl.SSLSocket``), the certificate
in DER or PEM, or a chain (the ASGI TLS extension's ``client_cert_chain``);
and the start-up check that a server's context really requires one."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any, Union

from cryptography import x509

from ._errors import CertificateError, ClientAuthNotRequired, NoClientCertificate

__all__ = ["PeerArg", "client_identity", "require_client_auth", "san_entries"]

PeerArg = Union[ssl.SSLObject, ssl.SSLSocket, x509.Certificate, bytes, str, Sequence[Union[bytes, str]], None]


def serial_hex(serial: int) -> str:
    """A serial number as lowercase hex without leading zeros, as the
    refusal log lines (:class:`Rejection`) print it."""
    return format(serial, "x")


def san_entries(cert: x509.Certificate) -> list[str]:
    """The certificate's subject alternative names as ``dns:``, ``email:``,
    ``uri:`` and ``ip:`` entries (the first three as ``allow=`` takes them)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = [f"dns:{v}" for v in san.get_values_for_type(x509.DNSName)]
    out += [f"email:{v}" for v in san.get_values_for_type(x509.RFC822Name)]
    out += [f"uri:{v}" for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [f"ip:{v}" for v in san.get_values_for_type(x509.IPAddress)]
    return out


def _certificate(peer: PeerArg) -> x509.Certificate:
    if isinstance(peer, x509.Certificate):
        return peer
    if isinstance(peer, (ssl.SSLObject, ssl.SSLSocket)):
        try:
            der = peer.getpeercert(binary_form=True)
        except ValueError:  # the handshake is not done
            der = None
        if not der:
            raise NoClientCertificate(
                "this TLS connection has no client certificate: the server's context does not require one "
                "(use mtls_engine.server_context, or check it with mtls_engine.require_client_auth)"
            )
        return x509.load_der_x509_certificate(der)
    if isinstance(peer, (list, tuple)):  # a chain, the client's own certificate first
        if not peer:
            raise NoClientCertificate("the client certificate chain is empty: the client sent no certificate")
        return _certificate(peer[0])
    if isinstance(peer, str):
        peer = peer.encode("ascii", "replace")
    if isinstance(peer, (bytes, bytearray, memoryview)):
        data = bytes(peer)
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise CertificateError(
                f"the client certificate given to client_identity() cannot be read ({exc}); pass the DER or PEM "
                "of a certificate, or the TLS connection itself"
            ) from None
    if peer is None:
        raise NoClientCertificate(
            "no client certificate (None): the server's context does not require one, or the server gave the app "
            "no certificate (see the list of what each server gives the app in the documentation)"
        )
    raise TypeError(
        "client_identity() takes an ssl.SSLObject or SSLSocket, a certificate (DER bytes, PEM text, a "
        f"cryptography Certificate) or a chain of them, not {type(peer).__name__}"
    )


def client_identity(peer: PeerArg, *, san: bool = True) -> dict[str, Any]:
    """The identity of a client certificate as ``serve`` reports it:
    ``subject`` and ``issuer`` (RFC 4514), ``serial`` (hex), ``not_after``
    (ISO 8601, UTC), and ``san`` (a list, see :func:`san_entries`) unless
    ``san=False``.  Raises NoClientCertificate when there is none,
    CertificateError when it cannot be read."""
    cert = _certificate(peer)
    doc: dict[str, Any] = {
        "subject": cert.subject.rfc4514_string(),
        "serial": serial_hex(cert.serial_number),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    if san:
        doc["san"] = san_entries(cert)
    return doc


def require_client_auth(ctx: ssl.SSLContext | None, where: str = "the server's SSLContext") -> ssl.SSLContext:
    """Return ``ctx`` if it is a server context that requires a client
    certificate from trusted CAs; raise ClientAuthNotRequired (saying what
    is wrong) if a client could connect without one."""
    if not isinstance(ctx, ssl.SSLContext):
        raise ClientAuthNotRequired(
            f"{where} is {type(ctx).__name__}, not an ssl.SSLContext: no client certificate would be checked; "
            "hand the server the context mtls_engine.server_context() returns"
        )
    if ctx.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ClientAuthNotRequired(
            f"{where} is a client context (PROTOCOL_TLS_CLIENT); hand the server the context "
            "mtls_engine.server_context() returns"
        )
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        raise ClientAuthNotRequired(
            f"{where} does not require a client certificate (verify_mode is {ctx.verify_mode.name}): clients "
            "without one would be served; hand the server the context mtls_engine.server_context() returns "
            "and no certificate or CA files of its own (its own TLS settings build another context), or set "
            "verify_mode = ssl.CERT_REQUIRED"
        )
    if not ctx.get_ca_certs() and ctx.cert_store_stats().get("x509_ca", 0) == 0:
        raise ClientAuthNotRequired(
            f"{where} requires a client certificate but trusts no CA (no client CA loaded): every client "
            "would be refused; pass client_cafile= to mtls_engine.server_context"
        )
    return ctx
