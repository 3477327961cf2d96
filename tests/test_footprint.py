"""What mtls_engine costs a process besides its card key: the modules
``import mtls_engine`` loads, and where pkcs11-provider lives (never in
OpenSSL's default library context, where it would take part in every
certificate decoding of the process)."""

from __future__ import annotations

import json
import socket
import sys
from types import FrameType
from typing import Any

import mtls_engine
from mtls_engine._backends import provider_status
from mtls_engine._softhsm import KeyKind

from .conftest import Pki, need
from .helpers import run_python
from .servers import echo_server, server_context, talk

IMPORT_ONLY = """
import json, sys
import mtls_engine
print(json.dumps(sorted(sys.modules)))
"""

# Loaded on first use only: certificate parsing, the server side, the
# command line, the integrations, the checks.
DEFERRED = (
    "cryptography",
    "mtls_engine._api",
    "mtls_engine._server",
    "mtls_engine._serve",
    "mtls_engine._cli",
    "mtls_engine._check",
    "mtls_engine._inject",
    "mtls_engine._backends",
    "mtls_engine.aio",
    "mtls_engine.requests_adapter",
)


def test_import_loads_neither_cryptography_nor_the_server_cli_or_integrations() -> None:
    proc = run_python(IMPORT_ONLY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert "mtls_engine._lib" in loaded  # the interpreter checks still run at import
    early = [m for m in loaded if any(m == d or m.startswith(d + ".") for d in DEFERRED)]
    assert early == []


EVERY_NAME = """
import json, sys
import mtls_engine
from mtls_engine import *  # noqa: F403
missing = [n for n in mtls_engine.__all__ if n not in globals()]
listed = [n for n in mtls_engine.__all__ if n not in dir(mtls_engine)]
try:
    mtls_engine.no_such_name
except AttributeError as exc:
    unknown = str(exc)
print(json.dumps({"missing": missing, "listed": listed, "unknown": unknown,
                  "server_context": mtls_engine.server_context.__module__,
                  "reconnect": mtls_engine.reconnect.__module__}))
"""


def test_every_public_name_still_works() -> None:
    proc = run_python(EVERY_NAME)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out == {
        "missing": [],
        "listed": [],
        "unknown": "module 'mtls_engine' has no attribute 'no_such_name'",
        "server_context": "mtls_engine._server",
        "reconnect": "mtls_engine._reconnect",
    }


PROVIDER_CONTEXT = """
import json, os, ssl
import mtls_engine
from mtls_engine._backends import PROVIDER
from mtls_engine._lib import ffi, lib
from tests.servers import echo_server, server_context, talk

E = os.environ
card = mtls_engine.client_context(E["T_URI"], cafile=E["T_CA"], module=E["T_MODULE"], pin=E["T_PIN"],
                                  backend="provider")
# A file key in the same process, in the default library context.
files = ssl.create_default_context(cafile=E["T_CA"])
files.load_cert_chain(E["T_SCERT"], E["T_SKEY"])
out = {}
with echo_server(server_context(E["T_SCERT"], E["T_SKEY"], E["T_CA"])) as srv:
    out["card"] = talk(card, srv.port)["subject"]
out["default"] = bool(lib.mtls_provider_loaded(ffi.NULL, PROVIDER.NAME.encode()))
out["own"] = bool(lib.mtls_provider_loaded(PROVIDER.libctx, PROVIDER.NAME.encode()))
print(json.dumps(out))
"""


def test_the_provider_stays_out_of_the_default_library_context(pki: Pki) -> None:
    """pkcs11-provider is loaded into a library context of its own: the
    card key still signs (and the server authenticates it) in a context of
    the default library context, where the provider is not loaded."""
    need(provider_status()[0], provider_status()[1])
    proc = run_python(
        PROVIDER_CONTEXT,
        env={"T_URI": pki.key_uri(KeyKind.P256), "T_CA": str(pki.ca_file), "T_MODULE": pki.module,
             "T_PIN": pki.card1.pin, "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "card": "commonName=card-holder ec256",
        "default": False,
        "own": True,
    }


def test_a_successful_card_handshake_runs_no_python_of_mtls_engine_but_its_wrapper(pki: Pki, backend: str) -> None:
    """The success path of a card-key handshake is the token's signature and
    nothing else: the C callbacks note a failure; mtls_engine's Python runs
    only when one happened.  Per handshake: the socket class's do_handshake
    (which empties the error queue), and no other function of mtls_engine."""
    ctx = mtls_engine.client_context(
        key=pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module, pin=pki.card1.pin, backend=backend
    )
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and "mtls_engine" in frame.f_code.co_filename:
            calls.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")

    with echo_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as srv:
        assert talk(ctx, srv.port)["subject"] == "commonName=card-holder ec256"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
            sys.setprofile(profile)  # this thread only: the server's thread is not watched
            try:
                tls = ctx.wrap_socket(raw, server_hostname="localhost")
            finally:
                sys.setprofile(None)
            with tls:
                tls.sendall(b"hello")
                assert tls.recv(4096)
    assert calls == ["_reconnect.py:do_handshake"]
