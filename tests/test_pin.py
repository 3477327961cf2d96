"""PIN sources, and the memory of rejected PINs."""

from __future__ import annotations

from pathlib import Path

import pytest

import mtls_engine
from mtls_engine._pin import PinMemory, pin_getter
from mtls_engine._uri import parse

TOKEN = mtls_engine.TokenInfo("card1", "ACME", "Card 9", "0042", 0, 1)
OTHER = mtls_engine.TokenInfo("card1", "ACME", "Card 9", "0043", 0, 2)


def test_pin_from_argument_str_bytes_callable() -> None:
    assert pin_getter("1234")(TOKEN) == b"1234"
    assert pin_getter(b"1234")(TOKEN) == b"1234"
    assert pin_getter(lambda t: f"pin-for-{t.serial}")(TOKEN) == b"pin-for-0042"
    assert pin_getter(lambda t: None)(TOKEN) is None
    assert pin_getter(None)(TOKEN) is None


def test_pin_from_uri_pin_value_and_pin_source(tmp_path: Path) -> None:
    assert pin_getter(None, parse("pkcs11:token=card1?pin-value=9876"))(TOKEN) == b"9876"
    pin_file = tmp_path / "pin"
    pin_file.write_text("24680\n")
    assert pin_getter(None, parse(f"pkcs11:token=card1?pin-source=file:{pin_file}"))(TOKEN) == b"24680"
    assert pin_getter(None, parse(f"pkcs11:token=card1?pin-source={pin_file}"))(TOKEN) == b"24680"


def test_pin_source_problems_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(mtls_engine.PinError, match=r"cannot read the PIN file .*nope"):
        pin_getter(None, parse(f"pkcs11:token=card1?pin-source=file:{missing}"))(TOKEN)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(mtls_engine.PinError, match=r"PIN file .*empty\) is empty"):
        pin_getter(None, parse(f"pkcs11:token=card1?pin-source=file:{empty}"))(TOKEN)


def test_bad_pin_types() -> None:
    with pytest.raises(mtls_engine.PinError, match="pin= must be a str, bytes or a callable, not int"):
        pin_getter(1234)  # type: ignore[arg-type]
    with pytest.raises(mtls_engine.PinError, match="the PIN callback returned int"):
        pin_getter(lambda t: 1234)(TOKEN)  # type: ignore[arg-type,return-value]


def test_rejected_pins_are_remembered_per_token_without_storing_them() -> None:
    memory = PinMemory()
    memory.remember(TOKEN, b"1111")
    assert memory.rejected(TOKEN, b"1111")
    assert not memory.rejected(TOKEN, b"2222")
    assert not memory.rejected(OTHER, b"1111")  # another card: its own counter
    assert all(b"1111" not in digest for digest in memory._rejected)
