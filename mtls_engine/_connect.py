"""`python -m mtls_engine connect`: an HTTPS GET with the card key, like
``curl --cert``, that can show every TLS handshake message as it passes.

The trace uses CPython's private ``SSLContext._msg_callback`` (3.8 to 3.13).
What OpenSSL reports through it, measured with 3.0.22 (Debian 12) and 3.5.9
(Debian 13):

- every record's 5-byte header (pseudo content type 256) and, for TLS 1.3
  encrypted records, the inner content type (257): not messages, not shown;
- each handshake message once, in both directions, after its header;
- a *sent* ChangeCipherSpec twice (its record header and a CCS callback);
  a *received* one as a record header only on 3.0, as a record header and
  a CCS callback on 3.5 (TLS 1.2 and the TLS 1.3 compatibility CCS
  alike): so ChangeCipherSpec is taken from record headers only, once per
  record, both ways, on either version;
- each alert once (level, description), sent or received, also when it is
  encrypted (TLS 1.3);
- OpenSSL 3.5 (certificate compression, RFC 8879, came with 3.2) offers
  compression in its ClientHello and, as a server, in its TLS 1.3
  CertificateRequest; its TLS 1.3 client then sends its certificate as a
  CompressedCertificate message (type 25, zlib with Debian's build) in
  place of Certificate (11), and the msg_callback sees only that message.
  A 3.5 server sent its own certificate uncompressed to a 3.5 client.  The
  trace names the message and says how it was compressed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import ssl
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from ._api import CardKey, load_card_key
from ._cliutil import add_card_arguments, cli_pin
from ._uri import redact

# The private attribute the trace needs (a module constant so tests can
# simulate an interpreter without it).
_TRACE_ATTR = "_msg_callback"

_CT_CHANGE_CIPHER_SPEC, _CT_ALERT, _CT_HANDSHAKE, _CT_HEADER = 20, 21, 22, 256

# RFC 8446 / RFC 5246 handshake message types.
_HANDSHAKE_NAMES = {
    0: "HelloRequest", 1: "ClientHello", 2: "ServerHello", 3: "HelloVerifyRequest", 4: "NewSessionTicket",
    5: "EndOfEarlyData", 8: "EncryptedExtensions", 11: "Certificate", 12: "ServerKeyExchange",
    13: "CertificateRequest", 14: "ServerHelloDone", 15: "CertificateVerify", 16: "ClientKeyExchange",
    20: "Finished", 21: "CertificateURL", 22: "CertificateStatus", 23: "SupplementalData", 24: "KeyUpdate",
    25: "CompressedCertificate", 67: "NextProto", 254: "MessageHash",
}  # fmt: skip
_MT_CERTIFICATE_VERIFY, _MT_COMPRESSED_CERTIFICATE = 15, 25

# RFC 8879 section 3 certificate compression algorithms.
_COMPRESSION_NAMES = {1: "zlib", 2: "brotli", 3: "zstd"}

# RFC 8446 section 6 alert descriptions.
_ALERT_NAMES = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 21: "decryption_failed",
    22: "record_overflow", 30: "decompression_failure", 40: "handshake_failure", 41: "no_certificate",
    42: "bad_certificate", 43: "unsupported_certificate", 44: "certificate_revoked", 45: "certificate_expired",
    46: "certificate_unknown", 47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied",
    50: "decode_error", 51: "decrypt_error", 60: "export_restriction", 70: "protocol_version",
    71: "insufficient_security", 80: "internal_error", 86: "inappropriate_fallback", 90: "user_canceled",
    100: "no_renegotiation", 109: "missing_extension", 110: "unsupported_extension",
    111: "certificate_unobtainable", 112: "unrecognized_name", 113: "bad_certificate_status_response",
    114: "bad_certificate_hash_value", 115: "unknown_psk_identity", 116: "certificate_required",
    120: "no_application_protocol",
}  # fmt: skip

# Alerts by which a server refuses the client certificate, and what each
# usually means (what OpenSSL servers send for each verification failure).
_REFUSALS = {
    "unknown_ca": "the server does not trust the CA that issued the card's certificate "
    "(that CA is not among the server's client CAs)",
    "bad_certificate": "the server could not verify the card's certificate or its chain",
    "certificate_required": "the server requires a client certificate it can accept and got none",
    "certificate_expired": "the card's certificate, or a certificate in its chain, has expired or is not yet valid",
    "certificate_revoked": "the card's certificate is revoked (listed in the server's CRL)",
    "certificate_unknown": "the server did not accept the card's certificate",
    "unsupported_certificate": "the server does not accept this type of certificate or key (key usage, algorithm)",
    "decrypt_error": "the server could not verify the handshake signature the card made (CertificateVerify): "
    "the certificate may not belong to the card key, or the card signed with an algorithm the server rejects",
    "access_denied": "the certificate is valid, but the server does not let this card-holder in",
}

# Other alerts a server ends a handshake with.
_OTHER_ALERTS = {
    "handshake_failure": "no cipher suite, group or signature algorithm in common (in TLS 1.2 also: the server "
    "required a client certificate it could use)",
    "protocol_version": "no TLS version in common (try --tls-max 1.2, or the server needs a newer TLS)",
    "insufficient_security": "the server wants stronger cipher suites than were offered",
    "unrecognized_name": "the server does not serve this host name (SNI)",
    "internal_error": "the server failed internally",
}


@dataclass(frozen=True)
class Event:
    """One traced message: handshake message, ChangeCipherSpec or alert."""

    sender: str  # "client" | "server"
    kind: str  # "handshake" | "change_cipher_spec" | "alert"
    name: str  # message name, or the alert description
    level: str = ""  # alerts: "warning" | "fatal"
    note: str = ""

    def line(self) -> str:
        arrow = ">" if self.sender == "client" else "<"
        name = f"Alert {self.name}" if self.kind == "alert" else self.name
        note = self.level if self.kind == "alert" else self.note
        return f"{arrow} {self.sender:<7} {name:<24} {note}".rstrip()

    def as_json(self) -> dict[str, str]:
        d = {"from": self.sender, "type": self.kind, "name": self.name}
        if self.level:
            d["level"] = self.level
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class Tracer:
    """The ``_msg_callback``: records (and with ``echo`` prints at once) the
    messages of one client connection.  It must never raise: ``_ssl`` would
    hold the exception and raise it from the handshake or read."""

    card: CardKey
    echo: bool
    events: list[Event] = field(default_factory=list)

    def __call__(self, conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any, data: bytes) -> None:
        try:
            event = self._event(direction == "write", int(content_type), data)
        except Exception:  # a malformed pseudo record must not break the connection
            return
        if event is not None:
            self.events.append(event)
            if self.echo:
                print(event.line(), file=sys.stderr, flush=True)

    def _event(self, sent: bool, content_type: int, data: bytes) -> Event | None:
        sender = "client" if sent else "server"
        if content_type == _CT_HANDSHAKE and data:
            name = _HANDSHAKE_NAMES.get(data[0], f"handshake type {data[0]}")
            note = ""
            if sent and data[0] == _MT_CERTIFICATE_VERIFY:  # ours: the signature the card made
                note = f"signed on the card (key {self.card.key_label!r}, id {self.card.key_id.hex() or '-'})"
            elif data[0] == _MT_COMPRESSED_CERTIFICATE:
                note = compression_note(data)
            return Event(sender, "handshake", name, note=note)
        if content_type == _CT_HEADER and len(data) >= 5 and data[0] == _CT_CHANGE_CIPHER_SPEC:
            return Event(sender, "change_cipher_spec", "ChangeCipherSpec")
        if content_type == _CT_ALERT and len(data) >= 2:
            level = {1: "warning", 2: "fatal"}.get(data[0], f"level {data[0]}")
            return Event(sender, "alert", _ALERT_NAMES.get(data[1], f"alert {data[1]}"), level=level)
        return None  # other record headers, TLS 1.3 inner content types

    def received_alert(self) -> str | None:
        alerts = [e.name for e in self.events if e.kind == "alert" and e.sender == "server"]
        return alerts[-1] if alerts else None

    def server_asked_for_certificate(self) -> bool:
        return any(e.sender == "server" and e.name == "CertificateRequest" for e in self.events)


def compression_note(message: bytes) -> str:
    """What an RFC 8879 CompressedCertificate message says about itself:
    type (1), length (3), algorithm (2), uncompressed length (3), then the
    compressed Certificate message with its own length (3)."""
    if len(message) < 12:
        return ""
    algorithm = int.from_bytes(message[4:6], "big")
    plain = int.from_bytes(message[6:9], "big")
    packed = int.from_bytes(message[9:12], "big")
    name = _COMPRESSION_NAMES.get(algorithm, f"algorithm {algorithm}")
    return f"the Certificate, {name}-compressed: {plain} bytes in {packed}"


def register(sub: Any) -> None:
    """Add the subcommand to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "connect",
        help="an HTTPS GET with the card key (--trace shows the handshake)",
        description="GET an https:// URL, proving the client's identity with the card key; the response body "
        "goes to standard output. The server is always verified (certificate chain and host name).",
    )
    p.add_argument("url", help="https://host[:port]/path")
    p.add_argument("--key", required=True, help="the card key's pkcs11: URI")
    p.add_argument("--cert", help="the client certificate: a pkcs11: URI or a PEM file (default: the one on the card)")
    p.add_argument("--cafile", help="CA certificates (PEM) to verify the server with (default: the system's)")
    p.add_argument("--trace", action="store_true", help="show each TLS handshake message on standard error")
    p.add_argument("--tls-max", choices=("1.2", "1.3"), help="the highest TLS version to offer")
    p.add_argument("--timeout", type=_positive, default=30.0, metavar="S", help="socket timeout (default: 30 s)")
    p.add_argument("--json", action="store_true", help="print status, headers, body and TLS details as JSON")
    add_card_arguments(p)
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _target(url: str) -> tuple[str, int, str] | str:
    """(host, port, path) of an https URL, or what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "https":
        return f"only https:// URLs can be fetched with the card key, not {url!r}"
    try:
        port = parts.port or 443
    except ValueError:
        return f"the URL {url!r} has an invalid port"
    if not parts.hostname:
        return f"the URL {url!r} names no host; use https://host[:port]/path"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, path


def _subject(der: bytes | None) -> str | None:
    return None if der is None else x509.load_der_x509_certificate(der).subject.rfc4514_string()


def _fail(what: str, hint: str) -> int:
    print(f"mtls_engine: connect: {what}", file=sys.stderr)
    print(f"  hint: {hint}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    target = _target(args.url)
    if isinstance(target, str):  # before touching the card: no login for a bad URL
        print(f"python -m mtls_engine connect: error: {target}", file=sys.stderr)
        return 2
    host, port, path = target

    # client_context()'s settings (server verified, TLS >= 1.2), built here
    # to keep the CardKey for the trace.  The cap goes on before the key is
    # loaded: load_card_key may lower it further (RSA card without PSS).
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if args.tls_max:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if args.tls_max == "1.2" else ssl.TLSVersion.TLSv1_3
    card = load_card_key(
        ctx, args.key, cert=args.cert, module=args.module, pin=cli_pin(args.pin_source, args.key),
        backend=args.backend, force=args.force,
    )  # fmt: skip

    tracer: Tracer | None = Tracer(card, echo=args.trace)
    if hasattr(ctx, _TRACE_ATTR):
        setattr(ctx, _TRACE_ATTR, tracer)  # also without --trace: names a refusing alert exactly
    else:
        tracer = None
        if args.trace:
            print(
                f"* --trace: this Python's ssl module has no SSLContext.{_TRACE_ATTR} (CPython 3.8-3.13 has it), "
                "so the handshake messages cannot be shown; the GET runs without them",
                file=sys.stderr,
            )
    if args.trace:
        print(f"* card key {redact(args.key)}: {card.key_type} {card.key_label!r} (id {card.key_id.hex() or '-'}) "
              f"on {card.token}, backend {card.backend}", file=sys.stderr)  # fmt: skip
        print(f"* connecting to {host} port {port}", file=sys.stderr, flush=True)

    conn = http.client.HTTPSConnection(host, port, timeout=args.timeout, context=ctx)
    try:
        try:
            conn.connect()  # TCP + TLS handshake: the card signs here
        except ssl.SSLCertVerificationError as exc:
            return _fail(*server_not_trusted(exc, host, args.cafile))
        except ssl.SSLError as exc:
            return _tls_failed(exc, alert_of(exc, tracer), after_handshake=False)
        except OSError as exc:
            if tracer and tracer.events:  # TCP worked; the server dropped the handshake
                return _fail(f"the server closed the connection during the TLS handshake ({exc})",
                             "see the server's log; check that the port serves TLS")  # fmt: skip
            return _fail(f"cannot connect to {host} port {port}: {exc.strerror or exc}",
                         "check the host name and port, and that the server is running and reachable")  # fmt: skip
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        asked = tracer.server_asked_for_certificate() if tracer else True  # untraced: assume so
        tls_info: dict[str, Any] = {
            "version": sock.version(),
            "cipher": cipher[0] if cipher else None,
            "server_subject": _subject(sock.getpeercert(binary_form=True)),
            "client_subject": card.subject if asked else None,
            "backend": card.backend,
        }
        try:
            conn.request("GET", path, headers={"Connection": "close", "User-Agent": "mtls_engine"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            # A TLS 1.3 client has finished its handshake before the server
            # checks the client certificate, so a refusal comes later: at the
            # first read, or (measured) as a failed write of the request
            # when the server's close reset the connection; the alert is
            # then still unread in the socket: read it to name it.
            alert = alert_of(exc, tracer) or alert_of(drain(sock), tracer)
            if args.trace:
                print(_summary(tls_info), file=sys.stderr, flush=True)
            return _request_failed(exc, alert, host, port)
    finally:
        conn.close()
    if args.trace:
        print(_summary(tls_info), file=sys.stderr, flush=True)

    ok = 200 <= resp.status < 300
    if not ok:
        where = resp.getheader("Location")
        print(f"HTTP {resp.status} {resp.reason}" + (f" (Location: {where})" if where else ""), file=sys.stderr)
    if args.json:
        headers: dict[str, str] = {}
        for name, value in resp.getheaders():  # repeated headers (Set-Cookie) joined as RFC 9110 allows
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        doc = {
            "status": resp.status,
            "headers": headers,
            "body": body.decode(resp.headers.get_content_charset() or "utf-8", errors="replace"),
            "tls": tls_info,
            "trace": [e.as_json() for e in tracer.events] if tracer else None,
        }
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)
        if out is not None:
            out.write(body)
            out.flush()
        else:
            sys.stdout.write(body.decode("utf-8", errors="replace"))
    return 0 if ok else 1


def _summary(tls: dict[str, Any]) -> str:
    client = tls["client_subject"] or "none (the server did not ask for one)"
    return (
        f"* {tls['version']}, {tls['cipher']}; server: {tls['server_subject']}; "
        f"client certificate: {client} (card key, backend {tls['backend']})"
    )


def server_not_trusted(exc: ssl.SSLCertVerificationError, host: str, cafile: str | None) -> tuple[str, str]:
    """(what failed, what to do) when the server's certificate was refused."""
    what = f"the server's certificate was not accepted: {exc.verify_message} (verify error {exc.verify_code})"
    code = exc.verify_code
    if code in (2, 18, 19, 20, 21):  # no trusted issuer / self-signed
        where = f"{cafile!r} does not hold" if cafile else "the system's CAs do not include"
        return what, f"{where} the CA that issued the server's certificate; pass --cafile with that CA"
    if code == 62:
        return what, f"the certificate does not name {host!r}; use a host name the certificate was issued for"
    if code in (9, 10):
        return (
            what,
            "the server's certificate is not valid now; check the server's certificate and this machine's clock",
        )
    show = f"openssl s_client -connect {host}:PORT -showcerts"
    return what, f"the server's certificate chain is not acceptable; check it with '{show}'"


def alert_of(exc: BaseException | None, tracer: Tracer | None) -> str | None:
    """The alert the server sent: as received (exact), else as OpenSSL
    names it in the error's reason (e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED)."""
    received = tracer.received_alert() if tracer else None
    if received is not None:
        return received
    m = re.search(r"ALERT_([A-Z_]+)$", getattr(exc, "reason", None) or "")
    return m.group(1).lower() if m else None


def drain(sock: ssl.SSLSocket, timeout: float = 2) -> BaseException | None:
    """Read what the server left (an alert raises); the error, if any."""
    try:
        sock.settimeout(timeout)
        sock.recv(1)
    except (OSError, ValueError) as exc:
        return exc
    return None


def _tls_failed(exc: ssl.SSLError, alert: str | None, *, after_handshake: bool) -> int:
    if alert is not None and alert != "close_notify":
        return _fail(*alert_failure(alert, after_handshake=after_handshake))
    if isinstance(exc, ssl.SSLEOFError) or alert == "close_notify":
        return _fail(
            f"the server closed the connection {'after' if after_handshake else 'during'} the handshake ({exc})",
            "the server may have refused the card's certificate without saying why; see the server's log",
        )
    return _fail(
        f"the TLS handshake failed: {exc}",
        "if the card could not sign (e.g. 'EVP lib'), run 'python -m mtls_engine check' with the same --key",
    )


def _request_failed(exc: BaseException, alert: str | None, host: str, port: int) -> int:
    if alert is not None and alert != "close_notify":
        return _fail(*alert_failure(alert, after_handshake=True))
    if isinstance(exc, (ConnectionError, http.client.IncompleteRead, ssl.SSLEOFError)):
        return _fail(
            f"the server closed the connection after the handshake without an answer ({exc})",
            "with TLS 1.3 this often means the server refused the card's certificate without an alert; see the "
            "server's log, or retry with --tls-max 1.2 to have a refusal reported during the handshake",
        )
    if isinstance(exc, ssl.SSLError):
        return _tls_failed(exc, alert, after_handshake=True)
    if isinstance(exc, http.client.HTTPException):
        return _fail(f"the server's answer is not HTTP ({type(exc).__name__}: {exc})",
                     "check that the URL's port serves HTTPS")  # fmt: skip
    if isinstance(exc, socket.timeout):
        return _fail(f"no answer from {host} port {port} in time ({exc})", "raise --timeout if the server is slow")
    return _fail(f"talking to {host} port {port} failed: {exc}", "the server may have dropped the connection")


def alert_failure(alert: str, *, after_handshake: bool) -> tuple[str, str]:
    """(what failed, what it usually means) for an alert the server sent."""
    when = "after the handshake" if after_handshake else "during the handshake"
    if alert in _REFUSALS:
        return (
            f"the server refused the card's certificate: it sent the alert {alert!r} {when}",
            f"{alert} usually means {_REFUSALS[alert]}",
        )
    meaning = _OTHER_ALERTS.get(alert, "see the server's log for the reason")
    return f"the server ended the connection with the alert {alert!r} {when}", meaning
