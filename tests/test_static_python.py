"""Pythons with OpenSSL built in (uv's python-build-standalone), against a
stand-in built by ``ci/build_static_python.sh``: CPython whose ``_ssl`` is
part of libpython, linked with the static libssl.a/libcrypto.a and
``-Wl,--exclude-libs,ALL``.

On demand: these tests run when ``MTLS_STATIC_PYTHON`` names that
interpreter and skip otherwise, in CI too (the build needs CPython's source,
which CI does not download; docs/support.md).  The same decisions are
tested without the stand-in in tests/test_interpreter.py.

What they measure is the stock route, which needs no symbol of the
interpreter's OpenSSL: ``OPENSSL_CONF`` naming the openssl.cnf that
``python -m mtls_engine config --backend provider`` writes and a URI PEM
key file from ``uri-pem`` (both run with a normal Python), then an
unmodified ``ctx.load_cert_chain(cert, "key.uri.pem")`` in the stand-in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtls_engine._softhsm import KeyKind

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
            f"on demand: {STATIC_ENV} names no interpreter (build one with ci/build_static_python.sh; "
            "docs/support.md, 'Pythons with OpenSSL built in')"
        )
    # Named but unusable is a mistake, not a reason to skip.
    assert os.access(path, os.X_OK), f"{STATIC_ENV}={path} is not an executable"
    return path


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
ctx.load_cert_chain(cert, key)
with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"hello")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
print(json.dumps({"client": tls.version(), "server": json.loads(data)}))
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


def run_stock_client(
    python: str, env: dict[str, str], cert: Path, key: Path, port: int, ca: Path, version: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    # -I: no PYTHONPATH, no user site, so no mtls_engine; stdin from
    # /dev/null and a new session (no controlling terminal): a prompt for
    # the PIN could neither be shown nor answered.
    return subprocess.run(
        [python, "-I", "-c", STOCK_CLIENT, str(ca), str(cert), str(key), str(port), version],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("kind", [KeyKind.RSA2048, KeyKind.P256, KeyKind.P384], ids=lambda k: k.name)
def test_stock_route_signs_on_the_token(
    static_python: str, route: Stock, echo: EchoServer, kind: KeyKind, version: str
) -> None:
    """The handshake is signed by the card: the server sees the card's
    certificate (it verifies the CertificateVerify against it), over the
    TLS version asked for, and the process exits 0."""
    need_backend("provider")
    env = route.env("provider", "provider")
    proc = run_stock_client(static_python, env, route.pki.cert_file(kind), route.key_pem(kind), echo.port,
                            route.pki.ca_file, version, route.dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    label = CARD_KEYS[kind].label
    assert seen == {"client": version.replace("_", "."), "server": {
        "subject": f"commonName=card-holder {label}", "version": version.replace("_", ".")}}  # fmt: skip
    assert route.pki.card1.pin not in proc.stdout + proc.stderr


def test_stock_route_without_the_provider_is_not_the_card(static_python: str, route: Stock, echo: EchoServer) -> None:
    """The control: without OPENSSL_CONF the built-in OpenSSL cannot read
    the URI PEM, so a passing test above is pkcs11-provider's doing."""
    need_backend("provider")
    env = {k: v for k, v in route.env("provider", "provider").items() if k != "OPENSSL_CONF"}
    kind = KeyKind.P256
    proc = run_stock_client(static_python, env, route.pki.cert_file(kind), route.key_pem(kind), echo.port,
                            route.pki.ca_file, "TLSv1_3", route.dir)  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.splitlines()[-1].startswith("ssl.SSLError:"), proc.stderr[-2000:]


def test_stock_route_with_a_wrong_pin_tries_the_token_once(
    static_python: str, route: Stock, echo: EchoServer, spy: str, tmp_path: Path
) -> None:
    """A wrong PIN in the config's pin-source file: one C_Login, the key
    does not load (ssl.SSLError from load_cert_chain), no prompt, exit 1."""
    need_backend("provider")
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("31415926")
    wrong.chmod(0o600)
    cnf = tmp_path / "openssl.cnf"
    mtls(["config", "--module", spy, "--backend", "provider", "--pin-source", f"file:{wrong}", "-o", str(cnf)])
    log = tmp_path / "spy.log"
    env = {**route.env("provider", "provider"), "OPENSSL_CONF": str(cnf), "PKCS11SPY": route.pki.module,
           "PKCS11SPY_OUTPUT": str(log)}  # fmt: skip
    kind = KeyKind.P256
    proc = run_stock_client(static_python, env, route.pki.cert_file(kind), route.key_pem(kind), echo.port,
                            route.pki.ca_file, "TLSv1_3", tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.splitlines()[-1].startswith("ssl.SSLError:"), proc.stderr[-2000:]
    assert count_calls(log, "C_Login") == 1
    assert route.pki.card1.pin not in proc.stdout + proc.stderr


IMPORT = """
try:
    import mtls_engine
except Exception as exc:
    print(type(exc).__name__)
    print(exc)
else:
    print("imported")
"""


def test_import_refuses_the_stand_in_and_names_uv(static_python: str) -> None:
    """``import mtls_engine`` in the stand-in, from this source tree: refused
    before the extension is loaded (it could not be: no cffi there)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([static_python, "-c", IMPORT], capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          cwd=str(ROOT))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    name, message = proc.stdout.splitlines()[:2]
    assert name == "InterpreterSslError", proc.stdout
    assert "python-build-standalone" in message and "uv" in message, message
