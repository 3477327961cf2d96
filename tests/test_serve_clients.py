"""``python -m mtls_engine serve`` as clients nobody here wrote see it:
gnutls-cli and openssl s_client (TLS 1.2 and 1.3, a file key or a card key)
get the whole answer in one TLS record, two requests on one connection, then
the server's close_notify, and no reset; 100 clients at once are all served
from a listen backlog that holds them."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mtls_engine
from mtls_engine._softhsm import KeyKind

from .conftest import TEST_PIN, Pki, need, need_backend
from .helpers import ROOT
from .test_serve import Client, Serve, file_server_args, make_client, no_pin, serve

TOOL_TIMEOUT = 60
VERSIONS = ("TLSv1.2", "TLSv1.3")
# Two HTTP/1.1 requests on one connection; the second asks the server to close it.
TWO_REQUESTS = (
    "GET /first HTTP/1.1\r\nHost: localhost\r\n\r\nGET /second HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
)


@dataclass
class KeySource:
    """A client's certificate and key, as the command line tools take them."""

    name: str
    subject: str
    cert: Path
    key: str  # a PEM file, or a pkcs11: URI (the token key)
    backend: str | None = None  # for s_client: how OpenSSL reaches the token key


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Serve]:
    with serve(*file_server_args(pki)) as srv:
        yield srv


@pytest.fixture(scope="module")
def file_client(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return make_client(pki, tmp_path_factory.mktemp("file-client"), "curl-client")


@pytest.fixture(scope="module")
def pin_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pin") / "pin"
    path.write_text(TEST_PIN)  # no newline: libp11's engine sends the whole file
    path.chmod(0o600)
    return path


def need_tool(name: str) -> None:
    need(shutil.which(name) is not None, f"the {name} command line tool (Debian: gnutls-bin, openssl)")


def token_source(pki: Pki) -> KeySource:
    kind = KeyKind.P256
    return KeySource("token", "CN=card-holder ec256", pki.cert_file(kind), pki.key_uri(kind))


def file_source(client: Client) -> KeySource:
    return KeySource("file", client.subject, client.cert_file, str(client.key_file))


def bodies(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def assert_two_answers(out: str, source: KeySource, version: str) -> None:
    """Both JSON answers are whole, in order, for this client and version
    (the tools make one connection: the server kept it open for the second)."""
    docs = bodies(out)
    assert [d["path"] for d in docs] == ["/first", "/second"], out
    assert all(d["subject"] == source.subject and d["tls_version"] == version for d in docs), docs


# -- gnutls-cli ---------------------------------------------------------------------------

GNUTLS_PRIORITY = {"TLSv1.2": "NORMAL:-VERS-ALL:+VERS-TLS1.2", "TLSv1.3": "NORMAL:-VERS-ALL:+VERS-TLS1.3"}


def gnutls_cli(pki: Pki, port: int, source: KeySource, version: str) -> subprocess.CompletedProcess[str]:
    args = ["gnutls-cli", "--priority", GNUTLS_PRIORITY[version], "--x509cafile", str(pki.ca_file),
            "--verify-hostname", "localhost", "--x509certfile", str(source.cert), "--x509keyfile", source.key,
            "--port", str(port), "127.0.0.1"]  # fmt: skip
    env = dict(os.environ)
    if source.name == "token":
        args[1:1] = ["--provider", pki.module]
        env["GNUTLS_PIN"] = TEST_PIN  # gnutls' tools read the token PIN from here: never in argv
    proc = subprocess.run(args, input=TWO_REQUESTS, capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=env)
    no_pin(proc.stdout, proc.stderr)
    return proc


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key", ["file", "token"])
def test_gnutls_cli_gets_both_answers_and_a_clean_close(
    pki: Pki, server: Serve, file_client: Client, key: str, version: str
) -> None:
    need_tool("gnutls-cli")
    source = file_source(file_client) if key == "file" else token_source(pki)
    proc = gnutls_cli(pki, server.port, source, version)
    out = proc.stdout + proc.stderr
    # Before the fix the server's reset cost the body: "*** Fatal error: Error
    # in the pull function. *** Server has terminated the connection abnormally."
    assert "terminated the connection abnormally" not in out and "Fatal error" not in out, out[-3000:]
    assert "- Peer has closed the GnuTLS connection" in out, out[-3000:]  # close_notify received
    assert proc.returncode == 0, out[-3000:]
    assert_two_answers(proc.stdout, source, version)


# -- openssl s_client ---------------------------------------------------------------------


def s_client_key_args(pki: Pki, source: KeySource, pin_file: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """s_client's key options and environment: a file key as it is; the
    token key through an openssl.cnf from ``python -m mtls_engine config``."""
    env = dict(os.environ)
    if source.backend is None:
        return ["-key", source.key], env
    need_backend(source.backend)
    cnf = work / f"openssl-{source.backend}.cnf"
    proc = subprocess.run(
        [sys.executable, "-m", "mtls_engine", "config", "--module", pki.module, "--backend", source.backend,
         "--pin-source", f"file:{pin_file}", "-o", str(cnf)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT, env={**env, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    env["OPENSSL_CONF"] = str(cnf)
    if source.backend == "engine":
        return ["-engine", "pkcs11", "-keyform", "engine", "-key", f"{source.key}?pin-source=file:{pin_file}"], env
    return ["-key", source.key], env


def s_client(pki: Pki, port: int, source: KeySource, version: str, key_args: list[str],
             env: dict[str, str]) -> subprocess.CompletedProcess[str]:  # fmt: skip
    flag = {"TLSv1.2": "-tls1_2", "TLSv1.3": "-tls1_3"}[version]
    proc = subprocess.run(
        ["openssl", "s_client", flag, "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(pki.ca_file), "-verify_return_error", "-cert", str(source.cert), *key_args,
         "-ign_eof", "-msg"],
        input=TWO_REQUESTS, capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=env,
    )  # fmt: skip
    no_pin(proc.stdout, proc.stderr)
    return proc


def assert_one_record_each(out: str) -> None:
    """In s_client's -msg trace (record headers and alerts as lines that
    start with <<< or >>>, the answers' text between them), each answer's
    status line, headers and body came in one TLS record."""
    lines = [line for line in out.splitlines() if not line.startswith((" ", "\t"))]
    starts = [i for i, line in enumerate(lines) if line.startswith("HTTP/1.1 200 OK")]
    assert len(starts) == 2, out[-3000:]
    for i in starts:
        end = next(j for j in range(i, len(lines)) if lines[j].startswith("{"))
        inside = [line for line in lines[i : end + 1] if line.startswith(("<<<", ">>>"))]
        assert inside == [], "an answer spread over more than one record:\n" + "\n".join(lines[i : end + 1])
        before = next(line for line in reversed(lines[:i]) if line.startswith("<<<"))
        assert "RecordHeader" in before or "InnerContent" in before, before


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key", ["file", "engine", "provider"])
def test_s_client_gets_both_answers_in_one_record_each_and_a_close_notify(
    pki: Pki, server: Serve, file_client: Client, pin_file: Path, tmp_path: Path, key: str, version: str
) -> None:
    need_tool("openssl")
    if key == "file":
        source = file_source(file_client)
    else:
        source = token_source(pki)
        source.backend = key
    key_args, env = s_client_key_args(pki, source, pin_file, tmp_path)
    proc = s_client(pki, server.port, source, version, key_args, env)
    out = proc.stdout + proc.stderr
    # Before the fix: "ssl3_read_n:unexpected eof while reading" (no close_notify).
    assert "unexpected eof" not in out, proc.stderr[-3000:]
    assert re.search(r"^<<< TLS 1\.[23], Alert \[length 0002\], warning close_notify$", proc.stdout, re.M), out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert_two_answers(proc.stdout, source, version)
    assert_one_record_each(proc.stdout)


# -- Python's ssl: close_notify, then a FIN, never a reset ------------------------------------


def file_context(pki: Pki, client: Client, version: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(str(client.cert_file), str(client.key_file))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[version.replace(".", "_")]
    return ctx


def read_answer(tls: ssl.SSLSocket) -> bytes:
    """One HTTP answer with a Content-Length, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)\r?$", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, data
        body += chunk
    assert len(body) == length
    return body


def end_of_stream(tls: ssl.SSLSocket) -> str:
    """What follows the answer: "close_notify then FIN" for a clean close;
    anything else names what came instead."""
    try:
        rest = tls.recv(65536)  # suppress_ragged_eofs=False: a bare TCP close raises
    except ssl.SSLEOFError:
        return "TCP closed without close_notify"
    except ConnectionResetError:
        return "reset"
    if rest:
        return f"more data: {rest!r}"
    try:
        raw = tls.unwrap()  # our close_notify; the server reads it, then closes
        raw.settimeout(10)
        tail = raw.recv(65536)
    except ConnectionResetError:
        return "close_notify then reset"
    return "close_notify then FIN" if tail == b"" else f"close_notify then {tail!r}"


@pytest.mark.parametrize("version", VERSIONS)
def test_python_client_keep_alive_then_close_notify_and_fin(
    pki: Pki, server: Serve, file_client: Client, version: str
) -> None:
    ctx = file_context(pki, file_client, version)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    with ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
        tls.sendall(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = json.loads(read_answer(tls))
        tls.sendall(b"GET /second HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        second = json.loads(read_answer(tls))
        assert end_of_stream(tls) == "close_notify then FIN"
    assert (first["path"], second["path"]) == ("/first", "/second")
    assert first["tls_version"] == second["tls_version"] == version


def test_client_data_after_the_last_request_is_read_not_reset(pki: Pki, server: Serve, file_client: Client) -> None:
    """A client that sends more after a "Connection: close" request (here,
    once the answer has come) still gets close_notify and a FIN: the server
    reads its data away instead of closing on it (the kernel would reset)."""
    ctx = file_context(pki, file_client)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    with ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
        tls.sendall(b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert json.loads(read_answer(tls))["path"] == "/last"
        tls.sendall(b"GET /too-late HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert end_of_stream(tls) == "close_notify then FIN"  # and no answer to the late request


# -- many clients at once -------------------------------------------------------------------


def listen_backlog(port: int) -> int:
    """The listening socket's backlog, as ss reports it (Send-Q of a
    listening socket)."""
    need(shutil.which("ss") is not None, "ss (Debian: iproute2) reads the listen backlog")
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=30).stdout
    fields = out.split()
    assert len(fields) >= 5 and fields[0] == "LISTEN", out
    return int(fields[2])


CLIENTS = 100


@pytest.mark.parametrize("key", ["file", "card"])
def test_a_hundred_clients_at_once_are_all_served(pki: Pki, server: Serve, file_client: Client, key: str) -> None:
    # socketserver's default backlog of 5 dropped the SYNs of a burst (the
    # clients waited for a retransmission, a second or more).
    assert listen_backlog(server.port) >= CLIENTS
    if key == "file":
        ctx = file_context(pki, file_client)
        subject = file_client.subject
    else:
        ctx = mtls_engine.client_context(key=pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                         pin=TEST_PIN)  # fmt: skip
        subject = "CN=card-holder ec256"
    barrier = threading.Barrier(CLIENTS)
    answers: dict[int, Any] = {}

    def get(i: int) -> None:
        conn = http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=60)
        try:
            barrier.wait(timeout=60)
            conn.request("GET", f"/many/{key}/{i}")
            resp = conn.getresponse()
            answers[i] = (resp.status, json.loads(resp.read()))
        except Exception as exc:  # reported below with the others
            answers[i] = exc
        finally:
            conn.close()

    threads = [threading.Thread(target=get, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    failed = {i: a for i, a in answers.items() if not (isinstance(a, tuple) and a[0] == 200)}
    assert not failed and len(answers) == CLIENTS, (failed, len(answers))
    assert sorted(a[1]["path"] for a in answers.values()) == sorted(f"/many/{key}/{i}" for i in range(CLIENTS))
    assert {a[1]["subject"] for a in answers.values()} == {subject}
