"""Tokens beyond a plain SoftHSM2 token: a reader whose card the module
does not recognise (shim: C_GetTokenInfo fails), what each kind of token
reports about its PIN counters, and commands whose reader goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtls_engine._softhsm import KeyKind, TokenStore

from . import p11shim
from .conftest import SHIM_PIN, TEST_PIN, Pki, need
from .helpers import ROOT, run_python
from .servers import https_server, server_context

CKR_DEVICE_REMOVED = 0x32
CKR_TOKEN_NOT_RECOGNIZED = 0xE1


def _run(env: dict[str, str], *args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "mtls_engine", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=full, cwd=str(ROOT), timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def two_cards(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenStore]:
    """A shim over a token store with two cards: goodcard (a P-256 key and
    its certificate) and oddcard, which tests make unreadable."""
    try:
        shim = p11shim.build()
    except p11shim.ShimUnavailable as exc:
        need(False, str(exc))
        raise
    work = tmp_path_factory.mktemp("twocards")
    store = TokenStore.create(work / "softhsm")
    good = store.init_token("goodcard", pin=SHIM_PIN)
    pub = good.generate_key(KeyKind.P256, "ec256", "02")
    good.store_certificate(pki.ca.issue(pub, "card-holder goodcard"), "ec256", "02", work)
    store.init_token("oddcard", pin=SHIM_PIN)
    return shim, store


def _env(two_cards: tuple[Path, TokenStore], tmp_path: Path, rv: int) -> dict[str, str]:
    _shim, store = two_cards
    return {**p11shim.shim_env(store.module, tmp_path, token_error=("oddcard", rv)), **store.env,
            "T_PIN": SHIM_PIN}  # fmt: skip


@pytest.mark.parametrize(
    ("rv", "code", "text"),
    [(CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED", "card present, not recognised by this module"),
     (CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED", "card removed while it was being read")],
)  # fmt: skip
def test_list_shows_an_unreadable_card_and_the_others(
    two_cards: tuple[Path, TokenStore], tmp_path: Path, rv: int, code: str, text: str
) -> None:
    env = _env(two_cards, tmp_path, rv)
    shim = str(two_cards[0])
    proc = _run(env, "list", "--module", shim, "--json")
    assert proc.returncode == 0, proc.stderr
    slots = json.loads(proc.stdout)["slots"]
    odd = [s for s in slots if s.get("token_error")]
    assert [s["token_error"] for s in odd] == [{"code": code, "text": text}]
    assert odd[0]["token"] is None
    labels = [s["token"]["label"] for s in slots if s["token"] and s["token"]["initialized"]]
    assert labels == ["goodcard"]
    proc = _run(env, "list", "--module", shim)
    assert proc.returncode == 0, proc.stderr
    assert f"  {text} ({code})" in proc.stdout.splitlines()
    assert "token 'goodcard'" in proc.stdout


def test_check_says_the_card_is_not_recognised(two_cards: tuple[Path, TokenStore], tmp_path: Path) -> None:
    env = _env(two_cards, tmp_path, CKR_TOKEN_NOT_RECOGNIZED)
    proc = _run(env, "check", "--module", str(two_cards[0]), "--key", "pkcs11:token=oddcard",
                "--pin-source", "env:T_PIN", "--json")  # fmt: skip
    assert proc.returncode == 1
    token = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}["token"]
    assert token["status"] == "fail"
    assert "a card is in reader 'SoftHSM slot ID" in token["summary"]
    assert "but this module does not recognise it (CKR_TOKEN_NOT_RECOGNIZED)" in token["summary"]
    assert "tokens present: token 'goodcard'" in token["summary"]
    assert "its own middleware" in token["hint"] and "OpenSC with a driver" in token["hint"]
    assert "Insert the card" not in token["summary"] + token["hint"]
    # the other card is still usable
    proc = _run(env, "check", "--module", str(two_cards[0]), "--key", "pkcs11:token=goodcard",
                "--pin-source", "env:T_PIN")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # a card pulled while the module read it
    env = _env(two_cards, tmp_path / "removed", CKR_DEVICE_REMOVED)
    proc = _run(env, "check", "--module", str(two_cards[0]), "--key", "pkcs11:token=oddcard",
                "--pin-source", "env:T_PIN", "--json")  # fmt: skip
    assert proc.returncode == 1
    token = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}["token"]
    assert "but this module lost it while reading it (CKR_DEVICE_REMOVED)" in token["summary"]
    assert token["hint"] == "leave the card in the reader and run check again"


def test_connect_says_the_card_is_not_recognised(pki: Pki, two_cards: tuple[Path, TokenStore], tmp_path: Path) -> None:
    env = _env(two_cards, tmp_path, CKR_TOKEN_NOT_RECOGNIZED)
    with https_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as port:
        proc = _run(env, "connect", f"https://localhost:{port}/", "--module", str(two_cards[0]),
                    "--key", "pkcs11:token=oddcard", "--pin-source", "env:T_PIN",
                    "--cafile", str(pki.ca_file))  # fmt: skip
    assert proc.returncode == 1
    assert "does not recognise it (CKR_TOKEN_NOT_RECOGNIZED)" in proc.stderr
    assert "Use the PKCS#11 module of the card's own middleware" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_softhsm_pin_counters_are_not_reported(pki: Pki) -> None:
    """SoftHSM2 has no retry counter: list and check say so instead of
    "PIN ok" / "PIN tries: not low"."""
    env = {"T_PIN": TEST_PIN}
    proc = _run(env, "list", "--module", pki.module)
    assert proc.returncode == 0, proc.stderr
    assert "    PIN    tries not reported by this token (length" in proc.stdout
    assert "    kind   software" in proc.stdout
    assert "PIN    tries ok" not in proc.stdout
    proc = _run(env, "check", "--module", pki.module, "--key", pki.key_uri(KeyKind.P256), "--pin-source",
                "env:T_PIN", "--json")  # fmt: skip
    token = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}["token"]
    assert (token["facts"]["token_kind"], token["facts"]["pin_state"]) == ("software", "not_reported")
    assert "PIN tries: not reported by this token" in token["summary"]
    assert "not low" not in token["summary"]


def test_a_reported_flag_is_believed_and_lockout_advice_fits_a_software_token(
    shim_card: object, tmp_path: Path
) -> None:
    """The shim sets CKF_USER_PIN_LOCKED on a SoftHSM2 token: the flag is a
    fact (locked), and the advice is a software token's, not a PUK."""
    env = shim_card.env(tmp_path, token_flags=["locked"])  # type: ignore[attr-defined]
    env["T_PIN"] = SHIM_PIN
    proc = _run(env, "check", "--module", env["T_MODULE"], "--key", shim_card.key_uri,  # type: ignore[attr-defined]
                "--pin-source", "env:T_PIN", "--json")  # fmt: skip
    assert proc.returncode == 1
    token = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}["token"]
    assert (token["status"], token["facts"]["pin_state"], token["facts"]["token_kind"]) == (
        "fail",
        "locked",
        "software",
    )
    assert "--init-pin --login --login-type so" in token["hint"]
    assert "unlock-pin" not in token["hint"]


def _with_closed_reader(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run a command whose standard output is a pipe nobody reads any more."""
    r, w = os.pipe()
    os.close(r)
    try:
        return _run(env, *args, stdout=w)
    finally:
        os.close(w)


def test_every_printing_command_exits_quietly_when_its_reader_goes_away(pki: Pki, tmp_path: Path) -> None:
    env = {"T_PIN": TEST_PIN}
    key = pki.key_uri(KeyKind.P256)
    card = ["--module", pki.module, "--pin-source", "env:T_PIN"]
    with https_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as port:
        commands = [
            ["check", *card, "--key", key, "--json"],
            ["check", *card, "--key", key],
            ["list", "--module", pki.module],
            ["list", "--module", pki.module, "--json"],
            ["config", "--module", pki.module],
            ["uri-pem", key],
            ["connect", f"https://localhost:{port}/", *card, "--key", key, "--cafile", str(pki.ca_file)],
            ["connect", f"https://localhost:{port}/", *card, "--key", key, "--cafile", str(pki.ca_file), "--json"],
        ]
        for args in commands:
            proc = _with_closed_reader(env, *args)
            assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, (args, proc.stderr)
            assert proc.returncode == 141, (args, proc.returncode, proc.stderr)


# What the module and its token say they are (shim: MTLS_SHIM_IDENTITY),
# the kind mtls_engine makes of it, and a phrase of that kind's advice for
# a locked PIN.
KINDS = {
    "smart_card": (("OpenSC Project", "OpenSC smartcard framework", "piv_II", "PKCS#15 emulated"),
                   "PUK or security officer PIN"),
    "hsm": (("Safenet, Inc.", "Chrystoki", "Safenet, Inc.", "Luna K7"), "the HSM's security officer"),
    "tpm": (("tpm2-software.github.io", "TPM2.0 Cryptoki", "IBM", "SW   TPM"), "tpm2_dictionarylockout"),
    "unknown": (("ACME", "ACME PKCS#11", "ACME", "Token 1"), "security officer PIN or PUK (e.g."),
}  # fmt: skip


def _kind_check(shim_card: object, tmp_path: Path, kind: str, flags: list[str]) -> dict[str, object]:
    env = shim_card.env(tmp_path, token_flags=flags, identity=KINDS[kind][0])  # type: ignore[attr-defined]
    env["T_PIN"] = SHIM_PIN
    proc = _run(env, "check", "--module", env["T_MODULE"], "--key", shim_card.key_uri,  # type: ignore[attr-defined]
                "--pin-source", "env:T_PIN", "--json")  # fmt: skip
    token: dict[str, object] = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}["token"]
    return token


@pytest.mark.parametrize("kind", list(KINDS))
def test_lockout_advice_fits_the_kind_of_token(shim_card: object, tmp_path: Path, kind: str) -> None:
    token = _kind_check(shim_card, tmp_path, kind, ["locked"])
    facts = token["facts"]
    assert isinstance(facts, dict) and (facts["token_kind"], facts["pin_state"]) == (kind, "locked")
    assert token["status"] == "fail"
    assert KINDS[kind][1] in str(token["hint"])
    for other, (_, phrase) in KINDS.items():
        if other != kind:
            assert phrase not in str(token["hint"]), other


@pytest.mark.parametrize(("kind", "state"), [("smart_card", "ok"), ("hsm", "ok"), ("tpm", "not_reported"),
                                             ("unknown", "ok")])  # fmt: skip
def test_pin_counters_are_believed_only_where_the_kind_reports_them(
    shim_card: object, tmp_path: Path, kind: str, state: str
) -> None:
    token = _kind_check(shim_card, tmp_path, kind, [])
    facts = token["facts"]
    assert isinstance(facts, dict) and (facts["token_kind"], facts["pin_state"]) == (kind, state)
    assert token["status"] == "ok"
    if state == "ok":
        assert str(token["summary"]).endswith("; PIN tries: not low")
    else:
        assert "PIN tries: not reported by this token" in str(token["summary"])


def test_locked_pin_error_of_the_api_fits_the_kind(shim_card: object, tmp_path: Path) -> None:
    """load_card_key's PinLocked (no login tried) carries a TPM's remedies."""
    env = shim_card.env(tmp_path, token_flags=["locked"], identity=KINDS["tpm"][0])  # type: ignore[attr-defined]
    proc = run_python(
        """
        import os, ssl, mtls_engine
        ctx = ssl.create_default_context()
        try:
            mtls_engine.load_card_key(ctx, os.environ["T_URI"], module=os.environ["T_MODULE"], pin=os.environ["T_PIN"])
        except mtls_engine.PinLocked as exc:
            print(exc)
        """,
        env={**env, "T_URI": shim_card.key_uri, "T_PIN": SHIM_PIN},  # type: ignore[attr-defined]
    )
    assert proc.returncode == 0, proc.stderr
    assert "mtls_engine did not try to log in" in proc.stdout
    assert "tpm2_dictionarylockout --clear-lockout" in proc.stdout
    assert "unlock-pin" not in proc.stdout
    assert p11shim.count(env["MTLS_SHIM_LOG"], "C_Login") == 0
