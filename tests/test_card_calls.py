"""The card signs every handshake, and nothing else happens per handshake:
PKCS#11 calls counted through OpenSC's pkcs11-spy in a fresh process."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtls_engine._softhsm import KeyKind

from .conftest import Pki
from .helpers import count_calls, run_python

SCRIPT = """
import os, mtls_engine
from tests.servers import echo_server, server_context, talk

srv = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                 pin=os.environ["T_PIN"], backend=os.environ["T_BACKEND"])
with echo_server(srv) as s:
    for _ in range(int(os.environ["T_N"])):
        talk(ctx, s.port)
print("done")
"""

CALLS = (
    "C_Sign",
    "C_SignInit",
    "C_SignUpdate",
    "C_SignFinal",
    "C_Login",
    "C_FindObjectsInit",
    "C_OpenSession",
    "C_Initialize",
)


NOTHING_ELSE = {name: 0 for name in CALLS}


def _calls(pki: Pki, spy: str, log: Path, kind: KeyKind, handshakes: int, backend: str) -> dict[str, int]:
    proc = run_python(
        SCRIPT,
        env={"T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key), "T_CA": str(pki.ca_file),
             "T_URI": pki.key_uri(kind), "T_MODULE": spy, "T_PIN": pki.card1.pin, "T_BACKEND": backend,
             "T_N": str(handshakes),
             "PKCS11SPY": pki.module, "PKCS11SPY_OUTPUT": str(log)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "done"
    counts = {name: count_calls(log, name) for name in CALLS}
    log.unlink()  # it holds the PIN in clear
    return counts


@pytest.mark.parametrize("kind", [KeyKind.RSA2048, KeyKind.P256], ids=lambda k: k.name)
def test_one_card_signature_per_handshake_and_nothing_else(
    pki: Pki, spy: str, spy_log: Path, kind: KeyKind, backend: str
) -> None:
    one = _calls(pki, spy, spy_log, kind, 1, backend)
    six = _calls(pki, spy, spy_log, kind, 6, backend)
    per_handshake = {name: (six[name] - one[name]) / 5 for name in CALLS}
    assert one["C_Login"] == six["C_Login"] == 1, (one, six)
    # One signature per handshake, made in one call (C_Sign) or in parts
    # (C_SignUpdate/C_SignFinal, as pkcs11-provider signs RSA).
    assert one["C_Sign"] + one["C_SignFinal"] == 1, (one, six)
    assert six["C_Sign"] + six["C_SignFinal"] == 6, (one, six)
    per_handshake["C_SignUpdate"] = min(per_handshake["C_SignUpdate"], 1)  # data may come in several parts
    assert per_handshake in (
        {**NOTHING_ELSE, "C_SignInit": 1, "C_Sign": 1},
        {**NOTHING_ELSE, "C_SignInit": 1, "C_SignUpdate": 1, "C_SignFinal": 1},
    ), (one, six)


def test_a_missing_spy_log_is_not_zero_calls(tmp_path: Path) -> None:
    """count_calls on a log the spy never wrote raises instead of reading 0,
    which would pass every "no C_Login happened" check."""
    with pytest.raises(FileNotFoundError, match="the spy never ran"):
        count_calls(tmp_path / "never-written.log", "C_Login")
    log = tmp_path / "spy.log"
    log.write_text("0: C_Initialize\n2026-12-05 10:00:00.000\n1: C_Login\n[in] hSession = 0x1\n")
    assert (count_calls(log, "C_Login"), count_calls(log, "C_Sign")) == (1, 0)
