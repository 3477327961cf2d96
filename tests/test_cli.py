"""``python -m mtls_engine config`` and ``uri-pem``: what they write, and
the named errors for what they refuse."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mtls_engine import ConfigError, UriError
from mtls_engine._backends import provider_status
from mtls_engine._config import conf_value
from mtls_engine._uripem import read_uri_pem, uri_pem

from .conftest import Pki, need
from .helpers import ROOT
from .registry import Registry


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtls_engine", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_uri_pem_round_trip_and_file_mode(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    proc = run_cli("uri-pem", "pkcs11:token=card1;object=client%20key", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(b"-----BEGIN PKCS#11 PROVIDER URI-----\n")
    assert data.endswith(b"-----END PKCS#11 PROVIDER URI-----\n")
    # type=private is added so the file can only ever name a private key.
    assert read_uri_pem(data) == "pkcs11:token=card1;object=client%20key;type=private"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_uri_pem_long_uri_uses_long_der_lengths() -> None:
    uri = "pkcs11:token=card1;object=" + "k" * 300 + ";type=private"
    assert read_uri_pem(uri_pem(uri)) == uri


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        ("pkcs11:token=card1;object=k?pin-value=12345678", ConfigError, "a PIN must never be written into a key file"),
        ("pkcs11:token=card1;object=k?module-path=/x.so", ConfigError, "names a module (module-path/module-name)"),
        ("pkcs11:token=card1;object=k;type=cert", UriError, "must name a private key (type=private)"),
        ("pkcs11:token=card1", UriError, "names no key; add object=<label> or id=<id>"),
        ("https://example.org/key", UriError, "does not start with 'pkcs11:'"),
    ],
)
def test_uri_pem_refusals(uri: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as exc:
        uri_pem(uri)
    assert message in str(exc.value)
    assert "12345678" not in str(exc.value)
    proc = run_cli("uri-pem", uri)
    if "pin-value" in uri:  # a PIN in the arguments: refused before anything else, as a usage error
        assert proc.returncode == 2
        assert proc.stderr.startswith("mtls_engine: PinOnCommandLine: the URI argument carries a pin-value")
    else:
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"mtls_engine: {error.__name__}: ")
        assert message in proc.stderr
    assert "12345678" not in proc.stderr + proc.stdout


def _der(uri: str) -> bytes:
    body = b"".join(uri_pem(uri).splitlines()[1:-1])
    return base64.b64decode(body)


def _pem(der: bytes) -> bytes:
    return b"-----BEGIN PKCS#11 PROVIDER URI-----\n" + base64.b64encode(der) + b"\n-----END PKCS#11 PROVIDER URI-----\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "holds no '-----BEGIN PKCS#11"),
        (b"-----BEGIN PKCS#11 PROVIDER URI-----\n!!!!\n-----END PKCS#11 PROVIDER URI-----\n", "damaged"),
        (b"-----BEGIN PKCS#11 PROVIDER URI-----\nMAA=\n-----END PKCS#11 PROVIDER URI-----\n", "damaged"),
        (_pem(_der("pkcs11:object=k")[:-1]), "damaged"),  # truncated
        (_pem(_der("pkcs11:object=k") + b"\x00"), "damaged"),  # trailing byte
        (_pem(_der("pkcs11:object=k").replace(b"v1.0", b"v9.9")), "of an unknown kind"),
    ],
)
def test_read_uri_pem_damaged(data: bytes, message: str) -> None:
    with pytest.raises(UriError, match=message):
        read_uri_pem(data)


def test_conf_value_quotes_what_openssl_would_expand() -> None:
    assert conf_value('/opt/we$ird "dir"#1/m.so') == '"/opt/we$ird \\"dir\\"#1/m.so"'
    with pytest.raises(ConfigError, match="contains a line break or NUL"):
        conf_value("/opt/a\nb.so")


def test_config_refusals(pki: Pki, tmp_path: Path) -> None:
    proc = run_cli("config", "--module", str(tmp_path / "missing.so"))
    assert proc.returncode == 1
    assert "ModuleLoadError: the PKCS#11 module" in proc.stderr and "does not exist" in proc.stderr
    proc = run_cli("config", "--module", pki.module, "--pin-source", "env:CARD_PIN")
    assert proc.returncode == 1
    assert "ConfigError: the PIN source 'env:CARD_PIN' cannot be written to openssl.cnf; use file:" in proc.stderr
    proc = run_cli("config", "--module", pki.module, "--pin-source", "file:pin.txt")
    assert proc.returncode == 1
    assert "must be an absolute path" in proc.stderr
    proc = Registry(tmp_path / "registry").cli("config", extra=pki.folder.env)  # nothing registered
    assert proc.returncode == 1
    assert "ModuleLoadError: no PKCS#11 module given and no usable module is registered with p11-kit" in proc.stderr
    assert "'module: /path/to/your-pkcs11-library.so'" in proc.stderr
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage: python -m mtls_engine" in proc.stderr


def test_config_with_awkward_module_path_works_in_openssl(pki: Pki, tmp_path: Path) -> None:
    """A module path with $, quotes and # survives openssl.cnf's syntax."""
    need(shutil.which("openssl") is not None, "the openssl command line tool")
    need(provider_status()[0], provider_status()[1])
    odd = tmp_path / 'we$ird "dir"#1'
    odd.mkdir()
    module = odd / "module.so"
    module.symlink_to(pki.module)
    pin = tmp_path / "pin"
    pin.write_text(pki.card1.pin)
    pin.chmod(0o600)
    cnf = tmp_path / "openssl.cnf"
    proc = run_cli("config", "--module", str(module), "--backend", "provider", "--pin-source", f"file:{pin}",
                   "-o", str(cnf))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        ["openssl", "storeutl", "-keys", "-text", pki.key_uri_prefix()], capture_output=True, text=True, timeout=60,
        env={**os.environ, "OPENSSL_CONF": str(cnf)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "object=ec256;type=private" in proc.stdout


def test_output_that_cannot_be_written(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "key.pem"
    proc = run_cli("uri-pem", "pkcs11:token=card1;object=k", "-o", str(target))
    assert proc.returncode == 1
    assert f"mtls_engine: ConfigError: cannot write {str(target)!r}: No such file or directory" in proc.stderr
    assert not target.parent.exists()
