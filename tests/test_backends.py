"""Choosing and loading the backends: libp11's engine and pkcs11-provider."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

import mtls_engine
from mtls_engine._backends import choose, provider_status
from mtls_engine._softhsm import KeyKind

from .conftest import Pki, engine_api, need, need_backend
from .helpers import ROOT, run_python
from .servers import echo_server, server_context, talk


def test_auto_prefers_the_engine_and_says_why(pki: Pki, backend: str) -> None:
    need_backend("engine")
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    info = mtls_engine.load_card_key(ctx, pki.key_uri(KeyKind.P256), module=pki.module, pin=pki.card1.pin)
    assert info.backend == "engine"
    assert info.backend_reason.startswith("engine (auto: libp11's engine is available")
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    info = mtls_engine.load_card_key(
        ctx, pki.key_uri(KeyKind.P256), module=pki.module, pin=pki.card1.pin, backend=backend
    )
    assert (info.backend, info.backend_reason) == (backend, f"{backend} (asked for)")


def test_auto_falls_back_to_the_provider(pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    need(provider_status()[0], provider_status()[1])
    monkeypatch.setenv("MTLS_ENGINE_PKCS11_ENGINE", str(tmp_path / "no-engine.so"))
    name, reason = choose("auto")
    assert name == "provider"
    engine_why = "libp11's pkcs11 engine is not installed" if engine_api() else "this OpenSSL has no ENGINE API"
    assert reason.startswith(f"provider (auto: the engine is unavailable: {engine_why}")
    srv = server_context(pki.server_cert, pki.server_key, pki.ca_file)
    ctx = mtls_engine.client_context(key=pki.key_uri(KeyKind.P384), cafile=pki.ca_file, module=pki.module,
                                     pin=pki.card1.pin)  # fmt: skip
    with echo_server(srv) as s:
        assert talk(ctx, s.port)["subject"] == "commonName=card-holder ec384"


def test_backend_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MTLS_ENGINE_PKCS11_PROVIDER", str(tmp_path / "nothing.so"))
    monkeypatch.setenv("MTLS_ENGINE_PKCS11_ENGINE", str(tmp_path / "nothing-either.so"))
    with pytest.raises(mtls_engine.BackendUnavailable, match=r"backend 'provider' is unavailable: pkcs11-provider is "
                       r"not installed \(.*nothing.so does not exist\); install it"):  # fmt: skip
        choose("provider")
    engine_why = "libp11's pkcs11 engine" if engine_api() else "this OpenSSL has no ENGINE API"
    with pytest.raises(mtls_engine.BackendUnavailable, match=f"no backend is available; engine: {engine_why}"):
        choose("auto")


TWO_MODULES = """
import os, ssl, mtls_engine
for module in (os.environ["T_MODULE"], os.environ["T_OTHER"]):
    ctx = ssl.create_default_context()
    try:
        info = mtls_engine.load_card_key(ctx, os.environ["T_URI"], module=module, pin=os.environ["T_PIN"],
                                         backend="provider")
        print("loaded", info.backend)
    except mtls_engine.BackendUnavailable as exc:
        print("BackendUnavailable:", exc)
"""


def test_provider_serves_one_module_per_process(pki: Pki, spy: str) -> None:
    need(provider_status()[0], provider_status()[1])
    proc = run_python(
        TWO_MODULES,
        env={"T_MODULE": pki.module, "T_OTHER": spy, "T_URI": pki.key_uri(KeyKind.P256), "T_PIN": pki.card1.pin,
             "PKCS11SPY": pki.module, "PKCS11SPY_OUTPUT": os.devnull},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "loaded provider"
    assert lines[1] == (
        f"BackendUnavailable: pkcs11-provider already serves the PKCS#11 module {pki.module} in this process "
        f"and cannot serve a second one ({spy}); use backend='engine' for it, or one module that reaches every "
        "token (p11-kit-proxy.so)"
    )


CONTEXTS_FIRST = """
import os, ssl
# The contexts exist before mtls_engine (and so pkcs11-provider) is loaded.
contexts = {}
for uri in os.environ["T_URIS"].split(","):
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=os.environ["T_CA"])
        ctx.minimum_version = ctx.maximum_version = version
        contexts[(uri, version)] = ctx
srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

import mtls_engine
from mtls_engine._backends import PROVIDER
from mtls_engine._lib import ffi, lib
from tests.servers import echo_server, server_context, talk

assert PROVIDER.module is None and not lib.mtls_provider_loaded(ffi.NULL, PROVIDER.NAME.encode())
srv = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
with echo_server(srv) as s:
    for (uri, version), ctx in contexts.items():
        mtls_engine.load_card_key(ctx, uri, module=os.environ["T_MODULE"], pin=os.environ["T_PIN"],
                                  backend=os.environ["T_BACKEND"])
        answer = talk(ctx, s.port)
        print(answer["subject"], answer["version"])
print("done")
"""


def test_contexts_created_before_the_backend_was_loaded(pki: Pki, backend: str) -> None:
    """OpenSSL works out a context's signature algorithms when the context is
    made; contexts made before the provider was loaded must still offer the
    card key's algorithms (RSA-PSS for TLS 1.3, ECDSA)."""
    kinds = list(KeyKind)
    proc = run_python(
        CONTEXTS_FIRST,
        env={"T_URIS": ",".join(pki.key_uri(k) for k in kinds), "T_CA": str(pki.ca_file),
             "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key), "T_MODULE": pki.module,
             "T_PIN": pki.card1.pin, "T_BACKEND": backend},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [f"commonName=card-holder {label} {v}" for label in ("rsa2048", "ec256", "ec384")
                for v in ("TLSv1.2", "TLSv1.3")]  # fmt: skip
    assert proc.stdout.splitlines() == [*expected, "done"]


ENGINE_TWO_MODULES = """
import os, mtls_engine
from tests.servers import echo_server, server_context, talk

srv = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
contexts = [mtls_engine.client_context(os.environ["T_URI"], cafile=os.environ["T_CA"], module=module,
                                       pin=os.environ["T_PIN"], backend="engine")
            for module in (os.environ["T_MODULE"], os.environ["T_OTHER"])]
with echo_server(srv) as s:
    for ctx in contexts:
        print(talk(ctx, s.port)["subject"])
"""


def test_engine_serves_a_second_module_in_the_same_process(pki: Pki, spy: str, tmp_path: Path) -> None:
    """OpenSSL 3 lets one engine library back one ENGINE at a time (a second
    load of pkcs11.so fails with "init failed"): the second module's engine
    instance comes from a private copy of the library, and both sign."""
    need_backend("engine")
    proc = run_python(
        ENGINE_TWO_MODULES,
        env={"T_MODULE": pki.module, "T_OTHER": spy, "T_URI": pki.key_uri(KeyKind.P256), "T_PIN": pki.card1.pin,
             "PKCS11SPY": pki.module, "PKCS11SPY_OUTPUT": str(tmp_path / "spy.log"), "T_CA": str(pki.ca_file),
             "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key), "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["commonName=card-holder ec256"] * 2
    # The copy was removed once loaded.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spy.log"]


ENGINE_MODULE_THROUGH_MTLS = """
import ctypes, os, mtls_engine
from mtls_engine._backends import ENGINE
from mtls_engine._lib import BINDING_PATH, ffi, lib
from mtls_engine._reconnect import card_of
from tests.servers import echo_server, server_context, talk

def slots():
    s = ffi.new("int[4]")
    alive = lib.mtls_p11_slots(s, s + 1, s + 2, s + 3)
    return f"slots in use {s[0]} handed out {s[1]} unwrapped {s[2]} engines alive {alive}"

# Called by anyone but an engine that mtls_engine is starting, the
# extension is no PKCS#11 module: CKR_GENERAL_ERROR.
print("outside", ctypes.CDLL(BINDING_PATH).C_GetFunctionList(ctypes.byref(ctypes.c_void_p())))
# libp11 0.4.20 and later look C_GetInterface up through the same handle:
# the extension's own offers no interface (without it, the lookup finds
# libp11-kit.so.0's, p11-kit's proxy module, a new state per engine instance).
get_interface = ctypes.CDLL(BINDING_PATH).C_GetInterface
get_interface.restype = ctypes.c_ulong
interface = ctypes.c_void_p(1)
print("interface", get_interface(None, None, ctypes.byref(interface), 0), interface.value)
srv = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
ctx = mtls_engine.client_context(os.environ["T_URI"], cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                 pin=os.environ["T_PIN"], backend="engine")
print(slots())
with echo_server(srv) as s:
    print(talk(ctx, s.port)["subject"])
    for _ in range(int(os.environ["T_ROUNDS"])):  # a new engine instance each, the old one freed
        mtls_engine.reconnect(ctx)
        assert talk(ctx, s.port)["subject"] == "commonName=card-holder ec256"
    print(slots(), "libraries", ENGINE.libraries(), "reconnections", card_of(ctx).reconnections)
    print(talk(ctx, s.port)["subject"])
"""


def test_the_engine_reaches_its_module_through_mtls_engine(pki: Pki) -> None:
    """libp11 0.4.13 waits for ever when C_OpenSession fails (a lost token);
    so every engine instance gets the module's function list from
    mtls_engine's C_GetFunctionList, with C_OpenSession failures turned into
    one that libp11 gives up on (csrc/helper.c; tests/test_token_loss.py
    shows it with a token that goes away).  The wrapper slots (64) are
    given back when a retired instance is freed: 70 reconnections (more
    than 64) all get the changed list, and freeing the instances they
    retire (libp11 closes its sessions and finalises the module: on
    SoftHSM2, loaded directly, a module the whole process shares) leaves
    the current instance and mtls_engine's own sessions working.  Asked
    for a PKCS#11 3.x interface (libp11 0.4.20 and later ask), the
    extension offers none: the engine signs through the changed list."""
    need_backend("engine")
    rounds = 70
    proc = run_python(
        ENGINE_MODULE_THROUGH_MTLS,
        env={"T_MODULE": pki.module, "T_URI": pki.key_uri(KeyKind.P256), "T_PIN": pki.card1.pin,
             "T_CA": str(pki.ca_file), "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key),
             "T_ROUNDS": str(rounds)},
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "outside 5",  # CKR_GENERAL_ERROR
        "interface 84 None",  # CKR_FUNCTION_NOT_SUPPORTED
        "slots in use 1 handed out 1 unwrapped 0 engines alive 1",
        "commonName=card-holder ec256",
        # The first instance stays (the context holds its key); of the
        # others only the current one is left.  Three engine libraries:
        # libp11's own (the first instance), and two copies taking turns
        # (while a reconnection loads the new instance, the one it replaces
        # still holds the card's key).
        f"slots in use 2 handed out {rounds + 1} unwrapped 0 engines alive 2 libraries 3 reconnections {rounds}",
        "commonName=card-holder ec256",
    ]


ENGINE_RETIRED_KEY_IN_USE = """
import gc, os, mtls_engine
from mtls_engine._lib import ffi, lib
from mtls_engine._reconnect import _sign_test, card_of
from tests.servers import echo_server, server_context, talk

def alive():
    s = ffi.new("int[4]")
    return lib.mtls_p11_slots(s, s + 1, s + 2, s + 3)

srv = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
ctx = mtls_engine.client_context(os.environ["T_URI"], cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                 pin=os.environ["T_PIN"], backend="engine")
card = card_of(ctx)
mtls_engine.reconnect(ctx)
held = card._current_key()  # a reference to the second instance's key, as a connection in flight holds one
for _ in range(3):
    mtls_engine.reconnect(ctx)
print("alive while the key is held", alive(), "it signs", _sign_test(held))
with echo_server(srv) as s:
    print(talk(ctx, s.port)["subject"])
del held
gc.collect()
mtls_engine.reconnect(ctx)
print("alive once it is gone", alive())
with echo_server(srv) as s:
    print(talk(ctx, s.port)["subject"])
"""


def test_a_retired_engine_instance_lives_as_long_as_its_key(pki: Pki) -> None:
    """A reconnection retires the engine instance it replaces; one whose
    key is still held (here: a reference like a connection's) stays alive
    and signs, while the instances between it and the current one are
    freed; once the key is gone, the next reconnection frees it too."""
    need_backend("engine")
    proc = run_python(
        ENGINE_RETIRED_KEY_IN_USE,
        env={"T_MODULE": pki.module, "T_URI": pki.key_uri(KeyKind.P256), "T_PIN": pki.card1.pin,
             "T_CA": str(pki.ca_file), "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        # the first (the context's key), the second (held), the current
        "alive while the key is held 3 it signs True",
        "commonName=card-holder ec256",
        "alive once it is gone 2",
        "commonName=card-holder ec256",
    ]


NO_ENGINE_CHECK = """
import ssl, mtls_engine
from mtls_engine._backends import choose, engine_status
from mtls_engine._lib import ffi, lib
assert lib.MTLS_HAS_ENGINE == 0
print(engine_status())
try:
    mtls_engine.load_card_key(ssl.create_default_context(), "pkcs11:object=x", module="/nonexistent.so",
                              backend="engine")
except mtls_engine.BackendUnavailable as exc:
    print("BackendUnavailable:", exc)
try:
    print(choose("auto")[0])
except mtls_engine.BackendUnavailable as exc:
    print("BackendUnavailable:", exc)
"""


def test_build_without_engine_api(tmp_path: Path) -> None:
    """The extension builds and imports against an OpenSSL without ENGINE
    support (as OpenSSL 4): built here with MTLS_ENGINE_DISABLE_ENGINE, the
    compile-time guard the real case takes."""
    need(shutil.which("gcc") is not None or shutil.which("cc") is not None, "a C compiler")
    pkg = tmp_path / "mtls_engine"
    shutil.copytree(ROOT / "mtls_engine", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    build = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); import build; build.ffibuilder.compile(tmpdir=sys.argv[2])",
         str(ROOT / "csrc"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MTLS_ENGINE_DISABLE_ENGINE": "1"},
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert list(pkg.glob("_binding*.so")), sorted(p.name for p in pkg.iterdir())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_ENGINE_CHECK], capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "(False, 'this OpenSSL has no ENGINE API (OpenSSL 4, or built with no-engine)')"
    assert lines[1] == (
        "BackendUnavailable: backend 'engine' is unavailable: this OpenSSL has no ENGINE API "
        "(OpenSSL 4, or built with no-engine)"
    )
    if provider_status()[0]:
        assert lines[2] == "provider"
    else:
        assert lines[2].startswith("BackendUnavailable: no backend is available; engine: this OpenSSL has no ENGINE")
    # check: with no ENGINE API the provider is the only backend there can
    # be, so having only it is no warning.
    env.pop("MTLS_ENGINE_MODULE", None)
    check = subprocess.run([sys.executable, "-m", "mtls_engine", "check", "--json"], capture_output=True, text=True,
                           timeout=120, env=env, cwd=str(tmp_path))  # fmt: skip
    step = {s["id"]: s for s in json.loads(check.stdout)["steps"]}["backends"]
    assert step["facts"]["engine"]["available"] is False, step
    if provider_status()[0]:
        assert (step["status"], step["hint"]) == ("ok", None), step
        assert step["summary"].startswith("using provider (auto: the engine is unavailable: this OpenSSL has no ENGINE")
    else:
        assert step["status"] == "fail", step


ENGINE_FROM_CONFIG = """
import os, ssl, mtls_engine
from tests.servers import echo_server, server_context, talk

srv = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
args = dict(key=os.environ["T_URI"], cafile=os.environ["T_CA"], module=os.environ["T_MODULE"], pin=os.environ["T_PIN"])
try:
    mtls_engine.client_context(backend="engine", **args)
except mtls_engine.BackendUnavailable as exc:
    print("BackendUnavailable:", exc)
ctx = mtls_engine.client_context(**args)
with echo_server(srv) as s:
    print(talk(ctx, s.port)["subject"])
"""


def test_engine_already_loaded_by_openssl_cnf(pki: Pki, tmp_path: Path) -> None:
    """A user's openssl.cnf that loads libp11's engine: a second engine
    instance cannot start, so the engine backend says why and auto takes the
    provider."""
    need_backend("engine")
    need(provider_status()[0], provider_status()[1])
    cnf = tmp_path / "engine.cnf"
    made = subprocess.run(
        [sys.executable, "-m", "mtls_engine", "config", "--module", pki.module, "--backend", "engine", "-o", str(cnf)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    proc = run_python(
        ENGINE_FROM_CONFIG,
        env={"OPENSSL_CONF": str(cnf), "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key),
             "T_CA": str(pki.ca_file), "T_URI": pki.key_uri(KeyKind.P256), "T_MODULE": pki.module,
             "T_PIN": pki.card1.pin},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "BackendUnavailable: backend 'engine' is unavailable: libp11's pkcs11 engine was already loaded by "
        "OpenSSL's configuration (OPENSSL_CONF or the system openssl.cnf), and a second instance cannot start in "
        "this process; use the provider backend, or drop the engine from that configuration",
        "commonName=card-holder ec256",
    ]


NOT_A_PROVIDER = """
import os, ssl, mtls_engine
try:
    mtls_engine.load_card_key(ssl.create_default_context(), os.environ["T_URI"], module=os.environ["T_MODULE"],
                              pin=os.environ["T_PIN"], backend="provider")
except mtls_engine.BackendUnavailable as exc:
    print("BackendUnavailable:", exc)
"""


def test_provider_file_that_is_not_a_provider(pki: Pki) -> None:
    """MTLS_ENGINE_PKCS11_PROVIDER pointing at some other library: a named
    error that says which file could not be loaded, no crash."""
    proc = run_python(
        NOT_A_PROVIDER,
        env={"MTLS_ENGINE_PKCS11_PROVIDER": pki.module, "T_URI": pki.key_uri(KeyKind.P256),
             "T_MODULE": pki.module, "T_PIN": pki.card1.pin},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(
        f"BackendUnavailable: cannot load pkcs11-provider {pki.module} for the PKCS#11 module {pki.module}"
    ), proc.stdout
    assert pki.card1.pin not in proc.stdout + proc.stderr
