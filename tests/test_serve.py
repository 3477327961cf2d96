"""``python -m mtls_engine serve``, run as a user runs it (a subprocess),
with real clients (curl, Python's ssl): accepted clients get their identity,
refused ones are logged with the reason, the CRL is reloaded on SIGHUP
without a restart, and the server key may live on the token."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtls_engine._softhsm import KeyKind

from .conftest import TEST_PIN, Pki, need
from .helpers import ROOT, ca_names_seen, client_hello

START_TIMEOUT = 60.0
LOG_TIMEOUT = 15.0
CURL_TIMEOUT = 20


def no_pin(*outputs: str) -> None:
    for out in outputs:
        assert TEST_PIN not in out


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mtls_engine", *args],
        capture_output=True, text=True, env=cli_env(), timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    no_pin(proc.stdout, proc.stderr)
    return proc


class Serve:
    """A running ``python -m mtls_engine serve``; its stderr is collected line
    by line on a thread so a test can wait for a line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtls_engine", "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
        )  # fmt: skip
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        self.stdout = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = LOG_TIMEOUT, start: int = 0) -> re.Match[str]:
        """The first stderr line from index ``start`` matching ``pattern``."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or "<EOF>" in self.lines:
                    pytest.fail(f"no line matching {pattern!r} from serve; its stderr:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def started(self) -> Serve:
        m = self.wait_for(r"^mtls_engine serve: listening on https://127\.0\.0\.1:(\d+)/ ", START_TIMEOUT)
        self.port = int(m.group(1))
        assert self.port != 0
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Stop it with ``sig``; the exit status (killed if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.close()
            raise
        finally:
            self.close()
        return rc

    def close(self) -> None:
        """Kill the server if it still runs; collect and close its output."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.stdout = self.proc.stdout.read()
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        no_pin(self.stdout, *self.lines)

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


@contextmanager
def serve(*args: str) -> Iterator[Serve]:
    server = Serve(list(args))
    try:
        yield server.started()
    finally:
        server.close()


@dataclass
class Client:
    cert: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def serial(self) -> str:
        return format(self.cert.serial_number, "x")  # lowercase hex, no leading zeros


def make_client(pki: Pki, directory: Path, name: str, serial: int | None = None) -> Client:
    """A file client (EC P-256) with a clientAuth certificate from the test
    CA; ``serial`` picks its serial number."""
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = pki.ca.issue(pub, name)
    if serial is not None:  # the same certificate with another serial, signed again
        builder = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(cert.issuer)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(cert.not_valid_before_utc)
            .not_valid_after(cert.not_valid_after_utc)
        )
        for ext in cert.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        cert = builder.sign(pki.ca.key, hashes.SHA256())
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return Client(cert, cert_file, key_file)


@pytest.fixture
def client(pki: Pki, tmp_path: Path) -> Client:
    return make_client(pki, tmp_path, "curl-client")


def make_crl(pki: Pki, revoked: list[x509.Certificate], last_update: datetime.datetime) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.cert.subject)
        .last_update(last_update)
        .next_update(last_update + datetime.timedelta(days=1))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.key.public_key()), critical=False)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(last_update).build()
        )
    return builder.sign(pki.ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def curl(pki: Pki, url: str, client: Client | None, *extra: str) -> subprocess.CompletedProcess[str]:
    need(shutil.which("curl") is not None, "curl is not installed (Debian: curl)")
    args = ["curl", "-sS", "--noproxy", "*", "--max-time", str(CURL_TIMEOUT), "--cacert", str(pki.ca_file), *extra]
    if client is not None:
        args += ["--cert", str(client.cert_file), "--key", str(client.key_file)]
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=CURL_TIMEOUT + 10)
    no_pin(proc.stdout, proc.stderr)
    return proc


def file_server_args(pki: Pki, *extra: str) -> list[str]:
    return ["--cert", str(pki.server_cert), "--key", str(pki.server_key), "--client-ca", str(pki.ca_file), *extra]


def assert_identity(doc: dict[str, Any], client: Client, pki: Pki, path: str) -> None:
    assert doc == {
        "subject": "CN=curl-client",
        "serial": client.serial,
        "issuer": "CN=mtls_engine test CA",
        "not_after": client.cert.not_valid_after_utc.isoformat(),
        "tls_version": "TLSv1.3",
        "path": path,
    }
    assert doc["subject"] == client.subject
    assert doc["issuer"] == pki.ca.cert.subject.rfc4514_string()
    assert int(doc["serial"], 16) == client.cert.serial_number


# -- accepted clients -------------------------------------------------------------


def test_curl_gets_its_identity(pki: Pki, client: Client) -> None:
    with serve(*file_server_args(pki)) as srv:
        proc = curl(pki, f"{srv.url}/who/am-i?x=1", client)
        assert proc.returncode == 0, proc.stderr + srv.log
        assert_identity(json.loads(proc.stdout), client, pki, "/who/am-i?x=1")
        srv.wait_for(r"^mtls_engine serve: 127\.0\.0\.1:\d+ CN=curl-client 'GET /who/am-i\?x=1 HTTP/1\.1' 200$")
        assert srv.stop() == 0
        assert srv.lines[-2] == "mtls_engine serve: stopped (SIGTERM)"
        assert srv.stdout == ""
    startup = srv.lines[0]
    assert startup == f"mtls_engine serve: listening on {srv.url}/ (client CAs: {pki.ca_file}, CRL: none)"


def test_a_failed_handshake_does_not_stop_the_server(pki: Pki, client: Client) -> None:
    with serve(*file_server_args(pki, "--verbose")) as srv:
        # Plain HTTP on the TLS port, a connection closed at once, and one
        # that never speaks (the server gives up on it after its timeout).
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                s.recv(100)
            except ConnectionResetError:  # closed with the request unread
                pass
        socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        try:
            srv.wait_for(r"^mtls_engine serve: connection from 127\.0\.0\.1:\d+: plain HTTP on this HTTPS port")
            # A silent client holds only its own thread.
            proc = curl(pki, f"{srv.url}/", client)
            assert proc.returncode == 0, proc.stderr + srv.log
            assert json.loads(proc.stdout)["subject"] == "CN=curl-client"
        finally:
            silent.close()
        assert srv.stop() == 0
    assert "Traceback" not in srv.log


def test_python_client_many_connections(pki: Pki, client: Client) -> None:
    """Connections in parallel, each its own handshake and thread."""
    with serve(*file_server_args(pki)) as srv:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.load_cert_chain(str(client.cert_file), str(client.key_file))
        results: list[dict[str, Any]] = []

        def get(i: int) -> None:
            conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=20)
            try:
                conn.request("GET", f"/n/{i}")
                resp = conn.getresponse()
                assert resp.status == 200
                results.append(json.loads(resp.read()))
            finally:
                conn.close()

        threads = [threading.Thread(target=get, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(r["path"] for r in results) == sorted(f"/n/{i}" for i in range(8))
        assert all(r["subject"] == "CN=curl-client" for r in results)
        # http.client hangs up without close_notify: that refuses nobody.
        time.sleep(0.5)
        assert not [line for line in srv.lines if " refused " in line], srv.log
        assert srv.stop(signal.SIGINT) == 0  # Ctrl-C: a clean stop too
        assert srv.lines[-2] == "mtls_engine serve: stopped (SIGINT)"
    assert "Traceback" not in srv.log and "KeyboardInterrupt" not in srv.log


# -- refused clients ----------------------------------------------------------------


def test_revoked_client_is_refused_and_logged(pki: Pki, client: Client, tmp_path: Path) -> None:
    other = make_client(pki, tmp_path, "still-valid")
    crl = tmp_path / "ca.crl"
    crl.write_bytes(make_crl(pki, [client.cert], now() - datetime.timedelta(minutes=1)))
    with serve(*file_server_args(pki, "--crl", str(crl))) as srv:
        assert srv.lines[0].endswith(f"(client CAs: {pki.ca_file}, CRL: {crl})")
        proc = curl(pki, f"{srv.url}/", client)
        assert proc.returncode != 0, proc.stdout
        assert proc.stdout == ""
        # TLS 1.3: the client's handshake is over when the server refuses, so
        # curl learns it at its first read (exit 56) -- and only because the
        # server lets it read the alert before closing (else: exit 55/56,
        # "getpeername() failed" or "Connection reset by peer").
        assert "alert certificate revoked" in proc.stderr, proc.stderr
        line = srv.wait_for(r"^mtls_engine serve: refused .*revoked.*").group(0)
        assert client.subject in line and f"serial {client.serial}" in line
        assert re.match(r"^mtls_engine serve: refused client 127\.0\.0\.1:\d+ \(CN=curl-client, serial [0-9a-f]+\): "
                        r"revoked — ", line), line  # fmt: skip
        assert len([x for x in srv.lines if x.startswith("mtls_engine serve: refused")]) == 1
        # TLS 1.2: the refusal ends the handshake itself (curl exit 35).
        mark = srv.mark()
        proc = curl(pki, f"{srv.url}/", client, "--tls-max", "1.2")
        assert proc.returncode == 35 and "alert certificate revoked" in proc.stderr, proc.stderr
        assert f"serial {client.serial}): revoked" in srv.wait_for(r"^mtls_engine serve: refused .*", start=mark)[0]
        # Revocation is per certificate: another client of the same CA gets in.
        ok = curl(pki, f"{srv.url}/", other)
        assert ok.returncode == 0, ok.stderr + srv.log
        assert json.loads(ok.stdout)["subject"] == "CN=still-valid"
        assert srv.stop() == 0


def test_client_without_certificate_is_refused(pki: Pki, client: Client) -> None:
    with serve(*file_server_args(pki)) as srv:
        proc = curl(pki, f"{srv.url}/", None)
        assert proc.returncode != 0, proc.stdout
        assert "alert certificate required" in proc.stderr, proc.stderr
        line = srv.wait_for(r"^mtls_engine serve: refused .*").group(0)
        assert "no_certificate" in line, line
        # ... and the server goes on serving.
        ok = curl(pki, f"{srv.url}/", client)
        assert ok.returncode == 0, ok.stderr + srv.log
        assert srv.stop() == 0


def test_client_of_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    from mtls_engine._softhsm import CA

    stranger_cert, stranger_key = CA.create("some other CA").issue_client_files(tmp_path, "stranger")
    with serve(*file_server_args(pki)) as srv:
        stranger = Client(x509.load_pem_x509_certificate(stranger_cert.read_bytes()), stranger_cert, stranger_key)
        proc = curl(pki, f"{srv.url}/", stranger)
        assert proc.returncode != 0
        assert "alert unknown ca" in proc.stderr, proc.stderr
        line = srv.wait_for(r"^mtls_engine serve: refused .*").group(0)
        assert "unknown_ca" in line and "CN=stranger" in line, line
        assert srv.stop() == 0


def test_allow_list(pki: Pki, client: Client, tmp_path: Path) -> None:
    other = make_client(pki, tmp_path, "not-on-the-list")
    with serve(*file_server_args(pki, "--allow", f"serial:{client.serial}", "dns:nobody.example")) as srv:
        assert curl(pki, f"{srv.url}/", client).returncode == 0, srv.log
        assert curl(pki, f"{srv.url}/", other).returncode != 0
        line = srv.wait_for(r"^mtls_engine serve: refused .*").group(0)
        assert "not_allowed" in line and "CN=not-on-the-list" in line, line
        assert srv.stop() == 0


# -- what the client is told, what the log says ---------------------------------------


def test_client_ca_names_and_no_ca_names(pki: Pki, client: Client) -> None:
    need(shutil.which("openssl") is not None, "the openssl command is not installed (Debian: openssl)")
    (cn,) = pki.ca.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    with serve(*file_server_args(pki)) as srv:
        for tls in ("1.2", "1.3"):
            names = ca_names_seen(srv.port, tls, pki.ca_file, client.cert_file, client.key_file)
            assert names is not None and len(names) == 1 and names[0].endswith(str(cn.value)), names
        assert srv.stop() == 0
    with serve(*file_server_args(pki, "--no-ca-names")) as srv:
        for tls in ("1.2", "1.3"):
            assert ca_names_seen(srv.port, tls, pki.ca_file, client.cert_file, client.key_file) is None
        assert srv.stop() == 0
    assert not [line for line in srv.lines if " refused " in line], srv.log


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    need(shutil.which("openssl") is not None, "the openssl command is not installed (Debian: openssl)")
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def hang_up_mid_handshake(port: int, version: ssl.TLSVersion) -> None:
    """Send a ClientHello, read the server's answer, hang up (what a browser
    does with the connections it drops while it picks a certificate)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(client_hello(version))
        assert raw.recv(65536)


def plain_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            s.recv(100)
        except ConnectionResetError:  # closed with the request unread
            pass


def test_connections_that_are_no_refusal_are_named(pki: Pki, client: Client, tmp_path: Path) -> None:
    """With --verbose, each connection that ends without a certificate
    decision gets one line naming what it was (alert names, no exception
    text, never "refused"); a refusal is still one "refused" line."""
    from mtls_engine._softhsm import CA

    stranger_cert, stranger_key = CA.create("some other CA").issue_client_files(tmp_path, "stranger")
    me = ["-cert", str(client.cert_file), "-key", str(client.key_file)]
    with serve(*file_server_args(pki, "--verbose")) as srv:

        def named(what: str, mark: int) -> None:
            srv.wait_for(rf"^mtls_engine serve: connection from 127\.0\.0\.1:\d+: {re.escape(what)}$", start=mark)

        mark = srv.mark()
        socket.create_connection(("127.0.0.1", srv.port), timeout=10).close()  # a port check
        named("closed without a TLS handshake", mark)
        mark = srv.mark()
        plain_http(srv.port)
        named("plain HTTP on this HTTPS port (the client should use https://)", mark)
        mark = srv.mark()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as other:  # another protocol
            other.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            other.recv(100)
        named("not a TLS handshake (the client's first bytes are no ClientHello)", mark)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            mark = srv.mark()
            hang_up_mid_handshake(srv.port, version)
            named("the client hung up during the TLS handshake", mark)
        mark = srv.mark()
        old = s_client(srv.port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-CAfile", str(pki.ca_file), *me)
        assert old.returncode != 0
        named("no TLS version in common (sent alert protocol_version)", mark)
        mark = srv.mark()
        assert s_client(srv.port, "-tls1_2", "-cipher", "AES128-SHA", "-CAfile", str(pki.ca_file), *me).returncode != 0
        named("no cipher suite in common (sent alert handshake_failure)", mark)
        mark = srv.mark()
        proc = s_client(srv.port, "-tls1_3", "-CAfile", str(pki.other_ca_file), "-verify_return_error", *me)
        assert proc.returncode != 0
        named("the client ended the handshake with alert unknown_ca (it does not accept this server's certificate)",
              mark)  # fmt: skip
        # A certificate decision is still a refusal, with its reason: one line.
        stranger = Client(x509.load_pem_x509_certificate(stranger_cert.read_bytes()), stranger_cert, stranger_key)
        assert curl(pki, f"{srv.url}/", stranger).returncode != 0
        srv.wait_for(r"^mtls_engine serve: refused client 127\.0\.0\.1:\d+ \(CN=stranger, serial \w+\): unknown_ca ")
        assert curl(pki, f"{srv.url}/", client).returncode == 0, srv.log
        srv.wait_for(r"^mtls_engine serve: 127\.0\.0\.1:\d+ CN=curl-client 'GET / HTTP/1\.1' 200$")
        assert srv.stop() == 0
    body = srv.lines[1:-2]  # between "listening" and "stopped"
    assert len([line for line in body if ": connection from " in line]) == 8, srv.log
    assert [line for line in body if " refused " in line] == [line for line in body if "stranger" in line], srv.log
    assert len([line for line in body if " refused " in line]) == 1, srv.log
    for bad in ("Error", "[SSL", "Errno", "errno", "_ssl.c", "TLS alert", "handshake_failed"):
        assert bad not in srv.log, srv.log
    peers = [re.search(r"127\.0\.0\.1:(\d+)", line) for line in body]
    ports = [m.group(1) for m in peers if m]
    assert len(ports) == len(body) and len(set(ports)) == len(ports), srv.log  # at most one line per connection


def test_without_verbose_only_refusals_and_requests_are_logged(pki: Pki, client: Client) -> None:
    with serve(*file_server_args(pki)) as srv:
        mark = srv.mark()
        socket.create_connection(("127.0.0.1", srv.port), timeout=10).close()
        plain_http(srv.port)
        hang_up_mid_handshake(srv.port, ssl.TLSVersion.TLSv1_3)
        assert curl(pki, f"{srv.url}/", client, "--tls-max", "1.2", "--ciphers", "AES128-SHA").returncode != 0
        assert curl(pki, f"{srv.url}/", None).returncode != 0
        srv.wait_for(r"^mtls_engine serve: refused client 127\.0\.0\.1:\d+: no_certificate — ", start=mark)
        assert curl(pki, f"{srv.url}/", client).returncode == 0, srv.log
        srv.wait_for(r"^mtls_engine serve: 127\.0\.0\.1:\d+ CN=curl-client 'GET / HTTP/1\.1' 200$", start=mark)
        assert srv.stop() == 0
    assert len(srv.lines[mark:]) == 4, srv.log  # the refusal, the request, "stopped", <EOF>


# -- CRL reload ---------------------------------------------------------------------


def test_sighup_reloads_the_crl_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    # A serial whose first byte is 0x01: its hex has no leading zero, in the
    # JSON answer and in the refusal line alike.
    client = make_client(pki, tmp_path, "curl-client", serial=0x0123456789ABCDEF0123)
    assert client.serial == "123456789abcdef0123"
    crl = tmp_path / "ca.crl"
    first = now() - datetime.timedelta(minutes=2)
    crl.write_bytes(make_crl(pki, [], first))
    with serve(*file_server_args(pki, "--crl", str(crl))) as srv:
        pid = srv.proc.pid
        ok = curl(pki, f"{srv.url}/", client)
        assert ok.returncode == 0, ok.stderr + srv.log
        assert json.loads(ok.stdout)["serial"] == client.serial

        # A broken CRL is refused on reload; the old one stays in force.
        crl.write_bytes(b"not a CRL\n")
        mark = srv.mark()
        srv.proc.send_signal(signal.SIGHUP)
        line = srv.wait_for(r"^mtls_engine serve: CRL not reloaded: ", start=mark).group(0)
        assert curl(pki, f"{srv.url}/", client).returncode == 0, srv.log
        assert line.count("\n") == 0

        crl.write_bytes(make_crl(pki, [client.cert], first + datetime.timedelta(minutes=1)))
        mark = srv.mark()
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(rf"^mtls_engine serve: reloaded 1 CRL\(s\) from {re.escape(str(crl))}$", start=mark)
        proc = curl(pki, f"{srv.url}/", client)
        assert proc.returncode != 0, proc.stdout
        line = srv.wait_for(r"^mtls_engine serve: refused .*", start=mark).group(0)
        assert "revoked" in line and client.subject in line and client.serial in line, line
        assert srv.proc.pid == pid and srv.proc.poll() is None
        assert srv.stop() == 0


# -- the server key on the token ----------------------------------------------------------


def test_server_key_on_the_token(pki: Pki, client: Client, tmp_path: Path, backend: str) -> None:
    token_cert = x509.load_pem_x509_certificate(pki.cert_file(KeyKind.P256).read_bytes())
    pub = token_cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    server_cert = pki.ca.issue(pub, "localhost", client=False, dns_names=("localhost", "127.0.0.1"))
    cert_file = tmp_path / "token-server.pem"
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pin_file = tmp_path / "pin"
    pin_file.write_text(TEST_PIN)  # no newline
    args = ["--cert", str(cert_file), "--key", pki.key_uri(KeyKind.P256), "--client-ca", str(pki.ca_file),
            "--module", pki.module, "--pin-source", f"file:{pin_file}", "--backend", backend]  # fmt: skip
    with serve(*args) as srv:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.load_cert_chain(str(client.cert_file), str(client.key_file))
        for _ in range(3):  # each connection signed by the token
            conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=20)
            try:
                conn.request("GET", "/token")
                resp = conn.getresponse()
                body = resp.read()
                sock = conn.sock
                assert isinstance(sock, ssl.SSLSocket)
                der = sock.getpeercert(binary_form=True)
            finally:
                conn.close()
            assert resp.status == 200, body
            assert_identity(json.loads(body), client, pki, "/token")
            assert der == server_cert.public_bytes(serialization.Encoding.DER)
        proc = curl(pki, f"{srv.url}/curl", client)
        assert proc.returncode == 0, proc.stderr + srv.log
        assert_identity(json.loads(proc.stdout), client, pki, "/curl")
        srv.wait_for(r"'GET /curl HTTP/1\.1' 200$")  # the log line may reach this reader after the answer
        assert len([line for line in srv.lines if " 200" in line]) == 4
        assert not [line for line in srv.lines if " refused " in line], srv.log
        assert srv.stop() == 0, srv.log


# -- start-up errors ----------------------------------------------------------------


def test_missing_client_ca_is_a_usage_error(pki: Pki) -> None:
    proc = run_cli("serve", "--cert", str(pki.server_cert), "--key", str(pki.server_key), "--port", "0")
    assert proc.returncode == 2
    assert "--client-ca" in proc.stderr


def test_key_file_without_cert_is_a_usage_error(pki: Pki) -> None:
    proc = run_cli("serve", "--key", str(pki.server_key), "--client-ca", str(pki.ca_file), "--port", "0")
    assert proc.returncode == 2
    assert "--cert is needed" in proc.stderr


def test_bad_allow_entry_is_a_usage_error(pki: Pki) -> None:
    proc = run_cli("serve", *file_server_args(pki, "--allow", "serial:xyz", "--port", "0"))
    assert proc.returncode == 2
    assert "hexadecimal" in proc.stderr


def test_garbage_crl_fails_at_start(pki: Pki, tmp_path: Path) -> None:
    crl = tmp_path / "garbage.crl"
    crl.write_bytes(os.urandom(200))
    proc = run_cli("serve", *file_server_args(pki, "--crl", str(crl), "--port", "0"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("mtls_engine: CrlError: "), proc.stderr
    assert str(crl) in proc.stderr
    assert "listening" not in proc.stderr


def test_port_in_use_fails_at_start(pki: Pki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = run_cli("serve", *file_server_args(pki, "--port", str(port)))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"mtls_engine: OSError: cannot listen on https://127.0.0.1:{port}/: "), proc.stderr
    assert "--port" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_client_ca_fails_at_start(pki: Pki, tmp_path: Path) -> None:
    proc = run_cli("serve", "--cert", str(pki.server_cert), "--key", str(pki.server_key),
                   "--client-ca", str(tmp_path / "missing.pem"), "--port", "0")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("mtls_engine: ConfigError: "), proc.stderr


def test_wrong_token_pin_source_fails_at_start(pki: Pki, tmp_path: Path) -> None:
    missing = f"file:{tmp_path / 'no-such-pin'}"
    proc = run_cli("serve", "--key", pki.key_uri(KeyKind.P256), "--client-ca", str(pki.ca_file),
                   "--module", pki.module, "--pin-source", missing, "--port", "0")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("mtls_engine: "), proc.stderr
    assert "listening" not in proc.stderr
