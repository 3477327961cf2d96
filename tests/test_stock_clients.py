"""The repository's openssl.cnf template makes stock `openssl s_client` use
the card key through libp11's engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from mtls_engine._backends import engine_status
from mtls_engine._softhsm import KeyKind

from .conftest import Pki, need
from .helpers import ROOT
from .servers import https_server, server_context


def test_openssl_s_client_with_template_config(pki: Pki, tmp_path: Path) -> None:
    need(shutil.which("openssl") is not None, "the openssl command line tool")
    ok, why = engine_status()
    need(ok, why)
    template = (ROOT / "openssl.cnf").read_text()
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text(re.sub(r"(?m)^MODULE_PATH = .*$", f"MODULE_PATH = {pki.module}", template))
    pin_file = tmp_path / "pin"
    pin_file.write_text(pki.card1.pin)
    pin_file.chmod(0o600)
    cert_file = tmp_path / "client.pem"
    cert_file.write_bytes(pki.rsa_cert_file.read_bytes())
    key = pki.key_uri(KeyKind.RSA2048) + f"?pin-source=file:{pin_file}"
    with https_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as port:
        proc = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
             "-CAfile", str(pki.ca_file), "-verify_return_error", "-engine", "pkcs11", "-keyform", "engine",
             "-key", key, "-cert", str(cert_file), "-ign_eof"],
            input=b"GET /stock HTTP/1.0\r\nHost: localhost\r\n\r\n", capture_output=True, timeout=60,
            env={**os.environ, "OPENSSL_CONF": str(cnf)},
        )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    # http.server closes without a TLS close_notify, so s_client exits 1 with
    # "unexpected eof" after the response: the response itself is the proof.
    err = proc.stderr.decode(errors="replace")
    assert '{"subject": "commonName=card-holder rsa2048", "path": "/stock"}' in out, err[-2000:]
    assert pki.card1.pin not in out + err
