"""``python -m mtls_engine list`` on the fixture tokens, and the PKCS#11
names it prints checked against the system's pkcs11.h."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mtls_engine import _names

from .conftest import Pki, need
from .registry import Registry
from .test_check import assert_no_pin, run_cli

FIXTURE_PRIVATE_KEYS = {
    ("rsa2048", "01", "RSA", 2048),
    ("ec256", "02", "EC", 256),
    ("ec384", "03", "EC", 384),
    ("twin", "10", "EC", 256),
    ("twin", "11", "EC", 256),
    ("wrongcert", "05", "EC", 256),
    ("nopss", "09", "RSA", 2048),
}


def _token(data: dict[str, Any], label: str) -> dict[str, Any]:
    tokens = [s["token"] for s in data["slots"] if s["token"] and s["token"]["label"] == label]
    assert len(tokens) == 1
    return tokens[0]


def test_list_after_login_shows_serial_mechanisms_and_every_object(pki: Pki, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text(pki.card1.pin)
    proc = run_cli("list", "--module", pki.module, "--login", "--token", pki.card1.uri(),
                   "--pin-source", f"file:{pin}", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_no_pin(pki, proc.stdout, proc.stderr)
    data = json.loads(proc.stdout)
    assert data["module"]["path"] == pki.module and data["module"]["cryptoki_version"] == "2.40"
    tok = _token(data, "card1")
    assert tok["serial"] == pki.card1.serial
    assert tok["logged_in"] is True and tok["pin_state"] == "not_reported"  # SoftHSM2: no retry counter
    mechs = {m["name"]: m for m in tok["mechanisms"]}
    assert {"CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS", "CKM_ECDSA", "CKM_SHA256"} <= set(mechs)
    assert "CKF_SIGN" in mechs["CKM_ECDSA"]["flags"] and mechs["CKM_RSA_PKCS"]["max_key_size"] >= 2048
    keys = {(o["label"], o["id"], o["type"], o["bits"]) for o in tok["objects"] if o["class"] == "private_key"}
    assert keys == FIXTURE_PRIVATE_KEYS
    nopss = next(o for o in tok["objects"] if o["class"] == "private_key" and o["label"] == "nopss")
    assert "CKM_RSA_PKCS_PSS" not in nopss["allowed_mechanisms"]
    certs = {o["label"]: o for o in tok["objects"] if o["class"] == "certificate"}
    assert set(certs) == {"rsa2048", "ec256", "ec384", "wrongcert", "nopss"}
    assert certs["ec256"]["subject"] == "CN=card-holder ec256"
    assert certs["ec256"]["issuer"] == "CN=mtls_engine test CA"
    assert certs["ec256"]["not_after"] > certs["ec256"]["not_before"]
    # the other tokens were not logged in to: their private keys stay hidden
    other = _token(data, "card2")
    assert other["logged_in"] is False
    assert [o["class"] for o in other["objects"]] == ["certificate", "public_key"]


def test_list_text_without_login(pki: Pki) -> None:
    proc = run_cli("list", "--module", pki.module)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"token 'card1' serial {pki.card1.serial}" in out
    assert "not logged in: private objects hidden; add --login" in out
    assert re.search(r"CKM_ECDSA\s+\d+-\d+\s+sign verify", out)
    assert "certificate  ec256 id 02: CN=card-holder ec256" in out
    assert "private key" not in out
    assert "token not initialised" in out  # SoftHSM2's spare slot


def test_list_login_needs_one_token(pki: Pki, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text(pki.card1.pin)
    proc = run_cli("list", "--module", pki.module, "--login", "--pin-source", f"file:{pin}")
    assert proc.returncode == 1
    assert proc.stderr.startswith("mtls_engine: AmbiguousUri: 3 tokens match 'pkcs11:'")
    assert "does not log in to a token it would have to guess" in proc.stderr


def test_list_without_module_and_nothing_registered(pki: Pki, tmp_path: Path) -> None:
    proc = Registry(tmp_path / "registry").cli("list", extra=pki.folder.env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "mtls_engine: ModuleLoadError: no PKCS#11 module given and none is registered with p11-kit; "
        "register your card's middleware with p11-kit: a one-line file such as /etc/pkcs11/modules/mycard.module "
        "(or ~/.config/pkcs11/modules/mycard.module) containing 'module: /path/to/your-pkcs11-library.so'; or pass "
        "module= (--module), set $MTLS_ENGINE_MODULE, or add module-path=... to the key URI"
    )


def _header_defines() -> dict[str, int]:
    for p in (Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h"),):
        if p.exists():
            text = p.read_text()
            out = {}
            for name, value in re.findall(r"#define\s+(CK[MFK]_\w+)\s+\(([^)]*)\)", text):
                value = value.replace("UL", "")
                shift = re.fullmatch(r"1\s*<<\s*(\d+)", value)
                try:
                    out[name] = 1 << int(shift.group(1)) if shift else int(value, 0)
                except ValueError:
                    continue
            return out
    need(False, "p11-kit's pkcs11.h (Debian: libp11-kit-dev) to check the names against")
    return {}


def test_names_agree_with_pkcs11_h() -> None:
    defines = _header_defines()
    tables = [_names.MECHANISMS, _names.TOKEN_FLAGS, _names.MECHANISM_FLAGS, _names.SLOT_FLAGS]
    checked = 0
    for table in tables:
        for value, name in table.items():
            if name in defines:
                assert defines[name] == value, name
                checked += 1
    assert checked >= 100
    assert _names.flags(0x0C | (1 << 30), _names.TOKEN_FLAGS) == [
        "CKF_LOGIN_REQUIRED",
        "CKF_USER_PIN_INITIALIZED",
        "0x40000000",
    ]
    assert _names.mechanism(0x80000001) == "0x80000001"
