"""The test PKI (mtls_engine._softhsm.CA) checked by OpenSSL's own command
line: intermediate chains, client files, CRLs (revocation, wrong signer,
expiry, numbering).  No tokens needed."""

from __future__ import annotations

import datetime
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtls_engine._softhsm import CA

from .conftest import need

NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def root() -> CA:
    need(shutil.which("openssl") is not None, "the openssl command line checks the test PKI")
    return CA.create("pki test root")


@pytest.fixture(scope="module")
def inter(root: CA) -> CA:
    return root.issue_ca("pki test intermediate")


def _openssl(*args: str | Path) -> tuple[int, str]:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout + proc.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _verify(tmp_path: Path, root: CA, cert: Path, *args: str | Path) -> tuple[int, str]:
    """``openssl verify`` of ``cert``'s leaf as a TLS client certificate,
    trusting only ``root``."""
    return _openssl("verify", "-purpose", "sslclient", "-CAfile", _write(tmp_path / "root.pem", root.pem), *args, cert)


def test_ca_certificates_have_the_extensions_openssl_needs(root: CA, inter: CA) -> None:
    for ca, path_length, digital_signature in ((root, None, False), (inter, 0, True)):
        ext = ca.cert.extensions
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_length
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert ku.value.digital_signature is digital_signature
        ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    aki = inter.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert inter.cert.issuer == root.cert.subject and inter.pem != root.pem
    assert root.is_root and not inter.is_root


def test_intermediate_client_verifies_only_with_the_intermediate(tmp_path: Path, root: CA, inter: CA) -> None:
    cert, key = inter.issue_client_files(tmp_path, "alice")
    leaf, *rest = x509.load_pem_x509_certificates(cert.read_bytes())
    assert [c.subject for c in rest] == [inter.cert.subject]  # the leaf, then the intermediate
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    assert private.public_key() == leaf.public_key()

    rc, out = _verify(tmp_path, root, cert, "-untrusted", cert)
    assert rc == 0 and f"{cert}: OK" in out, out
    bare, _ = inter.issue_client_files(tmp_path, "bob", chain=False)
    assert len(x509.load_pem_x509_certificates(bare.read_bytes())) == 1
    rc, out = _verify(tmp_path, root, bare)
    assert rc != 0 and "unable to get local issuer certificate" in out, out


def test_root_client_file_holds_the_leaf_only(tmp_path: Path, root: CA) -> None:
    cert, _ = root.issue_client_files(tmp_path, "carol")
    (leaf,) = x509.load_pem_x509_certificates(cert.read_bytes())
    assert leaf.issuer == root.cert.subject
    assert _verify(tmp_path, root, cert)[0] == 0


def test_client_validity_is_honoured(tmp_path: Path, root: CA) -> None:
    day = datetime.timedelta(days=1)
    cert, _ = root.issue_client_files(tmp_path, "expired", not_before=NOW - 3 * day, not_after=NOW - day)
    rc, out = _verify(tmp_path, root, cert)
    assert rc != 0 and "certificate has expired" in out, out
    cert, _ = root.issue_client_files(tmp_path, "future", not_before=NOW + day)
    rc, out = _verify(tmp_path, root, cert)
    assert rc != 0 and "certificate is not yet valid" in out, out


@pytest.mark.parametrize("issuer", ["root", "intermediate"])
def test_crl_revokes(tmp_path: Path, root: CA, inter: CA, issuer: str) -> None:
    ca = root if issuer == "root" else inter
    cert, _ = ca.issue_client_files(tmp_path, "dave")
    other, _ = ca.issue_client_files(tmp_path, "erin")
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    crl = _write(tmp_path / "crl.pem", ca.crl([leaf, 12345]))
    rc, out = _verify(tmp_path, root, cert, "-untrusted", cert, "-crl_check", "-CRLfile", crl)
    assert rc != 0 and "certificate revoked" in out, out
    rc, out = _verify(tmp_path, root, other, "-untrusted", other, "-crl_check", "-CRLfile", crl)
    assert rc == 0, out
    # No CRL at all: with -crl_check that is a failure too.
    rc, out = _verify(tmp_path, root, other, "-untrusted", other, "-crl_check")
    assert rc != 0 and "unable to get certificate CRL" in out, out


def test_crl_signed_by_another_ca_is_refused(tmp_path: Path, root: CA) -> None:
    cert, _ = root.issue_client_files(tmp_path, "frank")
    forged = _write(tmp_path / "forged.pem", root.crl(signer=CA.create("pki test impostor")))
    rc, out = _verify(tmp_path, root, cert, "-crl_check", "-CRLfile", forged)
    assert rc != 0 and "CRL signature failure" in out, out
    _, out = _openssl("crl", "-in", forged, "-CAfile", tmp_path / "root.pem", "-noout")
    assert "verify failure" in out, out
    _, out = _openssl("crl", "-in", _write(tmp_path / "good.pem", root.crl()), "-CAfile", tmp_path / "root.pem")
    assert "verify OK" in out, out


def test_crl_out_of_date_is_refused(tmp_path: Path, root: CA) -> None:
    cert, _ = root.issue_client_files(tmp_path, "grace")
    day = datetime.timedelta(days=1)
    stale = _write(tmp_path / "stale.pem", root.crl(last_update=NOW - 9 * day, next_update=NOW - 2 * day))
    rc, out = _verify(tmp_path, root, cert, "-crl_check", "-CRLfile", stale)
    assert rc != 0 and "CRL has expired" in out, out
    early = _write(tmp_path / "early.pem", root.crl(last_update=NOW + day))
    rc, out = _verify(tmp_path, root, cert, "-crl_check", "-CRLfile", early)
    assert rc != 0 and "CRL is not yet valid" in out, out


def test_crl_fields(root: CA) -> None:
    inter = root.issue_ca("pki test fresh intermediate")
    crls = [x509.load_pem_x509_crl(ca.crl([7])) for ca in (root, root, inter, root, inter)]
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for c in crls]
    assert numbers[0] < numbers[1] < numbers[3]  # per CA, increasing
    assert (numbers[2], numbers[4]) == (1, 2)  # the intermediate has its own sequence
    crl = crls[2]
    assert crl.issuer == inter.cert.subject and crl.is_signature_valid(inter.key.public_key())
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == inter.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert [r.serial_number for r in crl] == [7]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert now - datetime.timedelta(minutes=2) < crl.last_update_utc < now
    assert crl.next_update_utc is not None
    assert abs(crl.next_update_utc - now - datetime.timedelta(days=7)) < datetime.timedelta(minutes=1)
