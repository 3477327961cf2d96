"""A token that disappears: the card key is on a SoftHSM2 token exported by a
real ``p11-kit server`` on a unix socket, reached through p11-kit-client.so
(the shape of a network HSM, or of a card pulled from its reader).

The server is stopped mid-run (its whole process group: every connection
breaks) and started again.  For both backends: handshakes that need the
card fail at once with ``mtls_engine.TokenUnavailable`` (an ``ssl.SSLError``
too) saying what happened and what to do; the same context signs again
within 2 s of the restart, having re-opened the module, logged in again
through the PIN source it was given and found the key by its URI; a PIN
that the token rejects on the way is tried once and never again; the
process exits cleanly.

Each scenario runs in a fresh interpreter (tests/token_loss_run.py):
pkcs11-provider serves one PKCS#11 module per process, and an exit status
is the crash check.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from mtls_engine._backends import engine_path
from mtls_engine._packages import package_of
from mtls_engine._softhsm import KeyKind, Token, TokenStore

from .conftest import TEST_PIN, Pki, need
from .helpers import run_python
from .p11kit import client_module, server_missing

# Measured here (OpenSSL 3.0, p11-kit 0.24, SoftHSM2 2.6): a handshake that
# needs the lost token fails in ~5 ms, and the first handshake after the
# restart reconnects (re-initialise, log in, find, load: ~40 ms) and
# succeeds ~90 ms after the server is back.  The bounds leave room for a
# loaded machine.
FAIL_BOUND = 2.0
RECOVERY_BOUND = 2.0

KEYS = {"ec256": ("02", KeyKind.P256), "rsa2048": ("01", KeyKind.RSA2048)}

# Forced reconnections in test_many_reconnections_*: more than the 64
# wrapper slots of csrc/helper.c, so a slot never given back shows.  About
# 0.07 s each here (a reconnection and a handshake).  On demand:
# MTLS_RECONNECTIONS=200 (docs/p11kit.md has that run's figures).
RECONNECTIONS = int(os.environ.get("MTLS_RECONNECTIONS", "80"))
WARMUP = 10  # reconnections before the first measurement
# Resident memory the engine's run may grow by between those two
# measurements, per reconnection.  Measured (engine, p11-kit-client.so):
# ~1.3 KB per reconnection, against ~125 KB when every retired engine
# instance stayed loaded (and ~10 KB when each new instance asked
# p11-kit-client.so for a new connection state, which it frees only when
# unloaded, instead of reusing a finalised one); Debian sid (libp11
# 0.4.21): ~2.2 KB, against ~48 KB when libp11's C_GetInterface lookup
# reached p11-kit's proxy (csrc/helper.c).
RSS_PER_RECONNECTION = 25_000


def device_errors(backend: str) -> tuple[str, ...]:
    """How the first failed signature names what p11-kit-client.so answered
    with its server gone (CKR_DEVICE_ERROR), measured on Debian 12 and 13.
    pkcs11-provider: its C_Sign.  libp11 0.4.12 signs with a pooled session:
    its C_Sign.  libp11 0.4.13 first checks the pooled session
    (C_GetSessionInfo), drops it and opens a new one: that C_OpenSession
    fails, which libp11 0.4.13 alone would wait on for ever; mtls_engine's
    function list reports it and makes libp11 give up (csrc/helper.c).
    Either form when the engine's libp11 version is unknown."""
    if backend == "provider":
        return ("mtls_engine_pkcs11::Some problem has occurred with the token and/or slot",)
    c_sign, c_open = "PKCS#11 module::Device error", "PKCS#11 C_OpenSession::CKR_DEVICE_ERROR"
    path = engine_path()
    pkg = package_of(path) if path else None
    if pkg is None:
        return (c_sign, c_open)
    version = tuple(int(x) for x in re.findall(r"\d+", pkg.upstream)[:3])
    return (c_sign,) if version < (0, 4, 13) else (c_open,)


@pytest.fixture(scope="module")
def p11kit() -> str:
    missing = server_missing()
    need(missing is None, f"p11-kit server: {missing}")
    module = client_module()
    assert module is not None
    return module


@pytest.fixture(scope="module")
def remote(pki: Pki, tmp_path_factory: pytest.TempPathFactory, p11kit: str) -> dict[str, str]:
    """A token store of its own (the suite's stays as it is) with token
    'remote': an EC P-256 and an RSA-2048 key with their certificates, and
    a server certificate for the EC key (for a server whose key is there)."""
    work = tmp_path_factory.mktemp("remote")
    store = TokenStore.create(work / "softhsm")
    token: Token = store.init_token("remote", pin=TEST_PIN)
    pems = {}
    for label, (key_id, kind) in KEYS.items():
        pub = token.generate_key(kind, label, key_id)
        token.store_certificate(pki.ca.issue(pub, f"remote {label}"), label, key_id, work)
        pems[label] = pub
    server_cert = work / "token-server.pem"
    cert = pki.ca.issue(pems["ec256"], "localhost", client=False, dns_names=("localhost",))
    server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    client_cert, client_key = pki.ca.issue_client_files(work, "plain client")
    return {
        "T_SOFTHSM": store.module,
        "T_SOFTHSM2_CONF": str(store.conf),
        "T_TOKEN_URI": "pkcs11:token=remote",
        "T_CLIENT": p11kit,
        "T_CA": str(pki.ca_file),
        "T_SERVER_CERT": str(pki.server_cert),
        "T_SERVER_KEY": str(pki.server_key),
        "T_TOKEN_SERVER_CERT": str(server_cert),
        "T_CLIENT_CERT": str(client_cert),
        "T_CLIENT_KEY": str(client_key),
    }


def measured(r: dict[str, Any], request: pytest.FixtureRequest) -> None:
    """The times this run measured, as the test's user properties (in a
    ``--junitxml -o junit_family=xunit1`` report)."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))

    fails = [o["seconds"] for o in r.get("lost", []) + r.get("while_starting", []) if not o["ok"]]
    if fails:
        record("slowest_failure_s", round(max(fails), 4))
    if r.get("recovered_after") is not None:
        record("recovered_after_restart_s", round(r["recovered_after"], 4))
    reconnected = [line for line in r.get("log", []) if "reconnected to token" in line]
    if reconnected:
        record("reconnection", reconnected[0])


def run(
    remote: dict[str, str],
    tmp_path: Path,
    scenario: str,
    backend: str,
    key: str = "ec256",
    extra: dict[str, str] | None = None,
    timeout: float = 180,
) -> dict[str, Any]:
    env = {
        **remote,
        **(extra or {}),
        "T_SCENARIO": scenario,
        "T_BACKEND": backend,
        "T_KEY": f"pkcs11:token=remote;object={key};type=private",
        "T_SOCKET": str(tmp_path / "p11kit.sock"),
        "T_PIN": TEST_PIN,
    }
    proc = run_python("from tests.token_loss_run import main; main()", env=env, timeout=timeout)
    assert TEST_PIN not in proc.stdout + proc.stderr, "the PIN appeared in the scenario's output"
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def assert_unavailable(outcome: dict[str, Any]) -> None:
    """A handshake that needed the lost card: named, an SSLError, bounded."""
    assert not outcome["ok"]
    assert outcome["cls"] == "TokenUnavailable", outcome
    assert outcome["named"] and outcome["ssl_error"]
    assert outcome["seconds"] < FAIL_BOUND, outcome
    assert "the card key" in outcome["message"] and "token 'remote'" in outcome["message"]


@pytest.mark.parametrize("key", ["ec256", "rsa2048"])
def test_lost_token_fails_named_and_the_same_context_recovers(
    remote: dict[str, str], tmp_path: Path, backend: str, key: str, request: pytest.FixtureRequest
) -> None:
    r = run(remote, tmp_path, "client", backend, key)
    measured(r, request)
    assert all(o["ok"] for o in r["before"]), r["before"]

    first, *later = r["lost"]
    assert_unavailable(first)
    # The signature failed: what happened, and that it will be retried.
    assert (
        "could not sign this handshake, nor a test signature after it (module p11-kit-client.so: error:"
        in (first["message"])
    )
    assert any(f":{e})" in first["message"] for e in device_errors(backend)), first["message"]
    assert "the token is unreachable, was removed, or no longer knows the key" in first["message"]
    assert "reconnects to it at the next handshake" in first["message"]
    for o in later:
        assert_unavailable(o)
        # Reconnecting was tried (at most every 0.2 s) and says why it failed.
        assert "the token is still unreachable" in o["message"] or "could not sign" in o["message"]
    assert any("has no connection to a p11-kit server" in o["message"] for o in later)
    assert any("P11_KIT_SERVER_ADDRESS" in o["message"] for o in later)

    assert r["recovered_after"] is not None and r["recovered_after"] < RECOVERY_BOUND, r["while_starting"]
    for o in r["while_starting"]:
        assert_unavailable(o)
    assert all(o["ok"] for o in r["after"]), r["after"]
    # asyncio's own TLS (wrap_bio) gets the named error, and works after.
    assert_unavailable(r["lost_asyncio"])
    assert r["after_asyncio"]["ok"], r["after_asyncio"]
    assert r["same_context"] and r["reconnections"] == 1
    # One PIN read to load the key, one to log in again: the PIN source is
    # the one the key was loaded with; nobody is asked for anything new.
    assert r["pin_calls"] == 2
    assert any(line.startswith("WARNING reconnected to token 'remote'") for line in r["log"]), r["log"]
    assert r["server_errors"] == [] or all("alert" in e["message"].lower() for e in r["server_errors"])


def test_many_threads_through_loss_and_restart(
    remote: dict[str, str], tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    r = run(remote, tmp_path, "threads", backend)
    measured(r, request)
    assert r["recovered_after"] is not None and r["recovered_after"] < RECOVERY_BOUND
    assert r["reconnections"] == 1  # one reconnection, whatever the number of threads that noticed
    threaded = r["threaded"]
    failures = [o for o in threaded if not o["ok"]]
    assert failures, "no handshake overlapped the outage"
    for o in failures:
        assert_unavailable(o)
    # Every handshake that started well after the restart worked.
    settled = r["started_at"] + r["recovered_after"] + 0.5
    late = [o for o in threaded if o["at"] > settled]
    assert late and all(o["ok"] for o in late), [o for o in late if not o["ok"]][:3]
    assert all(o["ok"] for o in r["after"])


def test_a_pin_rejected_while_reconnecting_is_never_offered_again(
    remote: dict[str, str], tmp_path: Path, backend: str
) -> None:
    r = run(remote, tmp_path, "pin", backend)
    # The PIN source now yields a wrong PIN: one login attempt, then no more
    # automatic attempts and no more PIN reads.
    assert r["recovered_after"] is None
    stopped = [o for o in r["while_starting"] if "stopped reconnecting" in o.get("message", "")]
    assert stopped, r["while_starting"][:3]
    for o in r["while_starting"] + r["more"]:
        assert_unavailable(o)
    assert "PinIncorrect" in stopped[-1]["message"] and "mtls_engine.reconnect(ctx)" in stopped[-1]["message"]
    assert r["pin_calls_after_rejection"] == 2  # the load, and the one rejected reconnection
    assert r["pin_calls_later"] == 2
    # Asked explicitly, with the source still wrong: the same PIN is refused
    # without reaching the token.
    wrong = r["reconnect_wrong"]
    assert wrong["cls"] == "PinIncorrect" and "already rejected this PIN" in wrong["message"], wrong
    # Fixed: reconnect() works and the same context signs again.
    assert r["reconnect_right"]["ok"], r["reconnect_right"]
    assert all(o["ok"] for o in r["after"]) and r["reconnections"] == 1


def test_a_server_whose_key_is_on_the_lost_token(
    remote: dict[str, str], tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    r = run(remote, tmp_path, "server", backend)
    measured(r, request)
    assert all(o["ok"] for o in r["before"])
    for o in r["lost"]:
        assert not o["ok"] and o["seconds"] < FAIL_BOUND
        assert_unavailable(o["server"])  # the server's own handshake names the cause
    assert r["recovered_after"] is not None and r["recovered_after"] < RECOVERY_BOUND
    assert all(o["ok"] for o in r["after"]) and r["reconnections"] == 1


def test_many_reconnections_keep_nothing_loaded_and_a_lost_token_still_fails_at_once(
    remote: dict[str, str], tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """RECONNECTIONS forced reconnections (mtls_engine.reconnect), each
    followed by a handshake, then the server goes away.  Every engine
    instance gets mtls_engine's function list (the fix for libp11 0.4.13
    waiting for ever on a lost token; its wrapper slots are given back when
    an instance is freed), and a retired instance is freed once its key is
    gone: engine instances, engine libraries mapped, wrapper slots, open
    descriptors and the server's connections are the same after the run as
    after its first WARMUP reconnections, and memory grows by far less than
    one instance each.  pkcs11-provider keeps its retired instances
    (_ProviderBackend says why): for it, the run shows that the lost-token
    behaviour holds after as many reconnections."""
    r = run(remote, tmp_path, "many", backend,
            extra={"T_RECONNECTIONS": str(RECONNECTIONS), "T_WARMUP": str(WARMUP)},
            timeout=120 + RECONNECTIONS)  # fmt: skip
    warm, end = r["at_warmup"], r["at_end"]
    request.node.user_properties.append(("seconds_per_reconnection", round(r["seconds_per_reconnection"], 4)))
    request.node.user_properties.append(
        ("rss_growth_per_reconnection", (end["rss"] - warm["rss"]) // (RECONNECTIONS - WARMUP))
    )
    assert r["before"]["ok"], r["before"]
    assert r["failed"] == [] and r["reconnections"] == RECONNECTIONS, r["failed"]
    # After all of them, a lost token still fails handshakes at once, named,
    # and the same context recovers when the server is back.
    assert len(r["lost"]) == 3
    for o in r["lost"]:
        assert_unavailable(o)
    assert any(f":{e})" in r["lost"][0]["message"] for e in device_errors(backend)), r["lost"][0]["message"]
    assert r["recovered_after"] is not None and r["recovered_after"] < RECOVERY_BOUND, r["while_starting"]
    assert all(o["ok"] for o in r["after"]), r["after"]
    if backend != "engine":
        return
    assert end["slots_handed"] == RECONNECTIONS + 1, end  # every instance got the changed list
    assert end["unwrapped"] == 0, end
    # p11-kit-client.so gives each caller a connection of its own: the one a
    # freed instance finalised serves the next instance.
    assert end["recycled"] - warm["recycled"] == RECONNECTIONS - WARMUP, (warm, end)
    flat = ("engines_alive", "engine_instances", "engine_libraries", "engine_files_mapped", "slots_in_use", "fds",
            "server_connections")  # fmt: skip
    assert {k: end[k] for k in flat} == {k: warm[k] for k in flat}, (warm, end)
    # The first instance (the context holds its key) and the current one.
    assert end["engines_alive"] == end["engine_instances"] == end["slots_in_use"] == 2, end
    if not os.environ.get("MTLS_SANITIZED"):  # ASan keeps freed memory in quarantine (ci/sanitize.sh)
        assert end["rss"] - warm["rss"] < RSS_PER_RECONNECTION * (RECONNECTIONS - WARMUP), (warm, end)


def test_no_server_at_load_says_to_start_it(remote: dict[str, str], tmp_path: Path) -> None:
    code = """
import os, mtls_engine
os.environ["P11_KIT_SERVER_ADDRESS"] = "unix:path=" + os.environ["T_SOCKET"]
try:
    mtls_engine.client_context(os.environ["T_KEY"], cafile=os.environ["T_CA"], module=os.environ["T_CLIENT"],
                               pin=mtls_engine.pin_source("env:T_PIN"))
except mtls_engine.TokenNotFound as exc:
    print("TokenNotFound:", exc)
"""
    env = {**remote, "T_SOCKET": str(tmp_path / "nobody.sock"), "T_PIN": TEST_PIN,
           "T_KEY": "pkcs11:token=remote;object=ec256;type=private"}  # fmt: skip
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TokenNotFound:"), proc.stdout + proc.stderr
    assert "has no connection to a p11-kit server" in proc.stdout
    assert f"unix:path={tmp_path / 'nobody.sock'}" in proc.stdout and "p11-kit server --provider" in proc.stdout
