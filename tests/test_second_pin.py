"""A PIN given after the token is logged in (issue 16 C).

PKCS#11 keeps one login per process, so once a key was loaded the token
never checks a PIN again in that process.  A PIN given as a value that
differs from the one that logged the token in is refused without reaching
the token; the same PIN, no PIN, a pinpad and a PIN callable (not consulted
when no login is needed) still load the key with no further C_Login.
Counted through the PKCS#11 shim's log, in a fresh process per test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import p11shim
from .conftest import SHIM_PIN, Pki, ShimCard
from .helpers import run_python

WRONG = "27182818"

SCRIPT = """
import json, os, ssl
import mtls_engine

E = os.environ
asked = []


def ask(token):
    asked.append(token.label)
    return E["T_WRONG"]


def logins():
    with open(E["MTLS_SHIM_LOG"]) as f:
        return sum(1 for line in f if line.startswith("C_Login "))


PINS = {"source": mtls_engine.pin_source("env:T_GOOD"), "good": E["T_GOOD"], "wrong": E["T_WRONG"],
        "wrong-bytes": E["T_WRONG"].encode(), "none": None, "wrong-callable": ask}
out = []
ctx = None
for step in json.loads(E["T_STEPS"]):
    uri = E["T_URI"]
    pin = None
    if step == "wrong-in-uri":
        uri += "?pin-value=" + E["T_WRONG"]
    else:
        pin = PINS[step]
    this = ssl.create_default_context(cafile=E["T_CA"])
    try:
        mtls_engine.load_card_key(this, uri, module=E["T_MODULE"], pin=pin, backend=E["T_BACKEND"])
        out.append([step, "ok", "", logins()])
        ctx = this
    except mtls_engine.Error as exc:
        out.append([step, type(exc).__name__, str(exc), logins()])

from tests.servers import echo_server, server_context, talk

with echo_server(server_context(E["T_SCERT"], E["T_SKEY"], E["T_CA"])) as srv:
    subject = talk(ctx, srv.port)["subject"]
print(json.dumps({"steps": out, "asked": asked, "subject": subject}))
"""


def _run(card: ShimCard, pki: Pki, env: dict[str, str], backend: str, steps: list[str]) -> dict[str, Any]:
    child = {**env, "T_URI": card.key_uri, "T_BACKEND": backend, "T_CA": str(pki.ca_file), "T_GOOD": SHIM_PIN,
             "T_WRONG": WRONG, "T_STEPS": json.dumps(steps), "T_SCERT": str(pki.server_cert),
             "T_SKEY": str(pki.server_key)}  # fmt: skip
    proc = run_python(SCRIPT, child)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = Path(env["MTLS_SHIM_LOG"]).read_bytes()
    assert SHIM_PIN.encode() not in raw and WRONG.encode() not in raw
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return out


def test_a_different_pin_after_a_good_login_is_refused_without_asking_the_token(
    shim_card: ShimCard, pki: Pki, tmp_path: Path, backend: str
) -> None:
    env = shim_card.env(tmp_path, max_tries=3)
    steps = ["source", "wrong", "good", "none", "wrong-callable", "wrong-bytes", "wrong-in-uri", "good"]
    out = _run(shim_card, pki, env, backend, steps)
    results = {(step, i): (cls, msg, n) for i, (step, cls, msg, n) in enumerate(out["steps"])}
    assert [cls for _, cls, _, _ in out["steps"]] == [
        "ok", "PinIncorrect", "ok", "ok", "ok", "PinIncorrect", "PinIncorrect", "ok"
    ]  # fmt: skip
    # One C_Login, by the first load; none after it, refused or not.
    assert [n for *_, n in out["steps"]] == [1] * len(steps)
    _, message, _ = results[("wrong", 1)]
    assert message.startswith(
        f"this PIN differs from the one that logged token 'shimcard' (serial {shim_card.token.serial}, "
    )
    assert message.endswith(
        " in earlier in this process; the token was not asked (it stays logged in and would not check it, and a "
        "wrong PIN would cost a try in the next process). Give the PIN that logged it in, or pin=None to use "
        "that login"
    )
    assert results[("wrong-bytes", 5)][1] == results[("wrong-in-uri", 6)][1] == message
    # A callable is not asked for a PIN when no login is needed, as before.
    assert out["asked"] == []
    # The token's own retry counter never saw the wrong PIN.
    logins = p11shim.read_log(env["MTLS_SHIM_LOG"])
    assert [rv for name, rv, _ in logins if name == "C_Login"] == [0]
    assert not Path(env["MTLS_SHIM_STATE"]).exists() or Path(env["MTLS_SHIM_STATE"]).read_text().strip() in ("", "0")
    assert out["subject"] == "commonName=card-holder shimcard"


def test_a_wrong_pin_before_any_login_still_reaches_the_token_once(
    shim_card: ShimCard, pki: Pki, tmp_path: Path, backend: str
) -> None:
    """No login yet: there is nothing to compare with, and the token's
    verdict is what counts (then the good PIN logs in)."""
    env = shim_card.env(tmp_path, max_tries=3)
    out = _run(shim_card, pki, env, backend, ["wrong", "good", "wrong"])
    assert [(cls, n) for _, cls, _, n in out["steps"]] == [("PinIncorrect", 1), ("ok", 2), ("PinIncorrect", 2)]
    assert "rejected the PIN (CKR_PIN_INCORRECT)" in out["steps"][0][2]
    assert out["steps"][2][2].startswith("this PIN differs from the one that logged token")
    logins = p11shim.read_log(env["MTLS_SHIM_LOG"])
    assert [rv for name, rv, _ in logins if name == "C_Login"] == [0xA0, 0]


def test_a_pinpad_reader_ignores_a_pin_given_after_its_login(
    shim_card: ShimCard, pki: Pki, tmp_path: Path, backend: str
) -> None:
    """On a pinpad the PIN is typed on the reader, never given by the
    program: a pin= given after that login has nothing to be compared with."""
    env = shim_card.env(tmp_path, token_flags=["pinpad"], max_tries=3, pinpad_pin=SHIM_PIN)
    out = _run(shim_card, pki, env, backend, ["none", "wrong", "good", "none"])
    assert [(cls, n) for _, cls, _, n in out["steps"]] == [("ok", 1)] * 4
    (login,) = [rest for name, _, rest in p11shim.read_log(env["MTLS_SHIM_LOG"]) if name == "C_Login"]
    assert "pin=null" in login
    assert out["subject"] == "commonName=card-holder shimcard"
