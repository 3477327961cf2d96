"""The PKCS#11 test shim (tests/p11shim) and, through it, mtls_engine's PIN
safety on tokens that report what SoftHSM2 never does: a PIN on its final
try, a locked PIN, a retry counter, a pinpad reader, a slow card.

Everything that loads the shim runs in a fresh interpreter: PKCS#11 login
state belongs to the process, the shim reads its configuration once per
process, and pkcs11-provider serves one module per process.  The shim gets
a SoftHSM2 token store of its own, so its simulated counter and flags never
touch the session's shared tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mtls_engine import _backends
from mtls_engine._lib import lib
from mtls_engine._packages import package_of

from . import p11shim
from .conftest import SHIM_PIN, Pki, ShimCard
from .helpers import run_python

# Distinctive PINs, so a scan of the log for them cannot hit anything else
# (the demo PIN 00000000 would match every "rv=0x00000000").
PIN = SHIM_PIN
WRONG = "27182818"

COUNT_LOW = lib.CKF_USER_PIN_COUNT_LOW
FINAL_TRY = lib.CKF_USER_PIN_FINAL_TRY
LOCKED = lib.CKF_USER_PIN_LOCKED
PINPAD = lib.CKF_PROTECTED_AUTHENTICATION_PATH
PIN_STATE = COUNT_LOW | FINAL_TRY | LOCKED
KEY_HANDLE_INVALID = 0x60  # CKR_KEY_HANDLE_INVALID (not in the binding)


@pytest.fixture(scope="module")
def card(shim_card: ShimCard) -> ShimCard:
    return shim_card


def _last_json(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _log(env: dict[str, str]) -> list[tuple[str, int, str]]:
    """The shim log, after checking that no PIN ever reached it."""
    raw = Path(env["MTLS_SHIM_LOG"]).read_bytes()
    for secret in (PIN, WRONG):
        assert secret.encode() not in raw, "a PIN was written to the shim log"
    return p11shim.read_log(env["MTLS_SHIM_LOG"])


def _logins(env: dict[str, str]) -> list[str]:
    """The details of every C_Login the shim saw ("user=1 pin=given ...")."""
    return [rest for name, _, rest in _log(env) if name == "C_Login"]


# ---- the shim itself, driven through raw PKCS#11 calls -----------------------

TOKEN_SCRIPT = """
import json, os
from mtls_engine._lib import ffi, lib
from mtls_engine._p11 import Module

mod = Module.load(os.environ["T_MODULE"])
(tok,) = [t for t in mod.tokens() if t.label == os.environ["T_LABEL"]]
session = mod.session(tok.slot_id)
steps = [{"flags": tok.flags}]
# PINs to try in turn (null: none, the pinpad enters it); a success ends a list
# (the binding has no C_Logout, and the process ends anyway).
for pin in json.loads(os.environ.get("T_PINS", "[]")):
    buf = ffi.NULL if pin is None else ffi.new("unsigned char[]", pin.encode())
    rv = mod.fl.C_Login(session, lib.CKU_USER, buf, 0 if pin is None else len(pin))
    steps.append({"rv": rv, "logged_in": mod.logged_in(tok.slot_id), "flags": mod.token_info(tok.slot_id).flags})
print(json.dumps(steps))
"""


def _raw(env: dict[str, str], pins: list[str | None]) -> list[dict[str, int]]:
    steps: list[dict[str, int]] = _last_json(run_python(TOKEN_SCRIPT, {**env, "T_PINS": json.dumps(pins)}))
    return steps


BITS = {"count_low": COUNT_LOW, "final_try": FINAL_TRY, "locked": LOCKED, "pinpad": PINPAD}


@pytest.mark.parametrize("names", ["", "count_low", "final_try", "locked", "pinpad", "count_low,final_try,pinpad"])
def test_token_flags_are_reported(card: ShimCard, tmp_path: Path, names: str) -> None:
    env = card.env(tmp_path, token_flags=[n for n in names.split(",") if n])
    (start,) = _raw(env, [])
    expected = sum(BITS[n] for n in names.split(",") if n)
    assert start["flags"] & (PIN_STATE | PINPAD) == expected  # none from SoftHSM2 itself
    assert start["flags"] & lib.CKF_TOKEN_INITIALIZED  # SoftHSM2's own flags come through
    assert any(name == "C_GetTokenInfo" and rv == 0 for name, rv, _ in _log(env))


def test_retry_counter_persists_across_processes(card: ShimCard, tmp_path: Path) -> None:
    env = card.env(tmp_path, max_tries=3)
    state = Path(env["MTLS_SHIM_STATE"])
    # Two wrong PINs, each in its own process: the count survives.
    first = _raw(env, [WRONG])
    assert first[0]["flags"] & PIN_STATE == 0
    assert first[1]["rv"] == lib.CKR_PIN_INCORRECT and first[1]["flags"] & PIN_STATE == COUNT_LOW
    second = _raw(env, [WRONG])
    assert second[0]["flags"] & PIN_STATE == COUNT_LOW
    assert second[1]["rv"] == lib.CKR_PIN_INCORRECT
    assert second[1]["flags"] & PIN_STATE == COUNT_LOW | FINAL_TRY
    assert state.read_text().strip() == "2"
    # The right PIN on the final try logs in and resets the counter.
    reset = _raw(env, [PIN])
    assert reset[0]["flags"] & FINAL_TRY
    assert reset[1] == {"rv": lib.CKR_OK, "logged_in": True, "flags": reset[1]["flags"]}
    assert reset[1]["flags"] & PIN_STATE == 0
    assert state.read_text().strip() == "0"
    # Three wrong PINs lock it; then even the right PIN is refused, unforwarded.
    locked = _raw(env, [WRONG, WRONG, WRONG, PIN])
    assert [s["rv"] for s in locked[1:]] == [lib.CKR_PIN_INCORRECT] * 3 + [lib.CKR_PIN_LOCKED]
    assert [s["flags"] & PIN_STATE for s in locked[1:]] == [COUNT_LOW, COUNT_LOW | FINAL_TRY] + [COUNT_LOW | LOCKED] * 2
    assert not locked[4]["logged_in"]
    logins = _logins(env)
    assert len(logins) == 1 + 1 + 1 + 4
    assert all("pin=given" in rest for rest in logins)
    assert logins[-1].endswith("forwarded=no") and logins[-2].endswith("forwarded=yes")


@pytest.mark.parametrize(("typed", "rv"), [(PIN, 0), (WRONG, 0xA0), (None, 0x50)], ids=["right", "wrong", "cancel"])
def test_pinpad_enters_the_pin(card: ShimCard, tmp_path: Path, typed: str | None, rv: int) -> None:
    env = card.env(tmp_path, token_flags=["pinpad"], max_tries=3, pinpad_pin=typed)
    steps = _raw(env, [None])
    assert steps[0]["flags"] & PINPAD
    assert steps[1]["rv"] == rv  # CKR_OK, CKR_PIN_INCORRECT, CKR_FUNCTION_CANCELED
    assert steps[1]["logged_in"] == (rv == 0)
    # A wrong PIN typed on the reader counts like any other.
    assert steps[1]["flags"] & PIN_STATE == (COUNT_LOW if rv == 0xA0 else 0)
    (login,) = _logins(env)
    assert "pin=null" in login and ("pinpad=entered" in login) == (typed is not None)


def test_unconfigured_shim_refuses_to_load(card: ShimCard, tmp_path: Path) -> None:
    env = card.env(tmp_path)
    env["MTLS_SHIM_MODULE"] = ""
    proc = run_python(
        "import os, mtls_engine\n"
        "from mtls_engine._p11 import Module\n"
        "try:\n    Module.load(os.environ['T_MODULE'])\n"
        "except mtls_engine.ModuleLoadError as e:\n    print('refused')\n",
        env,
    )
    assert proc.stdout.strip() == "refused", proc.stderr
    assert "p11shim: MTLS_SHIM_MODULE is not set" in proc.stderr


# ---- mtls_engine's PIN safety through the public API ---------------------------

API_SCRIPT = """
import json, os, ssl, time, warnings
import mtls_engine

E = os.environ
out = {"loads": [], "warnings": []}
ctx = None
for _ in range(int(E.get("T_LOADS", "1"))):
    ctx = ssl.create_default_context(cafile=E["T_CA"])  # a new context each time
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mtls_engine.load_card_key(ctx, E["T_URI"], module=E["T_MODULE"], pin=E.get("T_PIN"),
                                      backend=E["T_BACKEND"], force=bool(E.get("T_FORCE")))
        out["warnings"] += [[w.category.__name__, str(w.message)] for w in caught]
        out["loads"].append(["ok", ""])
    except mtls_engine.Error as exc:
        out["loads"].append([type(exc).__name__, str(exc)])
        ctx = None
if ctx is not None and E.get("T_HANDSHAKE"):
    from tests.servers import echo_server, server_context, talk

    with echo_server(server_context(E["T_SCERT"], E["T_SKEY"], E["T_CA"])) as srv:
        start = time.monotonic()
        out["subject"] = talk(ctx, srv.port)["subject"]
        out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def _api(card: ShimCard, pki: Pki, env: dict[str, str], backend: str, *, pin: str | None,
         loads: int = 1, handshake: bool = False, force: bool = False) -> dict[str, Any]:  # fmt: skip
    child = {**env, "T_URI": card.key_uri, "T_BACKEND": backend, "T_LOADS": str(loads), "T_CA": str(pki.ca_file),
             "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key)}  # fmt: skip
    if force:
        child["T_FORCE"] = "1"
    if pin is not None:
        child["T_PIN"] = pin
    if handshake:
        child["T_HANDSHAKE"] = "1"
    out: dict[str, Any] = _last_json(run_python(API_SCRIPT, child))
    return out


def test_wrong_pin_reaches_the_token_once(card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    env = card.env(tmp_path)
    out = _api(card, pki, env, backend, pin=WRONG, loads=3)
    assert [cls for cls, _ in out["loads"]] == ["PinIncorrect"] * 3
    assert "already rejected" not in out["loads"][0][1]
    assert all("already rejected" in msg for _, msg in out["loads"][1:])
    logins = _logins(env)
    assert len(logins) == 1 and "pin=given" in logins[0]
    assert [rv for name, rv, _ in _log(env) if name == "C_Login"] == [lib.CKR_PIN_INCORRECT]


def test_final_try_is_not_risked(card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    env = card.env(tmp_path, token_flags=["count_low", "final_try"])
    out = _api(card, pki, env, backend, pin=PIN)
    ((cls, msg),) = out["loads"]
    assert cls == "PinFinalTry" and "one more wrong PIN" in msg
    assert _logins(env) == []


def test_final_try_with_force_logs_in_once_with_a_warning(
    card: ShimCard, pki: Pki, tmp_path: Path, backend: str
) -> None:
    env = card.env(tmp_path, token_flags=["final_try"])
    out = _api(card, pki, env, backend, pin=PIN, force=True, handshake=True)
    assert out["loads"] == [["ok", ""]]
    assert out["subject"] == "commonName=card-holder shimcard"
    ((category, message),) = out["warnings"]
    assert category == "PinWarning"
    assert "is on its final PIN try; logging in anyway because force=True was given" in message
    assert len(_logins(env)) == 1


def test_locked_pin_is_not_tried(card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    env = card.env(tmp_path, token_flags=["locked"])
    out = _api(card, pki, env, backend, pin=PIN)
    assert [cls for cls, _ in out["loads"]] == ["PinLocked"]
    assert _logins(env) == []


def test_retry_counter_stops_before_the_final_try(card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    env = card.env(tmp_path, max_tries=3)
    for tries in (1, 2):  # separate processes: each tries its wrong PIN once
        out = _api(card, pki, env, backend, pin=WRONG)
        assert [cls for cls, _ in out["loads"]] == ["PinIncorrect"]
        assert len(_logins(env)) == tries
    assert Path(env["MTLS_SHIM_STATE"]).read_text().strip() == "2"
    out = _api(card, pki, env, backend, pin=PIN)  # the right PIN, but one wrong try would lock
    ((cls, msg),) = out["loads"]
    assert cls == "PinFinalTry" and "one more wrong PIN" in msg
    assert len(_logins(env)) == 2  # no C_Login in the third process


@pytest.mark.parametrize("app_pin", [None, WRONG], ids=["no-pin", "pin-ignored"])
def test_pinpad_login_sends_no_pin(card: ShimCard, pki: Pki, tmp_path: Path, backend: str, app_pin: str | None) -> None:
    env = card.env(tmp_path, token_flags=["pinpad"], pinpad_pin=PIN)
    out = _api(card, pki, env, backend, pin=app_pin, handshake=True)
    assert out["loads"] == [["ok", ""]]
    assert out["subject"] == "commonName=card-holder shimcard"
    logins = _logins(env)
    assert logins and all("pin=null" in rest and "pinpad=entered" in rest for rest in logins), logins
    assert p11shim.signatures(env["MTLS_SHIM_LOG"]) == 1


def test_slow_card_delays_the_handshake(card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    env = card.env(tmp_path, sign_delay_ms=200)
    out = _api(card, pki, env, backend, pin=PIN, handshake=True)
    assert out["loads"] == [["ok", ""]]
    assert out["seconds"] >= 0.2  # the simulated card's signing time is applied
    assert p11shim.signatures(env["MTLS_SHIM_LOG"]) == 1
    assert len(_logins(env)) == 1


CONCURRENT_SCRIPT = """
import contextlib, json, os, threading, time
import mtls_engine
from tests.servers import echo_server, server_context, talk

E = os.environ
ctx = mtls_engine.client_context(E["T_URI"], cafile=E["T_CA"], module=E["T_MODULE"], pin=E["T_PIN"],
                                 backend=E["T_BACKEND"])
subjects = []
with contextlib.ExitStack() as stack:  # one server each: EchoServer serves one connection at a time
    servers = [stack.enter_context(echo_server(server_context(E["T_SCERT"], E["T_SKEY"], E["T_CA"])))
               for _ in range(4)]
    threads = [threading.Thread(target=lambda p=s.port: subjects.append(talk(ctx, p)["subject"])) for s in servers]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"seconds": time.monotonic() - start, "subjects": subjects}))
"""


def test_slow_card_signs_concurrently(card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    """Four threads sign through one slow card key at once: each handshake
    gets its own signature, all complete.  (How far they overlap is for the
    benchmarks to measure, not a test.)"""
    env = card.env(tmp_path, sign_delay_ms=300)
    env.update(T_URI=card.key_uri, T_CA=str(pki.ca_file), T_PIN=PIN, T_BACKEND=backend,
               T_SCERT=str(pki.server_cert), T_SKEY=str(pki.server_key))  # fmt: skip
    out = _last_json(run_python(CONCURRENT_SCRIPT, env))
    assert out["subjects"] == ["commonName=card-holder shimcard"] * 4
    assert p11shim.signatures(env["MTLS_SHIM_LOG"]) == 4
    assert out["seconds"] >= 0.3, out  # the delay was applied


SWAP_SCRIPT = """
import json, os, re, socket, ssl
import mtls_engine
from tests.servers import echo_server

E = os.environ
bare = lambda text: re.sub(r" \\(_ssl\\.c:\\d+\\)$", "", str(text))  # no CPython source line
out = {}
for version in ("TLSv1_3", "TLSv1_2"):
    ctx = ssl.create_default_context(cafile=E["T_CA"])
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion[version]
    mtls_engine.load_card_key(ctx, E["T_URI"], module=E["T_MODULE"], pin=E["T_PIN"], backend=E["T_BACKEND"])
    result = out[version] = {"stage": "handshake"}
    refusals = []  # what mtls_engine's server context says about each refused client
    server = mtls_engine.server_context(E["T_SCERT"], E["T_SKEY"], E["T_CA"], on_reject=refusals.append)
    with echo_server(server) as srv:
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    result["stage"] = "read"
                    result["stage"] = "write"
                    tls.sendall(b"hello")
                    result["stage"] = "read"
                    result["answer"] = json.loads(tls.recv(4096))
        except (ssl.SSLError, OSError) as exc:
            result.update(error=type(exc).__name__, reason=getattr(exc, "reason", None), text=bare(exc))
    result["server"] = [bare(e) for e in srv.errors]
    result["reasons"] = [[r.reason, r.subject, r.detail] for r in refusals]
print(json.dumps(out))
"""


def _swap(card: ShimCard, pki: Pki, env: dict[str, str], backend: str) -> tuple[dict[str, Any], str]:
    env = {**env, "T_URI": card.key_uri, "T_CA": str(pki.ca_file), "T_PIN": PIN, "T_BACKEND": backend,
           "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key)}  # fmt: skip
    proc = run_python(SWAP_SCRIPT, env)
    return _last_json(proc), proc.stderr


def _sign_inits(env: dict[str, str]) -> list[tuple[int, str]]:
    return [(rv, rest) for name, rv, rest in _log(env) if name == "C_SignInit"]


def test_signing_with_another_key_fails_the_certificate_verify(
    card: ShimCard, pki: Pki, tmp_path: Path, backend: str
) -> None:
    """A client whose certificate's key is not the key that signs (the shim
    swaps it for "other"): OpenSSL on the client sees nothing wrong, the
    server checks the CertificateVerify signature, refuses it (bad
    signature) and sends alert decrypt_error (51)."""
    env = card.env(tmp_path / "honest")
    out, _ = _swap(card, pki, env, backend)
    for version, tls in (("TLSv1_3", "TLSv1.3"), ("TLSv1_2", "TLSv1.2")):
        assert out[version]["answer"] == {"subject": "commonName=card-holder shimcard", "version": tls}
        assert out[version]["server"] == [] and out[version]["reasons"] == []
    assert [rest for _, rest in _sign_inits(env)] == ["mech=0x00001041"] * 2  # CKM_ECDSA, unswapped

    env = card.env(tmp_path / "swapped", sign_with="other")
    out, _ = _swap(card, pki, env, backend)
    # TLS 1.2: the server's alert answers the client's Finished within the
    # handshake.  TLS 1.3: the client's handshake ends when it has sent its
    # Finished; the alert shows at the first read after it.
    for version, stage in (("TLSv1_3", "read"), ("TLSv1_2", "handshake")):
        assert out[version] == {
            "stage": stage, "error": "SSLError", "reason": "TLSV1_ALERT_DECRYPT_ERROR",
            "text": "[SSL: TLSV1_ALERT_DECRYPT_ERROR] tlsv1 alert decrypt error",
            "server": ["[SSL: BAD_SIGNATURE] bad signature"],
            "reasons": [["bad_signature", "CN=card-holder shimcard",
                         "the client's handshake signature does not verify with its certificate's key"]],
        }, out  # fmt: skip
    assert _sign_inits(env) == [(lib.CKR_OK, "mech=0x00001041 swapped=yes sign_with=other")] * 2
    assert p11shim.signatures(env["MTLS_SHIM_LOG"]) == 2


def _libp11_version() -> tuple[int, ...]:
    """The installed libp11 engine's upstream version, () when unknown."""
    path = _backends.engine_path()
    pkg = package_of(path) if path else None
    if pkg is None or not re.fullmatch(r"\d+(\.\d+)*", pkg.upstream or ""):
        return ()
    return tuple(int(n) for n in pkg.upstream.split("."))


def test_sign_with_an_unknown_label_refuses_to_sign(card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    env = card.env(tmp_path, sign_with="nosuch")
    out, stderr = _swap(card, pki, env, backend)
    for version in ("TLSv1_3", "TLSv1_2"):
        # The signature failed, and a test signature after it: the card is
        # named as the cause (mtls_engine would look for the key again).
        assert out[version]["stage"] == "handshake" and out[version]["error"] == "TokenUnavailable", out
        assert out[version]["reason"] == "TOKEN_UNAVAILABLE"
        assert (
            out[version]["text"].startswith("the card key 'ec256' on token 'shimcard' (serial ")
            and "could not sign this handshake, nor a test signature after it (module mtls-p11shim"
            in out[version]["text"]
        ), out
        # libp11 up to 0.4.13: "Key handle invalid"; pkcs11-provider: "The
        # specified key handle is not valid"; libp11 0.4.21 leaves only "EVP lib".
        names_handle = re.search(r"key handle (invalid|is not valid)", out[version]["text"], re.IGNORECASE)
        if backend == "provider" or _libp11_version() <= (0, 4, 13):
            assert names_handle, out
        elif _libp11_version() >= (0, 4, 21):
            assert "EVP lib" in out[version]["text"], out
        assert out[version]["server"] == ["[SSL: TLSV1_ALERT_INTERNAL_ERROR] tlsv1 alert internal error"]
        assert out[version]["reasons"] == []  # the client gave up; the server refused nobody
    inits = _sign_inits(env)
    assert inits and set(inits) == {(KEY_HANDLE_INVALID, "mech=0x00001041 swapped=no sign_with=nosuch found=0")}
    assert p11shim.signatures(env["MTLS_SHIM_LOG"]) == 0
    assert "p11shim: MTLS_SHIM_SIGN_WITH: 0 private keys labelled 'nosuch'" in stderr


KEY_GONE_SCRIPT = """
import json, os, socket, ssl, time
import mtls_engine
from tests.servers import echo_server

E = os.environ
ctx = mtls_engine.client_context(E["T_URI"], cafile=E["T_CA"], module=E["T_MODULE"], pin=E["T_PIN"],
                                 backend=E["T_BACKEND"])
out = []
with echo_server(mtls_engine.server_context(E["T_SCERT"], E["T_SKEY"], E["T_CA"])) as srv:
    for _ in range(3):
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"hello")
                    tls.recv(4096)
            out.append(["ok", ""])
        except ssl.SSLError as exc:
            out.append([type(exc).__name__, str(exc)])
        out[-1].append(len([l for l in open(E["MTLS_SHIM_LOG"]) if "C_SignInit" in l]))
        time.sleep(0.3)  # past the 0.2 s between two attempts
print(json.dumps(out))
"""


def test_a_key_that_still_cannot_sign_after_reconnecting_stops_the_attempts(
    card: ShimCard, pki: Pki, tmp_path: Path, backend: str
) -> None:
    """The token answers but its key cannot sign (the shim refuses the key
    handle): the failed signature and a failed test signature name the card;
    the next handshake reconnects once (finds the same token and key, loads
    it anew) and, the new key failing its test signature too, stops: later
    handshakes fail at once, with no more signatures tried, no new backend
    instance and no login."""
    env = {**card.env(tmp_path, sign_with="nosuch"), "T_URI": card.key_uri, "T_CA": str(pki.ca_file),
           "T_PIN": PIN, "T_BACKEND": backend, "T_SCERT": str(pki.server_cert),
           "T_SKEY": str(pki.server_key)}  # fmt: skip
    first, second, third = _last_json(run_python(KEY_GONE_SCRIPT, env))
    assert first[0] == second[0] == third[0] == "TokenUnavailable"
    assert "could not sign this handshake, nor a test signature after it" in first[1]
    assert (
        "mtls_engine stopped reconnecting to it (Pkcs11Error: mtls_engine reconnected to token 'shimcard'" in second[1]
    )
    assert "found the key 'ec256' again, but it still cannot sign" in second[1]
    assert "call mtls_engine.reconnect(ctx)" in second[1]
    assert third[1] == second[1]
    # C_SignInit calls: the handshake's and the test signature; the reloaded
    # key's test signature; then none
    assert 0 < first[2] < second[2] == third[2]
    assert len(_logins(env)) == 1  # the token stayed logged in: no second C_Login


# ---- the command line on the same tokens ---------------------------------------


def _cli(env: dict[str, str], *args: str) -> Any:
    import os
    import subprocess
    import sys

    from .helpers import ROOT

    full = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "mtls_engine", *args], capture_output=True, text=True,
                          env=full, timeout=120)  # fmt: skip


def test_check_stops_before_the_final_try_and_force_goes_on(card: ShimCard, tmp_path: Path) -> None:
    env = {**card.env(tmp_path, token_flags=["final_try"]), "CARD_PIN": PIN}
    args = ("check", "--module", env["T_MODULE"], "--key", card.key_uri, "--pin-source", "env:CARD_PIN", "--json")
    proc = _cli(env, *args)
    assert proc.returncode == 1, proc.stderr
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    token = steps["token"]
    assert (token["status"], token["facts"]["pin_state"]) == ("fail", "final_try")
    assert "one more wrong PIN locks the card" in token["summary"]
    assert token["hint"] == "make sure of the PIN first (card issuer, vendor tool); then --force tries it once"
    assert steps["login"]["status"] == "skip"
    assert _logins(env) == []

    proc = _cli(env, *args, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    assert steps["token"]["status"] == "warn"
    assert steps["login"]["status"] == "ok"
    assert "mtls_engine: warning: token 'shimcard'" in proc.stderr and "final PIN try" in proc.stderr
    assert len(_logins(env)) == 1
    assert PIN not in proc.stdout + proc.stderr


def test_check_reports_a_pinpad_login(card: ShimCard, tmp_path: Path) -> None:
    env = card.env(tmp_path, token_flags=["pinpad"], pinpad_pin=PIN)
    proc = _cli(env, "check", "--module", env["T_MODULE"], "--key", card.key_uri, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    assert steps["token"]["facts"]["pinpad"] is True
    assert steps["login"]["facts"]["method"] == "pinpad"
    assert all("pin=null" in rest for rest in _logins(env))
