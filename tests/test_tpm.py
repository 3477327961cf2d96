"""A TPM 2.0 token (swtpm + tpm2-abrmd + tpm2-pkcs11): handshakes with keys
generated in the TPM, check and list, and processes that leave nothing
behind in a TPM reached without a resource manager.  Every use of the TPM
runs in a child process (pkcs11-provider serves one module per process)."""

from __future__ import annotations

import json
import os
import ssl
from urllib.parse import quote

import pytest

from mtls_engine._softhsm import KeyKind

from .conftest import TEST_PIN, TPM_KEYS, Pki, TpmCard
from .helpers import run_module, run_python

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]

HANDSHAKE = """
import os, ssl
import mtls_engine
from tests.servers import echo_server, server_context, talk

srv_ctx = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                 pin=mtls_engine.pin_source("env:T_PIN"), backend=os.environ["T_BACKEND"])
if os.environ.get("T_VERSION"):
    version = ssl.TLSVersion[os.environ["T_VERSION"]]
    if ctx.maximum_version == ssl.TLSVersion.TLSv1_2:  # mtls_engine capped it: the token has no RSA-PSS
        print("capped")
        version = ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = version
with echo_server(srv_ctx) as srv:
    answer = talk(ctx, srv.port)
print(answer["subject"])
print(answer["version"])
"""


def _env(pki: Pki, card: TpmCard, kind: KeyKind, backend: str, version: str = "") -> dict[str, str]:
    return {**card.env(), "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key), "T_CA": str(pki.ca_file),
            "T_URI": card.key_uri(kind), "T_MODULE": card.module, "T_PIN": TEST_PIN, "T_BACKEND": backend,
            "T_VERSION": version}  # fmt: skip


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("kind", list(TPM_KEYS), ids=lambda k: k.name)
def test_tpm_key_handshake(pki: Pki, tpm_card: TpmCard, kind: KeyKind, version: ssl.TLSVersion, backend: str) -> None:
    proc = run_python(HANDSHAKE, env=_env(pki, tpm_card, kind, backend, version.name))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    expected = version.name
    if lines[0] == "capped":
        # tpm2-pkcs11 1.9 on swtpm lists no CKM_RSA_PKCS_PSS (measured):
        # mtls_engine then signs PKCS#1 v1.5 over TLS 1.2, and says so.
        assert kind is KeyKind.RSA2048
        assert "the token cannot sign RSA-PSS" in proc.stderr
        expected = "TLSv1_2"
        lines = lines[1:]
    else:
        assert proc.stderr == ""  # nothing from the TSS either
    assert lines == [
        f"commonName=card-holder tpm1 {TPM_KEYS[kind].label}",
        {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[expected],
    ]
    assert "esys" not in proc.stderr


def test_five_processes_in_a_row_without_resource_manager(pki: Pki, tpm_direct: TpmCard, backend: str) -> None:
    """A TPM holds 3 loaded objects and sessions: each process must leave
    none behind (C_Finalize at exit), or the third one cannot log in."""
    tpm = tpm_direct.tpm
    assert not tpm.resource_manager and tpm.env()["TPM2_PKCS11_TCTI"].startswith("swtpm:")
    for i in range(5):
        proc = run_python(HANDSHAKE, env=_env(pki, tpm_direct, KeyKind.P256, backend))
        assert proc.returncode == 0, f"process {i + 1}: {proc.stderr[-2000:]}"
        assert proc.stdout.splitlines()[0] == "commonName=card-holder tpmdirect ec256"
        for kind in ("handles-transient", "handles-loaded-session", "handles-saved-session"):
            assert tpm.handles(kind) == [], f"after process {i + 1}: {kind}"


def _cli(card: TpmCard, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in card.env().items() if k != "TSS2_LOG"}  # the CLI must quiet the TSS itself
    saved = dict(os.environ)
    os.environ.update(env)
    os.environ.pop("TSS2_LOG", None)
    os.environ["T_PIN"] = TEST_PIN
    try:
        proc = run_module("mtls_engine", *args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return proc.returncode, proc.stdout, proc.stderr


def test_list_on_tpm(tpm_card: TpmCard) -> None:
    code, out, err = _cli(tpm_card, "list", "--module", tpm_card.module, "--json", "--login",
                          "--token", "pkcs11:token=tpm1", "--pin-source", "env:T_PIN")  # fmt: skip
    assert code == 0, err
    assert err == ""
    tokens = [s["token"] for s in json.loads(out)["slots"] if s["token"] and s["token"]["label"] == "tpm1"]
    assert len(tokens) == 1
    tok = tokens[0]
    assert tok["token_kind"] == "tpm"
    assert tok["pin_state"] == "not_reported"
    assert tok["serial"] == "0000000000000000"
    # The serial says nothing (all zeros on every TPM token): the key URIs
    # mtls_engine builds also name the token's manufacturer and model.
    uris = [o["uri"] for o in tok["objects"] if o["class"] == "private_key"]
    named = f";manufacturer={quote(tok['manufacturer'], safe='')};model={quote(tok['model'], safe='')};"
    assert tok["model"] and uris and all(named in u for u in uris), (named, uris)
    assert tok["uri"].endswith(named[:-1]), tok["uri"]
    labels = {(o["class"], o["label"]) for o in tok["objects"]}
    assert {("private_key", "rsa2048"), ("private_key", "ec256"), ("certificate", "ec256")} <= labels
    code, out, err = _cli(tpm_card, "list", "--module", tpm_card.module)
    assert code == 0 and err == "", err
    assert "    PIN    tries not reported by this token" in out
    assert "    kind   tpm" in out


@pytest.mark.parametrize("kind", list(TPM_KEYS), ids=lambda k: k.name)
def test_check_on_tpm(tpm_card: TpmCard, kind: KeyKind, backend: str) -> None:
    code, out, err = _cli(tpm_card, "check", "--module", tpm_card.module, "--key", tpm_card.key_uri(kind),
                          "--pin-source", "env:T_PIN", "--backend", backend, "--json")  # fmt: skip
    assert code == 0, out + err
    assert err == ""
    steps = {s["id"]: s for s in json.loads(out)["steps"]}
    assert [sid for sid, s in steps.items() if s["status"] == "fail"] == [], out
    assert steps["signature"]["status"] == "ok" and steps["login"]["status"] == "ok", out
    token = steps["token"]
    assert token["facts"]["token_kind"] == "tpm"
    assert token["facts"]["pin_state"] == "not_reported"
    assert "PIN tries: not reported by this token" in token["summary"]
    assert "force= has nothing to override" in token["summary"]


def test_wrong_pins_then_tpm_lockout_advice(tpm_direct: TpmCard) -> None:
    """Wrong PINs, one per process, until the TPM's dictionary-attack
    lockout: each failure says the token does not report its tries, the
    TSS's error lines stay out of check's output, and the lockout gets the
    TPM's remedies (not the PUK / SO PIN of a smart card)."""
    os.environ["T_WRONG"] = "11112222"
    try:
        results = [
            _cli(
                tpm_direct,
                "check",
                "--module",
                tpm_direct.module,
                "--key",
                tpm_direct.key_uri(KeyKind.P256),
                "--pin-source",
                "env:T_WRONG",
                "--json",
            )
            for _ in range(4)
        ]
    finally:
        del os.environ["T_WRONG"]
    logins = []
    for code, out, err in results:
        assert code == 1
        # The TSS's lines ("WARNING:esys:...", "ERROR:esys:...") are silenced;
        # tpm2-pkcs11 logs its own errors whatever TPM2_PKCS11_LOG_LEVEL says
        # (measured, 1.9): those reach stderr, never stdout.
        assert ":esys:" not in out + err, err
        assert "ERROR" not in out
        steps = {s["id"]: s for s in json.loads(out)["steps"]}
        assert steps["token"]["status"] == "ok"  # the TPM never reports the lockout in the token flags
        logins.append(steps["login"])
    errors = [s["facts"].get("error") for s in logins]
    first_locked = errors.index("PinLocked")  # 3 failures lock swtpm's TPM (measured); where, comes from the TPM
    assert first_locked >= 1 and errors[:first_locked] == ["PinIncorrect"] * first_locked, errors
    assert "This token does not say how many tries are left" in logins[0]["summary"]
    locked = logins[first_locked]
    assert "CKR_PIN_LOCKED" in locked["summary"]
    assert "tpm2_dictionarylockout --clear-lockout" in locked["hint"]
    assert "unlock-pin" not in locked["hint"] + locked["summary"]


def test_uris_that_list_prints_name_the_tpm_token(tpm_card: TpmCard) -> None:
    """Every TPM token's serial is all zeros: the URIs list prints (with
    manufacturer and model) still find the token and the key."""
    code, out, err = _cli(tpm_card, "list", "--module", tpm_card.module, "--json", "--login",
                          "--token", "pkcs11:token=tpm1", "--pin-source", "env:T_PIN")  # fmt: skip
    assert code == 0, err
    tok = next(s["token"] for s in json.loads(out)["slots"] if s["token"] and s["token"]["label"] == "tpm1")
    key = next(o["uri"] for o in tok["objects"] if o["class"] == "private_key" and o["label"] == "ec256")
    for uri in (key, tok["uri"] + ";object=ec256;type=private"):
        code, out, err = _cli(tpm_card, "check", "--module", tpm_card.module, "--key", uri,
                              "--pin-source", "env:T_PIN", "--json")  # fmt: skip
        assert code == 0, out + err
        steps = {s["id"]: s for s in json.loads(out)["steps"]}
        assert steps["key"]["facts"]["label"] == "ec256", steps["key"]
