"""Card-holders in application servers: uvicorn (Starlette), hypercorn,
gunicorn (Flask, pre-fork workers) and aiohttp.web, each run in its own
process from the files of docs/servers.md as they stand, with the server key
in a PEM file and on a SoftHSM2 token.  Real requests: httpx with a client
key file and an mtls_engine card-key client, TLS 1.2 and 1.3.  Refused
clients (revoked, no certificate) never reach the app and the reason is in
the server's log; a CRL replaced while the server runs (SIGHUP) revokes the
next connection; gunicorn's workers each use the token key, their C_Login
calls counted through the PKCS#11 shim."""

from __future__ import annotations

import datetime
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import mtls_engine
from mtls_engine._softhsm import CA, KeyKind

from . import p11shim
from .appservers import SERVERS, Running, command, free_port, start, write_snippets
from .conftest import BACKEND_STATUS, SHIM_PIN, TEST_PIN, Pki, ShimCard, need, need_backend
from .helpers import ROOT, run_python

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


_NEEDS = {"uvicorn": ("uvicorn", "starlette"), "hypercorn": ("hypercorn",), "gunicorn": ("gunicorn", "flask"),
          "aiohttp": ("aiohttp",)}  # fmt: skip


def need_server(server: str) -> None:
    missing = [m for m in _NEEDS[server] if not _have(m)]
    need(not missing, f"{server} test needs {', '.join(missing)} (pip install 'mtls_engine[{server}]')")


def client_ctx(ca: Path, version: str, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def get(running: Running, ctx: ssl.SSLContext, *, http2: bool = False, path: str = "/whoami") -> Any:
    """One request on a new connection (so a new handshake), as JSON."""
    with httpx.Client(verify=ctx, http2=http2, timeout=20) as client:
        r = client.get(running.url(path), extensions={"sni_hostname": "localhost"})
        r.raise_for_status()
        return r.json()


def refused(running: Running, ctx: ssl.SSLContext, path: str) -> bool:
    """Whether the request is refused before any HTTP answer."""
    try:
        with httpx.Client(verify=ctx, timeout=20) as client:
            client.get(running.url(path), extensions={"sni_hostname": "localhost"})
    except httpx.TransportError:
        return True
    return False


def expected_identity(cert_file: Path) -> dict[str, Any]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return {"subject": cert.subject.rfc4514_string(), "serial": f"{cert.serial_number:x}",
            "issuer": cert.issuer.rfc4514_string(), "not_after": cert.not_valid_after_utc.isoformat(),
            "san": []}  # fmt: skip


def answer_of(running: Running, doc: dict[str, Any]) -> dict[str, Any]:
    """The identity part of an answer (gunicorn's also names its worker)."""
    return {k: v for k, v in doc.items() if k != "worker"}


def wait_until(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@dataclass
class Clients:
    good: tuple[Path, Path]
    revoked: tuple[Path, Path]
    later: tuple[Path, Path]  # revoked while the server runs
    expired: tuple[Path, Path]
    stranger: tuple[Path, Path]  # issued by a CA the servers do not trust
    crl: Path


@pytest.fixture(scope="module")
def clients(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Clients:
    work = tmp_path_factory.mktemp("appserver-clients")
    good = pki.ca.issue_client_files(work, "app client")
    revoked = pki.ca.issue_client_files(work, "revoked client")
    later = pki.ca.issue_client_files(work, "later revoked")
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = pki.ca.issue_client_files(work, "expired client", not_before=now - datetime.timedelta(days=30),
                                        not_after=now - datetime.timedelta(days=1))  # fmt: skip
    stranger = CA.create("a CA nobody trusts").issue_client_files(work, "stranger")
    crl = work / "crl.pem"
    crl.write_bytes(pki.ca.crl([x509.load_pem_x509_certificate(revoked[0].read_bytes())]))
    return Clients(good, revoked, later, expired, stranger, crl)


@pytest.fixture(scope="module")
def card_contexts(pki: Pki) -> dict[str, ssl.SSLContext]:
    """Card-key clients (card1's P-256 key), one per TLS version."""
    out = {}
    for version in VERSIONS:
        ctx = mtls_engine.client_context(key=pki.key_uri(KeyKind.P256), cafile=str(pki.ca_file), module=pki.module,
                                         pin=TEST_PIN)  # fmt: skip
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
        out[version] = ctx
    return out


def server_env(pki: Pki, crl: Path, where: str, token_server_cert: Path) -> dict[str, str]:
    """The servers' environment; ``where``: "file", or the backend of a key on card2 ("engine", "provider")."""
    env = {"CLIENT_CA": str(pki.ca_file), "CRL": str(crl), "MTLS_ENGINE_MODULE": pki.module,
           "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]}  # fmt: skip
    if where == "file":
        env.update(SERVER_CERT=str(pki.server_cert), SERVER_KEY=str(pki.server_key))
    else:
        need_backend(where)
        env.update(SERVER_CERT=str(token_server_cert), SERVER_KEY=pki.key_uri(KeyKind.P256, pki.card2),
                   SERVER_PIN=pki.card2.pin, SERVER_BACKEND=where)  # fmt: skip
    return env


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.stop()


@pytest.mark.parametrize("where", ["file", "engine", "provider"])
@pytest.mark.parametrize("server", SERVERS)
def test_card_holders_in_the_app(
    server: str, where: str, pki: Pki, clients: Clients, card_contexts: dict[str, ssl.SSLContext],
    token_server_cert: Path, tmp_path: Path, running: list[Running],
) -> None:  # fmt: skip
    need_server(server)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(clients.crl.read_bytes())
    srv = start(server, tmp_path / server, server_env(pki, crl, where, token_server_cert))
    running.append(srv)
    for version in VERSIONS:
        file_client = client_ctx(pki.ca_file, version, *clients.good)
        answers = [get(srv, file_client), get(srv, card_contexts[version])]
        if server == "hypercorn":  # no identity for the app (docs/servers.md): the TLS layer admitted both
            assert answers == [{"http_version": "1.1", "tls": False}] * 2
            assert get(srv, file_client, http2=True) == {"http_version": "2", "tls": False}
        else:
            assert answer_of(srv, answers[0]) == expected_identity(clients.good[0])
            assert answer_of(srv, answers[1]) == expected_identity(pki.cert_file(KeyKind.P256))
        # refused by the TLS layer, the reason logged, the app never asked
        assert refused(srv, client_ctx(pki.ca_file, version, *clients.revoked), f"/revoked-{version}")
        assert refused(srv, client_ctx(pki.ca_file, version), f"/anonymous-{version}")
    assert refused(srv, client_ctx(pki.ca_file, "1.3", *clients.expired), "/expired")
    assert refused(srv, client_ctx(pki.ca_file, "1.3", *clients.stranger), "/stranger")
    if server != "hypercorn":  # concurrent connections of two card-holders: each request sees its own
        pairs = [(client_ctx(pki.ca_file, "1.3", *clients.good), expected_identity(clients.good[0])),
                 (card_contexts["1.3"], expected_identity(pki.cert_file(KeyKind.P256)))] * 4  # fmt: skip
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda pair: answer_of(srv, get(srv, pair[0])), pairs))
        assert got == [want for _, want in pairs]
    assert wait_until(lambda: srv.output().count(": revoked — ") >= 2 and srv.output().count(": no_certificate") >= 2)
    out = srv.output()
    assert "(CN=revoked client, serial " in out, out[-3000:]
    assert wait_until(lambda: ": expired — " in srv.output() and ": unknown_ca — " in srv.output())
    assert re.search(r"\(CN=expired client, serial [0-9a-f]+\): expired — ", srv.output())
    assert re.search(r"\(CN=stranger, serial [0-9a-f]+\): unknown_ca — ", srv.output())
    # the access log shows the requests the app answered, and none of the refused ones
    out = srv.output()
    assert out.count("/whoami") >= 4, out[-3000:]
    assert not re.search(r"/(revoked|anonymous|expired|stranger)", out), out[-3000:]
    assert pki.card2.pin not in out


@pytest.mark.parametrize("server", SERVERS)
def test_a_replaced_crl_revokes_the_next_connection(
    server: str, pki: Pki, clients: Clients, token_server_cert: Path, tmp_path: Path, running: list[Running]
) -> None:
    need_server(server)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(clients.crl.read_bytes())
    srv = start(server, tmp_path / server, server_env(pki, crl, "file", token_server_cert))
    running.append(srv)
    later = client_ctx(pki.ca_file, "1.3", *clients.later)
    get(srv, later)  # accepted under the first CRL
    revoked = [x509.load_pem_x509_certificate(p.read_bytes()) for p in (clients.revoked[0], clients.later[0])]
    crl.write_bytes(pki.ca.crl(revoked))
    os.kill(srv.proc.pid, signal.SIGHUP)
    refusal = re.compile(r"\(CN=later revoked, serial [0-9a-f]+\): revoked — ")
    assert wait_until(lambda: refused(srv, later, "/after-reload") and bool(refusal.search(srv.output()))), (
        srv.output()[-3000:]
    )
    assert refused(srv, later, "/after-reload")
    assert srv.proc.poll() is None  # no restart
    # a broken CRL file: logged, the CRLs of before stay in force, the server stays up
    crl.write_text("not a CRL")
    os.kill(srv.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "CRL not reloaded (the CRLs loaded before stay in force): " in srv.output())
    assert "holds no readable CRL" in srv.output()
    assert refused(srv, later, "/after-bad-crl")
    assert srv.proc.poll() is None
    get(srv, client_ctx(pki.ca_file, "1.3", *clients.good))  # others still served


# -- gunicorn's pre-fork workers with the server key on the token --------------------------


@pytest.fixture(scope="module")
def shim_server_cert(pki: Pki, shim_card: ShimCard, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A localhost server certificate for the shim card's P-256 key (the
    card's own certificate is a client one)."""
    proc = subprocess.run(["pkcs11-tool", "--module", shim_card.store.module, "--token-label", shim_card.token.label,
                           "--read-object", "--type", "cert", "--label", "ec256"],
                          capture_output=True, env={**os.environ, **shim_card.store.env}, check=True)  # fmt: skip
    pub = x509.load_der_x509_certificate(proc.stdout).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = pki.ca.issue(pem, "localhost", client=False, dns_names=("localhost",))
    path = tmp_path_factory.mktemp("shim-server") / "server.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _logins(log: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for pid, name, rv, _ in p11shim.read_log_pids(log):
        if name == "C_Login":
            out.setdefault(pid, []).append(rv)
    return out


CKR_GENERAL_ERROR = 0x5


@pytest.mark.parametrize("backend_name", ["engine", "provider"])
def test_gunicorn_workers_sign_with_the_token_key(
    backend_name: str, pki: Pki, shim_card: ShimCard, shim_server_cert: Path, clients: Clients, tmp_path: Path,
    running: list[Running],
) -> None:  # fmt: skip
    need_server("gunicorn")
    need_backend(backend_name)
    env = {**shim_card.env(tmp_path / "shim"), "CLIENT_CA": str(pki.ca_file), "CRL": str(clients.crl),
           "MTLS_ENGINE_MODULE": str(shim_card.shim), "SERVER_CERT": str(shim_server_cert),
           "SERVER_KEY": shim_card.key_uri, "SERVER_PIN": SHIM_PIN, "SERVER_BACKEND": backend_name}  # fmt: skip
    srv = start("gunicorn", tmp_path / "gunicorn", env)
    running.append(srv)
    ctx = client_ctx(pki.ca_file, "1.3", *clients.good)
    workers: set[int] = set()
    with ThreadPoolExecutor(6) as pool:
        for _ in range(15):  # concurrent connections spread over the (one request at a time) workers
            answers = list(pool.map(lambda _: get(srv, ctx), range(6)))
            assert all(answer_of(srv, a) == expected_identity(clients.good[0]) for a in answers)
            workers |= {a["worker"] for a in answers}
            if len(workers) == 3:
                break
    assert len(workers) == 3, workers
    signers = {pid for pid, name, _, rest in p11shim.read_log_pids(env["MTLS_SHIM_LOG"])
               if name in ("C_Sign", "C_SignFinal") and "query" not in rest.split()}  # fmt: skip
    assert signers == workers  # each worker signed its handshakes with the token key; the master none
    logins = _logins(env["MTLS_SHIM_LOG"])
    assert logins.pop(srv.proc.pid) == [0], logins  # the master: one login
    if backend_name == "engine":  # SoftHSM2 keeps the master's login in every worker
        assert logins == {}, logins
    else:  # pkcs11-provider initialises the module again in each worker: one login each
        assert set(logins) == workers, (logins, workers)
        for rvs in logins.values():  # (CKR_GENERAL_ERROR: SoftHSM2 read its token file while another wrote it)
            assert rvs[-1] == 0 and all(rv == CKR_GENERAL_ERROR for rv in rvs[:-1]), logins
    assert SHIM_PIN not in srv.output()


# -- start-up checks ------------------------------------------------------------------------


def test_require_client_auth_names_what_is_wrong(pki: Pki) -> None:
    good = mtls_engine.server_context(pki.server_cert, pki.server_key, pki.ca_file)
    assert mtls_engine.require_client_auth(good) is good
    good.verify_mode = ssl.CERT_OPTIONAL
    with pytest.raises(mtls_engine.ClientAuthNotRequired, match=r"verify_mode is CERT_OPTIONAL.*server_context"):
        mtls_engine.require_client_auth(good)
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(mtls_engine.ClientAuthNotRequired, match=r"verify_mode is CERT_NONE"):
        mtls_engine.require_client_auth(plain)
    plain.verify_mode = ssl.CERT_REQUIRED
    with pytest.raises(mtls_engine.ClientAuthNotRequired, match=r"trusts no CA.*client_cafile="):
        mtls_engine.require_client_auth(plain)
    with pytest.raises(mtls_engine.ClientAuthNotRequired, match=r"client context"):
        mtls_engine.require_client_auth(ssl.create_default_context())
    with pytest.raises(mtls_engine.ClientAuthNotRequired, match=r"is NoneType, not an ssl.SSLContext"):
        mtls_engine.require_client_auth(None)


@pytest.mark.parametrize("server", SERVERS)
def test_a_context_without_client_auth_stops_the_server_at_start(
    server: str, pki: Pki, clients: Clients, token_server_cert: Path, tmp_path: Path
) -> None:
    """The framework (or its user) resets verify_mode: the server exits at start-up with the named error."""
    need_server(server)
    folder = tmp_path / server
    write_snippets(folder)
    # card_server.py makes the context every server takes: reset it there.
    with open(folder / "card_server.py", "a") as f:
        f.write("ctx.verify_mode = __import__('ssl').CERT_OPTIONAL  # what a framework's default would do\n")
    env = {**os.environ, **server_env(pki, clients.crl, "file", token_server_cert), "PORT": str(free_port())}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(command(server), cwd=folder, env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "ClientAuthNotRequired" in out and "verify_mode is CERT_OPTIONAL" in out, out[-3000:]


def test_gunicorn_without_certfile_stops_at_start(
    pki: Pki, clients: Clients, token_server_cert: Path, tmp_path: Path
) -> None:
    """gunicorn serves plain HTTP when certfile is empty: the on_starting check stops it."""
    need_server("gunicorn")
    folder = tmp_path / "gunicorn"
    write_snippets(folder)
    with open(folder / "gunicorn.conf.py", "a") as f:
        f.write("certfile = None  # forgotten\n")
    env = {**os.environ, **server_env(pki, clients.crl, "file", token_server_cert), "PORT": str(free_port()),
           "XDG_RUNTIME_DIR": str(folder)}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(command("gunicorn"), cwd=folder, env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "ClientAuthNotRequired: gunicorn would serve plain HTTP to anyone: its certfile setting is empty" in out


def test_the_helpers_refuse_the_servers_own_tls_settings(pki: Pki) -> None:
    need_server("uvicorn")
    need_server("hypercorn")
    from mtls_engine.appservers import hypercorn_config, uvicorn_config

    ctx = mtls_engine.server_context(pki.server_cert, pki.server_key, pki.ca_file)
    with pytest.raises(mtls_engine.ConfigError, match=r"drop ssl_certfile, ssl_cert_reqs \(the mtls_engine context"):
        uvicorn_config(object(), ctx, ssl_certfile=str(pki.server_cert), ssl_cert_reqs=ssl.CERT_NONE)
    with pytest.raises(mtls_engine.ConfigError, match=r"drop certfile, verify_mode \(the mtls_engine context"):
        hypercorn_config(ctx, certfile=str(pki.server_cert), verify_mode=ssl.CERT_NONE)
    with pytest.raises(mtls_engine.ConfigError, match=r"hypercorn's Config has no setting 'bnid'"):
        hypercorn_config(ctx, bnid=["127.0.0.1:0"])
    config = hypercorn_config(ctx, bind=["127.0.0.1:0"])
    assert config.ssl_enabled and config.create_ssl_context() is ctx


def _memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake in memory; returns the server's side."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", c), ("s", srv)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    return srv


@pytest.mark.parametrize("version", VERSIONS)
def test_tls_extension_of_a_connection(pki: Pki, clients: Clients, version: str) -> None:
    from mtls_engine.appservers import tls_extension

    server = mtls_engine.server_context(pki.server_cert, pki.server_key, pki.ca_file)
    client = client_ctx(pki.ca_file, version, *clients.good)
    ext = tls_extension(_memory_handshake(server, client))
    pem = x509.load_pem_x509_certificate(clients.good[0].read_bytes()).public_bytes(serialization.Encoding.PEM)
    assert ext["client_cert_chain"][0] == pem.decode()
    assert ext["client_cert_name"] == "CN=app client"
    assert ext["tls_version"] == {"1.2": 0x0303, "1.3": 0x0304}[version]
    assert isinstance(ext["cipher_suite"], int)
    tls13_suites = {0x1301, 0x1302, 0x1303}  # RFC 8446 B.4
    assert (ext["cipher_suite"] in tls13_suites) == (version == "1.3"), ext["cipher_suite"]
    assert ext["server_cert"] is None and ext["client_cert_error"] is None


def test_client_identity_of_a_connection_without_certificate(pki: Pki) -> None:
    server = mtls_engine.server_context(pki.server_cert, pki.server_key, pki.ca_file)
    server.verify_mode = ssl.CERT_OPTIONAL  # what a framework's own setting would do
    conn = _memory_handshake(server, client_ctx(pki.ca_file, "1.3"))
    with pytest.raises(mtls_engine.NoClientCertificate, match="does not require one"):
        mtls_engine.client_identity(conn)


def test_client_identity_from_each_form(pki: Pki, clients: Clients) -> None:
    pem = clients.good[0].read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    want = expected_identity(clients.good[0])
    for form in (pem, pem.decode(), der, cert, [pem.decode()], (der,)):
        assert mtls_engine.client_identity(form) == want
    with pytest.raises(mtls_engine.NoClientCertificate, match="chain is empty"):
        mtls_engine.client_identity([])
    with pytest.raises(mtls_engine.NoClientCertificate, match="no client certificate"):
        mtls_engine.client_identity(None)
    with pytest.raises(mtls_engine.CertificateError, match="cannot be read"):
        mtls_engine.client_identity(b"not a certificate")
    assert "dns:localhost" in mtls_engine.client_identity(pki.server_cert.read_bytes())["san"]


def test_the_core_imports_no_server() -> None:
    proc = run_python(
        "import sys, mtls_engine\n"
        "print(sorted(m for m in ('uvicorn', 'hypercorn', 'gunicorn', 'flask', 'starlette', 'aiohttp', "
        "'mtls_engine.appservers') if m in sys.modules))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_gunicorn_gthread_worker_gives_the_identity(
    pki: Pki, clients: Clients, token_server_cert: Path, tmp_path: Path, running: list[Running]
) -> None:
    """The threaded worker wraps its connections with the same hook; environ["gunicorn.socket"] is TLS too."""
    need_server("gunicorn")
    env = {
        **server_env(pki, clients.crl, "file", token_server_cert),
        "GUNICORN_CMD_ARGS": "--worker-class gthread --threads 2",
    }
    srv = start("gunicorn", tmp_path / "gunicorn", env)
    running.append(srv)
    assert answer_of(srv, get(srv, client_ctx(pki.ca_file, "1.3", *clients.good))) == expected_identity(clients.good[0])
    assert refused(srv, client_ctx(pki.ca_file, "1.2", *clients.revoked), "/revoked")
    assert wait_until(lambda: "(CN=revoked client, serial " in srv.output())
    assert "Using worker: gthread" in srv.output()


@pytest.mark.slow
def test_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/appservers.py, one tiny round: a row per server, file and token side by side (no timing checked)."""
    for server in SERVERS:
        need_server(server)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "appservers.py"), "--rounds", "1", "--batch", "2"],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| server")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(SERVERS), proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| server"))
    available = [b for b in ("engine", "provider") if BACKEND_STATUS[b]()[0]]
    assert available and "key in a file" in header, header
    assert all(f"token, {b} (/s)" in header for b in available), header
