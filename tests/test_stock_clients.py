"""Stock clients use the card key with no code at all: openssl s_client,
curl and an unmodified Python, each configured only by the openssl.cnf that
``python -m mtls_engine config`` writes (and, for the provider, a URI PEM key
file from ``python -m mtls_engine uri-pem``).  Every process must exit 0:
no crash at exit (pkcs11-provider needs its no-deinit quirk for that)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtls_engine._config import SELECTOR_ENV
from mtls_engine._softhsm import KeyKind

from .conftest import CARD_KEYS, Pki, engine_api, need, need_backend
from .helpers import ROOT
from .servers import https_server, server_context

TIMEOUT = 60


@dataclass
class Stock:
    pki: Pki
    dir: Path
    pin_file: Path
    port: int

    def cnf(self, backend: str) -> Path:
        path = self.dir / f"openssl-{backend}.cnf"
        if not path.exists():
            mtls(["config", "--module", self.pki.module, "--backend", backend,
                  "--pin-source", f"file:{self.pin_file}", "-o", str(path)])  # fmt: skip
        return path

    def key_pem(self, kind: KeyKind) -> Path:
        path = self.dir / f"{kind.name}.pem"
        if not path.exists():
            mtls(["uri-pem", self.pki.key_uri(kind), "-o", str(path)])
        return path

    def env(self, cnf: str, use: str) -> dict[str, str]:
        """Environment for a stock client: OPENSSL_CONF from ``config
        --backend cnf``; ``use`` picks the backend from a "both" file."""
        env = {**os.environ, "OPENSSL_CONF": str(self.cnf(cnf))}
        env.pop(SELECTOR_ENV, None)
        if cnf == "both" and use == "engine":
            env[SELECTOR_ENV] = "engine"
        return env

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"


def mtls(args: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mtls_engine", *args], capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def stock(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stock]:
    work = tmp_path_factory.mktemp("stock")
    pin_file = work / "pin"
    # No newline: libp11's engine sends the whole file as the PIN (0.4.12).
    pin_file.write_text(pki.card1.pin)
    pin_file.chmod(0o600)
    with https_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as port:
        yield Stock(pki, work, pin_file, port)


def need_tool(name: str) -> None:
    need(shutil.which(name) is not None, f"the {name} command line tool")


def need_backends(backend: str) -> None:
    for name in ("engine", "provider") if backend == "both" else (backend,):
        need_backend(name)


def expect_card_identity(proc: subprocess.CompletedProcess[bytes], kind: KeyKind, path: str, pin: str) -> None:
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    label = CARD_KEYS[kind].label
    assert f'{{"subject": "commonName=card-holder {label}", "path": "{path}"}}' in out, err[-3000:]
    assert proc.returncode == 0, f"exit status {proc.returncode}: {err[-3000:]}"
    assert pin not in out + err


def s_client(
    stock: Stock, cnf: str, use: str, key_args: list[str], cert: Path, path: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{stock.port}", "-servername", "localhost",
         "-CAfile", str(stock.pki.ca_file), "-verify_return_error", "-cert", str(cert), *key_args,
         "-ign_eof", "-quiet"],
        input=f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode(), capture_output=True, timeout=TIMEOUT,
        env=stock.env(cnf, use),
    )  # fmt: skip


def curl(stock: Stock, cnf: str, use: str, key_args: list[str], path: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--cacert", str(stock.pki.ca_file), *key_args,
         stock.url(path)],
        capture_output=True, timeout=TIMEOUT, env=stock.env(cnf, use),
    )  # fmt: skip


@pytest.mark.parametrize("cnf", ["engine", "both"])
def test_s_client_engine(stock: Stock, cnf: str) -> None:
    need_tool("openssl")
    need_backends(cnf)
    kind = KeyKind.RSA2048
    key = stock.pki.key_uri(kind) + f"?pin-source=file:{stock.pin_file}"
    proc = s_client(stock, cnf, "engine", ["-engine", "pkcs11", "-keyform", "engine", "-key", key],
                    stock.pki.cert_file(kind), "/s_client-engine")  # fmt: skip
    expect_card_identity(proc, kind, "/s_client-engine", stock.pki.card1.pin)


@pytest.mark.parametrize("cnf", ["provider", "both"])
@pytest.mark.parametrize("kind", [KeyKind.RSA2048, KeyKind.P256], ids=lambda k: k.name)
@pytest.mark.parametrize("key_form", ["uri", "uri-pem"])
def test_s_client_provider(stock: Stock, cnf: str, kind: KeyKind, key_form: str) -> None:
    need_tool("openssl")
    need_backends(cnf)
    key = stock.pki.key_uri(kind) if key_form == "uri" else str(stock.key_pem(kind))
    proc = s_client(stock, cnf, "provider", ["-key", key], stock.pki.cert_file(kind), f"/s_client-{key_form}")
    expect_card_identity(proc, kind, f"/s_client-{key_form}", stock.pki.card1.pin)


@pytest.mark.parametrize("cnf", ["engine", "both"])
def test_curl_engine_with_certificate_from_the_token(stock: Stock, cnf: str) -> None:
    need_tool("curl")
    need_backends(cnf)
    kind = KeyKind.P256
    key = stock.pki.key_uri(kind) + f"?pin-source=file:{stock.pin_file}"
    cert = stock.pki.card1.uri(object=CARD_KEYS[kind].label, type="cert")
    proc = curl(stock, cnf, "engine", ["--engine", "pkcs11", "--key-type", "ENG", "--key", key,
                                       "--cert-type", "ENG", "--cert", cert], "/curl-engine")  # fmt: skip
    expect_card_identity(proc, kind, "/curl-engine", stock.pki.card1.pin)


@pytest.mark.parametrize("cnf", ["provider", "both"])
def test_curl_provider_with_uri_pem(stock: Stock, cnf: str) -> None:
    need_tool("curl")
    need_backends(cnf)
    kind = KeyKind.P256
    proc = curl(stock, cnf, "provider", ["--cert", str(stock.pki.cert_file(kind)), "--key", str(stock.key_pem(kind))],
                "/curl-provider")  # fmt: skip
    expect_card_identity(proc, kind, "/curl-provider", stock.pki.card1.pin)


UNMODIFIED_PYTHON = """
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
with urllib.request.urlopen(sys.argv[4], context=ctx, timeout=30) as resp:
    print(resp.read().decode())
"""


@pytest.mark.parametrize("kind", [KeyKind.RSA2048, KeyKind.P256], ids=lambda k: k.name)
def test_unmodified_python_with_uri_pem(stock: Stock, kind: KeyKind) -> None:
    need_backends("provider")
    # No mtls_engine on the path: only the stdlib and OPENSSL_CONF.
    # The file with both backends where OpenSSL has engines, else the provider's.
    cnf = "both" if engine_api() else "provider"
    env = {k: v for k, v in stock.env(cnf, "provider").items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", UNMODIFIED_PYTHON, str(stock.pki.ca_file), str(stock.pki.cert_file(kind)),
         str(stock.key_pem(kind)), stock.url("/python")],
        capture_output=True, timeout=TIMEOUT, env=env, cwd=str(stock.dir),
    )  # fmt: skip
    expect_card_identity(proc, kind, "/python", stock.pki.card1.pin)


def test_repository_template_is_what_config_writes_for_softhsm2(stock: Stock) -> None:
    """The top-level openssl.cnf is the documented SoftHSM2 template: the
    output of ``config`` for SoftHSM2 with a PIN file, paths aside."""
    need_backends("both")
    template = (ROOT / "openssl.cnf").read_text()
    written = stock.cnf("both").read_text()

    def settings(text: str) -> list[str]:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        return [re.sub(r'= ".*"$', '= "<path>"', ln) for ln in lines]

    assert settings(template) == settings(written)
