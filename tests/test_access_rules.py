"""Access rules on a client certificate's subject alternative names
(``dns:``, ``email:``, ``uri:`` in ``allow=``): each admits the name it
lists, of its own kind only, and nothing else; through the rule itself and
through a server's real handshakes."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import mtls_engine
from mtls_engine._server import access_rule
from mtls_engine._softhsm import CA

from .conftest import Pki
from .servers import echo_server, talk


def client_cert(
    ca: CA, common_name: str, sans: list[x509.GeneralName]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A clientAuth certificate from ``ca`` with these subject alternative
    names (none: no SAN extension at all), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


DNS = x509.DNSName("client.example.org")
EMAIL = x509.RFC822Name("alice@example.org")
URI = x509.UniformResourceIdentifier("spiffe://example.org/workload/alice")
UPPER: list[x509.GeneralName] = [x509.DNSName("CLIENT.Example.Org"), x509.RFC822Name("Alice@Example.ORG")]
NEAR: list[x509.GeneralName] = [
    x509.DNSName("other.example.org"),  # another host
    x509.DNSName("alice@example.org"),  # the email address, as a DNS name
    x509.RFC822Name("client.example.org"),  # the host name, as an email address
    x509.RFC822Name("bob@example.org"),
    x509.UniformResourceIdentifier("spiffe://example.org/workload/Alice"),  # URIs: case matters
    x509.UniformResourceIdentifier("spiffe://example.org/workload/alice/x"),
]


@pytest.fixture(scope="module")
def certs(pki: Pki) -> dict[str, x509.Certificate]:
    """One certificate per kind of name, one with all three, one with the
    host name and address in upper case, one with near misses of each, and
    one with no SAN."""
    return {
        "dns": client_cert(pki.ca, "dns client", [DNS])[0],
        "email": client_cert(pki.ca, "email client", [EMAIL])[0],
        "uri": client_cert(pki.ca, "uri client", [URI])[0],
        "all": client_cert(pki.ca, "all names", [x509.DNSName("x.example.net"), DNS, EMAIL, URI])[0],
        "upper": client_cert(pki.ca, "upper case", UPPER)[0],
        "near": client_cert(pki.ca, "near misses", NEAR)[0],
        "none": client_cert(pki.ca, "client.example.org", [])[0],  # the name only as its CN
    }


@pytest.mark.parametrize(
    ("allow", "admitted"),
    [
        (["dns:client.example.org"], {"dns", "all", "upper"}),
        (["DNS:Client.Example.ORG"], {"dns", "all", "upper"}),  # host names: any case
        (["email:alice@example.org"], {"email", "all", "upper"}),
        (["email:Alice@EXAMPLE.org"], {"email", "all", "upper"}),
        (["uri:spiffe://example.org/workload/alice"], {"uri", "all"}),
        (["uri:spiffe://example.org/workload/ALICE"], set()),  # a URI is matched as written
        (["uri:spiffe://example.org/workload"], set()),  # no prefix matching
        (["dns:example.org"], set()),  # no suffix matching
        (["dns:alice@example.org"], {"near"}),  # of its own kind only: near's DNS name
        (["email:client.example.org"], {"near"}),
        (["dns:client.example.org", "email:alice@example.org"], {"dns", "email", "all", "upper"}),
    ],
)
def test_san_rule(certs: dict[str, x509.Certificate], allow: list[str], admitted: set[str]) -> None:
    rule = access_rule(allow)
    assert rule is not None
    assert {name for name, cert in certs.items() if rule(cert)} == admitted


def test_san_rule_in_handshakes(pki: Pki, tmp_path: Path) -> None:
    """A server with ``allow=[dns:, email:, uri:]`` serves a client whose
    certificate carries one of those names, and refuses one that carries
    only near misses, as not_allowed."""
    rejections: list[mtls_engine.Rejection] = []
    srv = mtls_engine.server_context(pki.server_cert, pki.server_key, pki.ca_file, on_reject=rejections.append,
                                     allow=["dns:client.example.org", "email:alice@example.org",
                                            "uri:spiffe://example.org/workload/alice"])  # fmt: skip

    def client(name: str, sans: list[x509.GeneralName]) -> ssl.SSLContext:
        cert, key = client_cert(pki.ca, name, sans)
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )  # fmt: skip
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the refusal comes within the handshake
        ctx.load_cert_chain(str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key"))
        return ctx

    with echo_server(srv) as s:
        served = [talk(client(n, [san]), s.port)["subject"] for n, san in
                  [("by-dns", DNS), ("by-email", EMAIL), ("by-uri", URI)]]  # fmt: skip
        with pytest.raises(ssl.SSLError):
            talk(client("near", NEAR), s.port)
    assert served == ["commonName=by-dns", "commonName=by-email", "commonName=by-uri"]
    assert [(r.reason, r.subject) for r in rejections] == [("not_allowed", "CN=near")]
