"""Pythons with OpenSSL built in (uv's python-build-standalone), against such
an interpreter (or a stand-in of the same shape: CPython whose ``_ssl`` is
part of libpython, linked with the static libssl.a/libcrypto.a and its
symbols hidden).

On demand: these tests run when ``MTLS_STATIC_PYTHON`` names that
interpreter and skip otherwise, in CI too (CI has no such interpreter;
docs/support.md).  The same decisions are
tested without the stand-in in tests/test_interpreter.py.

What they measure is the stock route, which needs no symbol of the
interpreter's OpenSSL: ``OPENSSL_CONF`` naming the openssl.cnf that
``python -m mtls_engine config --backend provider`` writes and a URI PEM
key file from ``uri-pem`` (run with a normal Python), then an unmodified
``ctx.load_cert_chain(cert, "key.uri.pem")`` in the stand-in; and what
mtls_engine itself does there (its commands work, ``load_card_key``
refuses, naming uv).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtls_engine._config import SELECTOR_ENV
from mtls_engine._softhsm import KeyKind, TokenStore

from .conftest import CARD_KEYS, Pki, need
from .helpers import ROOT, count_calls
from .servers import EchoServer, echo_server, server_context
from .test_stock_clients import Stock, mtls, need_backend

STATIC_ENV = "MTLS_STATIC_PYTHON"
TIMEOUT = 60


@pytest.fixture(scope="module")
def static_python() -> str:
    """The stand-in interpreter; the test skips (in CI too) when it is not named."""
    path = os.environ.get(STATIC_ENV)
    if not path:
        pytest.skip(
            f"on demand: {STATIC_ENV} names no interpreter (a uv-managed Python, or one built the same way; "
            "docs/support.md, 'Pythons with OpenSSL built in')"
        )
    # Named but unusable is a mistake, not a reason to skip.
    assert os.access(path, os.X_OK), f"{STATIC_ENV}={path} is not an executable"
    return path


@pytest.fixture(params=["stand-in", "this-python"])
def python(request: pytest.FixtureRequest) -> str:
    """The stock route's interpreter: the stand-in (on demand) and, in every
    run, the Python running the tests (whose _ssl links the shared OpenSSL):
    what the recipe promises holds for both."""
    if request.param == "stand-in":
        return str(request.getfixturevalue("static_python"))
    return sys.executable


def _libpython(python: str) -> Path:
    out = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_config_var('INSTSONAME') or '')"],
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    ).stdout.strip()  # fmt: skip
    return Path(python).resolve().parent.parent / "lib" / out


def test_the_stand_in_has_openssl_built_in_with_hidden_symbols(static_python: str) -> None:
    """The shape of python-build-standalone: _ssl built into libpython, no
    shared libssl/libcrypto loaded, no OpenSSL symbol exported."""
    need(shutil.which("nm") is not None, "nm (Debian: binutils) lists exported symbols")
    code = (
        "import _ssl, ssl\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(hasattr(_ssl, '__file__'), 'libssl.so' in maps or 'libcrypto.so' in maps, ssl.OPENSSL_VERSION)"
    )
    proc = subprocess.run([static_python, "-I", "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    has_file, shared_loaded, version = proc.stdout.strip().split(" ", 2)
    assert (has_file, shared_loaded) == ("False", "False"), proc.stdout
    assert version.startswith("OpenSSL "), version
    libpython = _libpython(static_python)
    assert libpython.exists(), libpython
    exported = subprocess.run(
        ["nm", "-D", "--defined-only", str(libpython)], capture_output=True, text=True, timeout=TIMEOUT, check=True
    ).stdout
    assert "PyRun_SimpleString" in exported  # nm did list libpython's exports
    openssl = [ln for ln in exported.splitlines() if re.search(r" (SSL|OPENSSL|OpenSSL|EVP|ERR|CRYPTO)_\w+$", ln)]
    assert openssl == []


# An unmodified program: nothing but the stdlib and the environment.
STOCK_CLIENT = """
import json, socket, ssl, sys
ca, cert, key, port, version = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[version]
if len(sys.argv) > 6:  # the recipe's password="": never a prompt
    ctx.load_cert_chain(cert, key, password=sys.argv[6])
else:
    ctx.load_cert_chain(cert, key)
with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        version = tls.version()
        tls.sendall(b"hello")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
print(json.dumps({"client": version, "server": json.loads(data)}))
"""


@pytest.fixture(scope="module")
def echo(pki: Pki) -> Iterator[EchoServer]:
    """A server that requires a client certificate and answers with its subject."""
    with echo_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as srv:
        yield srv


@pytest.fixture(scope="module")
def route(pki: Pki, echo: EchoServer, tmp_path_factory: pytest.TempPathFactory) -> Stock:
    """The stock route's files (openssl.cnf with a PIN file, URI PEMs),
    written by a normal Python as tests/test_stock_clients.py does."""
    work = tmp_path_factory.mktemp("static-route")
    pin_file = work / "pin"
    pin_file.write_text(pki.card1.pin)
    pin_file.chmod(0o600)
    return Stock(pki, work, pin_file, echo.port)


def client_args(
    python: str, cert: Path, key: Path, ca: Path, port: int, version: str, password: str | None
) -> list[str]:
    """The stock client's command line; -I: no PYTHONPATH, no user site, so no mtls_engine."""
    args = [python, "-I", "-c", STOCK_CLIENT, str(ca), str(cert), str(key), str(port), version]
    return args if password is None else [*args, password]


def card_args(python: str, route: Stock, kind: KeyKind, port: int, version: str, password: str | None) -> list[str]:
    """The client with card1's key ``kind`` and its certificate."""
    pki = route.pki
    return client_args(python, pki.cert_file(kind), route.key_pem(kind), pki.ca_file, port, version, password)


def run_stock_client(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The client with stdin from /dev/null in a new session (no controlling
    terminal): a prompt for the PIN can be neither shown nor answered."""
    return subprocess.run(
        args, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("password", [None, ""], ids=["unmodified", "password-empty"])
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("kind", [KeyKind.RSA2048, KeyKind.P256, KeyKind.P384], ids=lambda k: k.name)
def test_stock_route_signs_on_the_token(
    python: str, route: Stock, echo: EchoServer, kind: KeyKind, version: str, password: str | None
) -> None:
    """The handshake is signed by the card: the server sees the card's
    certificate (it verifies the CertificateVerify against it), over the
    TLS version asked for, and the process exits 0.  pkcs11-provider runs
    in the interpreter's own OpenSSL (inside the stand-in) while linking
    the system's libcrypto."""
    need_backend("provider")
    env = route.env("provider", "provider")
    proc = run_stock_client(card_args(python, route, kind, echo.port, version, password), env, route.dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    label = CARD_KEYS[kind].label
    tls = version.replace("_", ".")
    assert seen == {"client": tls, "server": {"subject": f"commonName=card-holder {label}", "version": tls}}
    assert proc.stderr == ""
    assert route.pki.card1.pin not in proc.stdout


def test_stock_route_without_the_provider_is_not_the_card(python: str, route: Stock, echo: EchoServer) -> None:
    """The control: without OPENSSL_CONF the interpreter's OpenSSL cannot
    read the URI PEM, so a passing test above is pkcs11-provider's doing."""
    need_backend("provider")
    env = {k: v for k, v in route.env("provider", "provider").items() if k != "OPENSSL_CONF"}
    proc = run_stock_client(card_args(python, route, KeyKind.P256, echo.port, "TLSv1_3", None), env, route.dir)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.splitlines()[-1].startswith("ssl.SSLError:"), proc.stderr[-2000:]


@dataclass
class WrongPin:
    """A token of its own (failed logins leave flags on a token that other
    tests read), its key's URI PEM and certificate, and the environment of
    a stock client whose openssl.cnf has a pin-source file with a wrong PIN
    and the module behind pkcs11-spy (log: ``log``)."""

    cert: Path
    key: Path
    env: dict[str, str]
    log: Path


@pytest.fixture
def wrong_pin(pki: Pki, spy: str, tmp_path: Path) -> WrongPin:
    need_backend("provider")
    store = TokenStore.create(tmp_path / "softhsm")
    token = store.init_token("wrongpin", pin=pki.card1.pin)
    pub = token.generate_key(KeyKind.P256, "ec256", "02")
    token.store_certificate(pki.ca.issue(pub, "card-holder wrongpin"), "ec256", "02", tmp_path)
    key = tmp_path / "key.pem"
    mtls(["uri-pem", token.uri(object="ec256", type="private"), "-o", str(key)])
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("31415926")
    wrong.chmod(0o600)
    cnf = tmp_path / "openssl.cnf"
    mtls(["config", "--module", spy, "--backend", "provider", "--pin-source", f"file:{wrong}", "-o", str(cnf)])
    log = tmp_path / "spy.log"
    env = {**os.environ, **store.env, "OPENSSL_CONF": str(cnf), "PKCS11SPY": store.module,
           "PKCS11SPY_OUTPUT": str(log)}  # fmt: skip
    env.pop(SELECTOR_ENV, None)
    return WrongPin(tmp_path / "wrongpin-ec256-02.pem", key, env, log)


@pytest.mark.parametrize("password", [None, ""], ids=["unmodified", "password-empty"])
def test_stock_route_with_a_wrong_pin_and_no_terminal(
    python: str, pki: Pki, echo: EchoServer, wrong_pin: WrongPin, tmp_path: Path, password: str | None
) -> None:
    """A wrong PIN in the pin-source file, no terminal: the token sees one
    C_Login and the process exits 1.  Unmodified, OpenSSL and
    pkcs11-provider then ask for the PIN on the console (nobody can
    answer; load_cert_chain ends in an OSError); with password="" nothing
    is asked and load_cert_chain raises ssl.SSLError."""
    args = client_args(python, wrong_pin.cert, wrong_pin.key, pki.ca_file, echo.port, "TLSv1_3", password)
    proc = run_stock_client(args, wrong_pin.env, tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert count_calls(wrong_pin.log, "C_Login") == 1
    last = proc.stderr.splitlines()[-1]
    if password is None:
        assert "Enter PEM pass phrase:" in proc.stderr and "Enter PIN for PKCS#11 Token" in proc.stderr
        assert last.startswith("OSError:"), proc.stderr[-2000:]
    else:
        assert "Enter" not in proc.stderr, proc.stderr[-2000:]
        # ssl.SSLError; CPython 3.11 reports the same failure as FileNotFoundError
        assert last.startswith(("ssl.SSLError:", "FileNotFoundError:")), proc.stderr[-2000:]
    assert pki.card1.pin not in proc.stdout + proc.stderr


def answer_prompts(args: list[str], env: dict[str, str], cwd: Path, answer: str) -> tuple[int, str]:
    """Run ``args`` on a terminal of its own (a pty that is its controlling
    terminal) and type ``answer`` at each PIN or pass phrase prompt; the
    exit status and everything it wrote there."""
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(cwd),
                            preexec_fn=controlling_terminal)  # fmt: skip
    os.close(slave)
    seen, pending = b"", b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], TIMEOUT)
            assert ready, f"no output for {TIMEOUT} s: {seen[-2000:]!r}"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            pending += chunk
            if re.search(rb"(PIN|pass phrase)[^\n]*:\s*$", pending):
                os.write(master, answer.encode() + b"\n")
                pending = b""
    finally:
        os.close(master)
        status = proc.wait(TIMEOUT)
    return status, seen.decode(errors="replace")


def test_stock_route_with_a_wrong_pin_on_a_terminal(
    python: str, pki: Pki, echo: EchoServer, wrong_pin: WrongPin, tmp_path: Path
) -> None:
    """Measured hazard of the unmodified route: after the pin-source PIN
    failed, the console prompt's answer goes to the token, and OpenSSL
    tries that one answer more than once (the decoders share it), so one
    mistyped PIN costs several tries of a card's retry counter.  With
    password="" there is no prompt and the token sees one C_Login."""
    args = client_args(python, wrong_pin.cert, wrong_pin.key, pki.ca_file, echo.port, "TLSv1_3", None)
    status, seen = answer_prompts(args, wrong_pin.env, tmp_path, "11111111")
    assert status == 1, seen[-2000:]
    assert "Enter PEM pass phrase:" in seen
    assert count_calls(wrong_pin.log, "C_Login") > 2, seen[-2000:]  # the file's PIN, then the typed one, repeated

    wrong_pin.log.unlink()
    status, seen = answer_prompts([*args, ""], wrong_pin.env, tmp_path, "11111111")
    assert status == 1, seen[-2000:]
    assert "Enter" not in seen, seen[-2000:]
    assert count_calls(wrong_pin.log, "C_Login") == 1


IMPORT = """
import sys
try:
    import mtls_engine
except Exception as exc:
    print(type(exc).__name__)
    print(exc)
    print("binding loaded:", "mtls_engine._binding" in sys.modules)
else:
    print("imported")
"""


def test_import_without_the_extension_names_uv(static_python: str, tmp_path: Path) -> None:
    """``import mtls_engine`` from this source tree in the bare stand-in (no
    cffi, so the extension cannot load): the refusal names uv and says what
    works instead; ``python -m mtls_engine`` says it in one line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([static_python, "-c", IMPORT], capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    name, message, loaded = proc.stdout.splitlines()
    assert name == "InterpreterSslError", proc.stdout
    assert message.startswith(
        "this Python has OpenSSL built in: its ssl module (built into the interpreter) loads no shared "
        "libssl/libcrypto, as in the Pythons uv installs (python-build-standalone)"
    ), message
    assert "UV_PYTHON_PREFERENCE=only-system" in message and "password=''" in message
    assert message.endswith("(and the C extension cannot be loaded: No module named '_cffi_backend')"), message
    assert loaded == "binding loaded: False"
    cmd = subprocess.run([static_python, "-m", "mtls_engine", "check"], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env, cwd=str(tmp_path))  # fmt: skip
    assert cmd.returncode == 1
    assert cmd.stderr.splitlines() == [f"mtls_engine: error: {message}"]


SITE_ENV = "MTLS_STATIC_PYTHON_SITE"

USE = """
import ssl, sys
import mtls_engine
print("binding loaded:", "mtls_engine._binding" in sys.modules)
try:
    mtls_engine.load_card_key(ssl.create_default_context(), sys.argv[1], module=sys.argv[2], pin=sys.argv[3])
except mtls_engine.Error as exc:
    print(type(exc).__name__, exc)
"""


def test_commands_and_refusal_on_the_stand_in(
    static_python: str, route: Stock, echo: EchoServer, tmp_path: Path
) -> None:
    """With the package's dependencies for the stand-in on its path
    (MTLS_STATIC_PYTHON_SITE, docs/support.md): the extension loads, linked
    to the system's OpenSSL; config, uri-pem, list and check work and exit
    0; load_card_key refuses before logging in; check --connect fails its
    handshake step with the same refusal."""
    site = os.environ.get(SITE_ENV)
    if not site:
        pytest.skip(f"on demand: {SITE_ENV} names no folder with cffi and cryptography for the stand-in")
    need_backend("provider")
    pki = route.pki
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), site])}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([static_python, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env,
                              cwd=str(tmp_path))  # fmt: skip

    key = pki.key_uri(KeyKind.P256)
    proc = run("-c", USE, key, pki.module, pki.card1.pin)
    assert proc.returncode == 0, proc.stderr
    loaded, refusal = proc.stdout.splitlines()
    assert loaded == "binding loaded: True"
    assert refusal.startswith("InterpreterSslError this Python has OpenSSL built in"), refusal
    assert pki.card1.pin not in proc.stdout + proc.stderr

    proc = run("-m", "mtls_engine", "uri-pem", key, "-o", str(tmp_path / "key.pem"))
    assert proc.returncode == 0, proc.stderr
    cnf = tmp_path / "card.cnf"
    proc = run("-m", "mtls_engine", "config", "--module", pki.module, "--backend", "provider", "--pin-source",
               f"file:{route.pin_file}", "-o", str(cnf))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run("-m", "mtls_engine", "list", "--module", pki.module, "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"label": "card1"' in proc.stdout

    # What the stand-in wrote serves the stock route in the stand-in.
    env_route = {**route.env("provider", "provider"), "OPENSSL_CONF": str(cnf)}
    args = card_args(static_python, route, KeyKind.P256, echo.port, "TLSv1_3", "")
    args[args.index(str(route.key_pem(KeyKind.P256)))] = str(tmp_path / "key.pem")
    proc = run_stock_client(args, env_route, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["server"]["subject"] == "commonName=card-holder ec256"

    check = ["-m", "mtls_engine", "check", "--module", pki.module, "--pin-source", f"file:{route.pin_file}",
             "--key", key, "--json"]  # fmt: skip
    proc = run(*check)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    assert {k for k, st in steps.items() if st["status"] != "ok"} == {"openssl", "connect"}, steps
    assert steps["openssl"]["status"] == "warn" and steps["openssl"]["facts"]["same_library"] is False
    proc = run(*check, "--connect", f"localhost:{echo.port}", "--cafile", str(pki.ca_file))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    connect = json.loads(proc.stdout)["steps"][-1]
    assert connect["status"] == "fail" and connect["facts"]["error"] == "InterpreterSslError", connect
