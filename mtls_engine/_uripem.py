"""``PKCS#11 PROVIDER URI`` PEM files: a key file that holds only a
``pkcs11:`` URI.  With pkcs11-provider loaded (``OPENSSL_CONF``), any program
that reads a PEM private key — ``ssl.SSLContext.load_cert_chain``, ``curl
--key``, ``openssl s_client -key`` — then uses the key on the token.

The DER inside is ``SEQUENCE { desc VisibleString, uri UTF8String }`` with
desc ``PKCS#11 Provider URI v1.0``, as pkcs11-provider's decoder expects.
"""

from __future__ import annotations

import base64
import binascii
import re

from ._errors import ConfigError, UriError
from ._uri import parse

__all__ = ["PEM_LABEL", "read_uri_pem", "uri_pem"]

PEM_LABEL = "PKCS#11 PROVIDER URI"
DESCRIPTION = b"PKCS#11 Provider URI v1.0"
_SEQUENCE, _VISIBLE_STRING, _UTF8_STRING = 0x30, 0x1A, 0x0C
_MAX_URI = 64 * 1024


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def _key_uri_for_pem(uri: str) -> str:
    """The URI as it goes into the file: it must name a private key, and it
    carries neither a PIN (the file is not encrypted) nor a module (the
    module comes from openssl.cnf)."""
    parsed = parse(uri, what="key")
    if parsed.has_pin_value:
        raise ConfigError(
            "the key URI carries pin-value: a PIN must never be written into a key file (it is not "
            "encrypted); remove pin-value and give the PIN in openssl.cnf "
            "(python -m mtls_engine config --pin-source file:/path/to/pin) or let the client ask"
        )
    if parsed.module_path is not None or "module-name=" in uri.lower():
        raise ConfigError(
            "the key URI names a module (module-path/module-name), which pkcs11-provider does not read "
            "from a key file; remove it and name the module in openssl.cnf "
            "(python -m mtls_engine config --module /path/to/module.so)"
        )
    if not parsed.has_object_attrs:
        raise UriError(f"the key URI {parsed.safe!r} names no key; add object=<label> or id=<id>")
    if parsed.object_type is None:
        path, sep, query = uri.partition("?")
        return f"{path.rstrip(';')};type=private{sep}{query}"
    if parsed.object_type != "private":
        raise UriError(f"the key URI {parsed.safe!r} must name a private key (type=private)")
    return uri


def uri_pem(uri: str) -> bytes:
    """The PEM file content for the key ``uri`` (checked by _key_uri_for_pem)."""
    body = _key_uri_for_pem(uri).encode("utf-8")
    if len(body) > _MAX_URI:
        raise UriError(f"the key URI is {len(body)} bytes long; at most {_MAX_URI} fit in a URI PEM file")
    der = _tlv(_SEQUENCE, _tlv(_VISIBLE_STRING, DESCRIPTION) + _tlv(_UTF8_STRING, body))
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {PEM_LABEL}-----\n" + "\n".join(lines) + f"\n-----END {PEM_LABEL}-----\n").encode("ascii")


_PEM = re.compile(rb"-----BEGIN PKCS#11 PROVIDER URI-----(?P<b64>.*?)-----END PKCS#11 PROVIDER URI-----", re.DOTALL)


def _read_tlv(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError(f"expected tag {tag:#x} at byte {pos}")
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        count = n & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad length")
        n = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + n > len(data):
        raise ValueError("truncated")
    return data[pos : pos + n], pos + n


def read_uri_pem(data: bytes, name: str = "the key file") -> str:
    """The URI inside a ``PKCS#11 PROVIDER URI`` PEM file; UriError when the
    file is anything else or damaged."""
    m = _PEM.search(data)
    if m is None:
        raise UriError(f"{name} holds no '-----BEGIN {PEM_LABEL}-----' block")
    try:
        der = base64.b64decode(b"".join(m.group("b64").split()), validate=True)
        seq, end = _read_tlv(der, 0, _SEQUENCE)
        if end != len(der):
            raise ValueError("trailing bytes")
        desc, pos = _read_tlv(seq, 0, _VISIBLE_STRING)
        uri, pos = _read_tlv(seq, pos, _UTF8_STRING)
        if pos != len(seq):
            raise ValueError("trailing bytes in the sequence")
        text = uri.decode("utf-8")
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise UriError(f"{name} has a damaged {PEM_LABEL} block ({exc})") from None
    if desc != DESCRIPTION:
        raise UriError(f"{name} is a {PEM_LABEL} file of an unknown kind ({desc[:40]!r})")
    return text
