"""``python -m mtls_engine connect``: real HTTPS GETs with a SoftHSM2 card
key against real servers that require client certificates, run in-process
through ``main``; the handshake trace, JSON output and failure messages."""

from __future__ import annotations

import http.server
import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtls_engine import _connect
from mtls_engine._cli import main
from mtls_engine._softhsm import KeyKind

from .conftest import Pki
from .helpers import ROOT
from .servers import https_server, server_context

CLIENT_SUBJECT = "CN=card-holder ec256"
CV_NOTE = "signed on the card (key 'ec256', id 02)"

# OpenSSL 3.2 and later compress a TLS 1.3 client certificate (RFC 8879)
# when the server offers it, as an OpenSSL 3.5 server does: measured on
# Debian 13 (3.5.9, built with zlib and zstd; it picked zlib), where the
# client's Certificate is a CompressedCertificate message and the server's
# own Certificate stays uncompressed.  OpenSSL 3.0 (Debian 12) has none.
CERT_COMPRESSION = ssl.OPENSSL_VERSION_INFO >= (3, 2)
CLIENT_CERTIFICATE = "CompressedCertificate" if CERT_COMPRESSION else "Certificate"
COMPRESSION_NOTE = re.compile(r"the Certificate, zlib-compressed: (\d+) bytes in (\d+)")

# As measured with OpenSSL 3.0 and 3.5 (Python server, Python client): the
# TLS 1.3 middlebox-compatibility ChangeCipherSpec records appear on both
# sides, and the server's two session tickets are read before the HTTP answer.
TLS13 = [
    ("client", "ClientHello"),
    ("server", "ServerHello"),
    ("server", "ChangeCipherSpec"),
    ("server", "EncryptedExtensions"),
    ("server", "CertificateRequest"),
    ("server", "Certificate"),
    ("server", "CertificateVerify"),
    ("server", "Finished"),
    ("client", "ChangeCipherSpec"),
    ("client", CLIENT_CERTIFICATE),
    ("client", "CertificateVerify"),
    ("client", "Finished"),
    ("server", "NewSessionTicket"),
    ("server", "NewSessionTicket"),
]
# TLS 1.2 (no certificate compression there, on any version): the server
# sends a session ticket before its ChangeCipherSpec.
TLS12 = [
    ("client", "ClientHello"),
    ("server", "ServerHello"),
    ("server", "Certificate"),
    ("server", "ServerKeyExchange"),
    ("server", "CertificateRequest"),
    ("server", "ServerHelloDone"),
    ("client", "Certificate"),
    ("client", "ClientKeyExchange"),
    ("client", "CertificateVerify"),
    ("client", "ChangeCipherSpec"),
    ("client", "Finished"),
    ("server", "NewSessionTicket"),
    ("server", "ChangeCipherSpec"),
    ("server", "Finished"),
]


@pytest.fixture
def pin_file(pki: Pki, tmp_path: Path) -> Path:
    path = tmp_path / "pin"
    path.write_text(pki.card1.pin)  # no trailing newline
    return path


@pytest.fixture
def server(pki: Pki) -> Iterator[int]:
    with https_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as port:
        yield port


def connect(
    pki: Pki, capsys: pytest.CaptureFixture[str], url: str, *extra: str, backend: str = "auto"
) -> tuple[int, str, str]:
    """Run ``connect`` in-process; (exit status, stdout, stderr), checked for the PIN."""
    code = main(["connect", url, "--key", pki.key_uri(KeyKind.P256), "--module", pki.module, "--backend", backend,
                 *extra])  # fmt: skip
    out, err = capsys.readouterr()
    assert_no_pin(pki, out + err)
    return code, out, err


def assert_no_pin(pki: Pki, text: str) -> None:
    assert pki.card1.pin not in text


def trace_lines(err: str) -> list[list[str]]:
    """The message lines of --trace: [arrow, sender, name, note words...]."""
    return [line.split() for line in err.splitlines() if line[:2] in ("> ", "< ")]


def sequence(err: str) -> list[tuple[str, str]]:
    out = []
    for words in trace_lines(err):
        assert words[0] == (">" if words[1] == "client" else "<")
        name = f"{words[2]} {words[3]}" if words[2] == "Alert" else words[2]
        out.append((words[1], name))
    return out


def assert_client_certificate_line(err: str) -> None:
    """The client's certificate message: compressed (with what it says
    about itself) where OpenSSL compresses it, else plain, no note."""
    (line,) = [words for words in trace_lines(err) if words[1] == "client" and words[2] == CLIENT_CERTIFICATE]
    if CERT_COMPRESSION:
        m = COMPRESSION_NOTE.fullmatch(" ".join(line[3:]))
        assert m, line
        plain, packed = int(m.group(1)), int(m.group(2))
        assert 300 < packed < plain < 4000, line  # one EC P-256 certificate, compressed
    else:
        assert line[3:] == []


def test_trace_tls13(pki: Pki, pin_file: Path, server: int, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"https://localhost:{server}/hello?x=1"
    code, out, err = connect(pki, capsys, url, "--cafile", str(pki.ca_file), "--pin-source", f"file:{pin_file}",
                             "--trace", backend=backend)  # fmt: skip
    assert code == 0, err
    assert sequence(err) == TLS13
    assert_client_certificate_line(err)
    cv = [line for line in err.splitlines() if line.startswith("> client  CertificateVerify")]
    assert len(cv) == 1 and cv[0].endswith(CV_NOTE)
    # Only our own CertificateVerify is the card's.
    assert sum(CV_NOTE in line for line in err.splitlines()) == 1
    summary = err.splitlines()[-1]
    assert summary.startswith("* TLSv1.3, TLS_") and "server: CN=localhost" in summary
    assert f"client certificate: {CLIENT_SUBJECT}" in summary and f"backend {backend}" in summary
    assert json.loads(out) == {"subject": "commonName=card-holder ec256", "path": "/hello?x=1"}


def test_trace_tls12(pki: Pki, pin_file: Path, server: int, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = connect(pki, capsys, f"https://localhost:{server}/", "--cafile", str(pki.ca_file),
                           "--pin-source", f"file:{pin_file}", "--trace", "--tls-max", "1.2",
                           backend=backend)  # fmt: skip
    assert code == 0, err
    assert sequence(err) == TLS12
    assert next(w for w in trace_lines(err) if w[2] == "CertificateVerify" and w[1] == "client")[3:] == CV_NOTE.split()
    assert err.splitlines()[-1].startswith("* TLSv1.2, ECDHE-ECDSA-")


def test_json_output_matches_trace(
    pki: Pki, pin_file: Path, server: int, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = connect(pki, capsys, f"https://localhost:{server}/j", "--cafile", str(pki.ca_file),
                             "--pin-source", f"file:{pin_file}", "--json", "--trace", backend=backend)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["status"] == 200
    assert doc["headers"]["Content-Type"] == "application/json"
    assert json.loads(doc["body"])["subject"] == "commonName=card-holder ec256"
    tls = doc["tls"]
    assert tls["version"] == "TLSv1.3" and tls["cipher"].startswith("TLS_")
    assert tls["server_subject"] == "CN=localhost"
    assert tls["client_subject"] == CLIENT_SUBJECT
    assert tls["backend"] == backend
    assert [(e["from"], e["name"]) for e in doc["trace"]] == sequence(err) == TLS13
    kinds = {e["name"]: e["type"] for e in doc["trace"]}
    assert kinds["ChangeCipherSpec"] == "change_cipher_spec" and kinds["Finished"] == "handshake"
    notes = [(e["name"], e["note"]) for e in doc["trace"] if e.get("note")]
    if CERT_COMPRESSION:
        assert notes[0][0] == "CompressedCertificate" and COMPRESSION_NOTE.fullmatch(notes[0][1]), notes
        notes = notes[1:]
    assert notes == [("CertificateVerify", CV_NOTE)]


def test_pin_from_environment(
    pki: Pki, server: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONNECT_TEST_PIN", pki.card1.pin)
    code, out, err = connect(pki, capsys, f"https://localhost:{server}", "--cafile", str(pki.ca_file),
                             "--pin-source", "env:CONNECT_TEST_PIN")  # fmt: skip
    assert code == 0, err
    assert err == ""  # quiet without --trace
    assert json.loads(out) == {"subject": "commonName=card-holder ec256", "path": "/"}


@pytest.mark.parametrize(("tls_max", "when"), [("1.3", "after the handshake"), ("1.2", "during the handshake")])
def test_server_refuses_card_certificate(
    pki: Pki, pin_file: Path, backend: str, capsys: pytest.CaptureFixture[str], tls_max: str, when: str
) -> None:
    # The server trusts only another CA for client certificates: unknown_ca.
    # With TLS 1.3 the client's handshake is over before the server has
    # checked its certificate, so the alert arrives at the first read.
    with https_server(server_context(pki.server_cert, pki.server_key, pki.other_ca_file)) as port:
        code, out, err = connect(pki, capsys, f"https://localhost:{port}/", "--cafile", str(pki.ca_file),
                                 "--pin-source", f"file:{pin_file}", "--tls-max", tls_max, "--trace",
                                 backend=backend)  # fmt: skip
    assert code == 1
    assert out == ""
    assert f"the server refused the card's certificate: it sent the alert 'unknown_ca' {when}" in err
    assert "unknown_ca usually means the server does not trust the CA that issued the card's certificate" in err
    assert ("server", "Alert unknown_ca") in sequence(err)
    assert "fatal" in next(line for line in err.splitlines() if "Alert unknown_ca" in line)


def test_server_refusal_named_without_trace(pki: Pki, pin_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with https_server(server_context(pki.server_cert, pki.server_key, pki.other_ca_file)) as port:
        code, _, err = connect(pki, capsys, f"https://localhost:{port}/", "--cafile", str(pki.ca_file),
                               "--pin-source", f"file:{pin_file}")  # fmt: skip
    assert code == 1
    assert err.startswith("mtls_engine: connect: the server refused the card's certificate")
    assert "'unknown_ca'" in err


def test_server_certificate_not_trusted(
    pki: Pki, pin_file: Path, server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = connect(pki, capsys, f"https://localhost:{server}/", "--cafile", str(pki.other_ca_file),
                             "--pin-source", f"file:{pin_file}", "--trace")  # fmt: skip
    assert code == 1
    assert out == ""
    assert "the server's certificate was not accepted" in err
    assert "pass --cafile with that CA" in err
    # Our client refused the server: the alert is ours.
    assert ("client", "Alert unknown_ca") in sequence(err)


def test_host_name_mismatch(pki: Pki, pin_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = pki.ca.issue_server_files(tmp_path, "elsewhere.example")  # trusted CA, another name
    with https_server(server_context(cert, key, pki.ca_file)) as port:
        code, out, err = connect(pki, capsys, f"https://localhost:{port}/", "--cafile", str(pki.ca_file),
                                 "--pin-source", f"file:{pin_file}")  # fmt: skip
    assert code == 1
    assert out == ""
    assert "does not name 'localhost'" in err


def test_connection_refused(pki: Pki, pin_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with https_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as port:
        pass  # closed: nothing listens on the port now
    code, _, err = connect(pki, capsys, f"https://localhost:{port}/", "--pin-source", f"file:{pin_file}")
    assert code == 1
    assert f"cannot connect to localhost port {port}" in err


class _Status(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"no such thing\n"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_error_status(pki: Pki, pin_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with https_server(server_context(pki.server_cert, pki.server_key, pki.ca_file), _Status) as port:
        code, out, err = connect(pki, capsys, f"https://localhost:{port}/missing", "--cafile", str(pki.ca_file),
                                 "--pin-source", f"file:{pin_file}")  # fmt: skip
        assert code == 1
        assert out == "no such thing\n"
        assert err == "HTTP 404 Not Found\n"
        code, out, _ = connect(pki, capsys, f"https://localhost:{port}/missing", "--cafile", str(pki.ca_file),
                               "--pin-source", f"file:{pin_file}", "--json")  # fmt: skip
        assert code == 1
        assert json.loads(out)["status"] == 404


def test_trace_unavailable(
    pki: Pki, pin_file: Path, server: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An interpreter whose SSLContext lacks _msg_callback: said clearly, GET still done.
    monkeypatch.setattr(_connect, "_TRACE_ATTR", "_no_msg_callback_here")
    code, out, err = connect(pki, capsys, f"https://localhost:{server}/", "--cafile", str(pki.ca_file),
                             "--pin-source", f"file:{pin_file}", "--trace")  # fmt: skip
    assert code == 0, err
    assert "has no SSLContext._no_msg_callback_here" in err
    assert "the GET runs without them" in err
    assert trace_lines(err) == []
    assert json.loads(out)["subject"] == "commonName=card-holder ec256"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost/", "only https:// URLs"),
        ("https:///path", "names no host"),
        ("https://localhost:99999999/", "invalid port"),
    ],
)
def test_bad_url_is_a_usage_error(pki: Pki, url: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before the card is touched: no PIN source needed.
    code, out, err = connect(pki, capsys, url)
    assert code == 2
    assert out == ""
    assert message in err


def test_missing_key_is_a_usage_error(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["connect", "https://localhost/"])
    assert exc.value.code == 2
    _, err = capsys.readouterr()
    assert "--key" in err


def test_pin_value_in_uri_is_refused_and_never_printed(
    pki: Pki, server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PIN in --key would sit in the process's arguments, readable by every
    user: connect refuses it as a usage error and says what to use."""
    key = pki.key_uri(KeyKind.P256) + f"?pin-value={pki.card1.pin}"
    code = main(["connect", f"https://localhost:{server}/", "--key", key, "--module", pki.module,
                 "--cafile", str(pki.ca_file), "--trace"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "PinOnCommandLine: --key carries a pin-value" in err and "--pin-source env:VAR|file:PATH" in err
    assert out == ""
    assert_no_pin(pki, out + err)


def test_real_process(pki: Pki, pin_file: Path, server: int, backend: str) -> None:
    # The command as a user runs it: exit status of a whole process (a crash
    # at exit would show here), trace on stderr, body on stdout.
    proc = subprocess.run(
        [sys.executable, "-m", "mtls_engine", "connect", f"https://localhost:{server}/p", "--key",
         pki.key_uri(KeyKind.P256), "--module", pki.module, "--backend", backend, "--cafile", str(pki.ca_file),
         "--pin-source", f"file:{pin_file}", "--trace"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sequence(proc.stderr) == TLS13
    assert_client_certificate_line(proc.stderr)
    assert json.loads(proc.stdout)["path"] == "/p"
    assert_no_pin(pki, proc.stdout + proc.stderr)
