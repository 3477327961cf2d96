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


def test_pin_sources_env_file_and_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARD_PIN", "5551234")
    src = mtls_engine.pin_source("env:CARD_PIN")
    assert repr(src) == "pin_source('env:CARD_PIN')"  # names the source, never the PIN
    assert pin_getter(src)(TOKEN) == b"5551234"
    monkeypatch.setenv("CARD_PIN", "7778888")  # read at login time, not when made
    assert pin_getter(src)(TOKEN) == b"7778888"
    f = tmp_path / "pin file"
    f.write_text("24680\n")
    assert pin_getter(mtls_engine.pin_source(f"file:{f}"))(TOKEN) == b"24680"
    assert pin_getter(mtls_engine.pin_source("file://" + str(f).replace(" ", "%20")))(TOKEN) == b"24680"

    answers = iter(["1357"])
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert pin_getter(mtls_engine.pin_source("prompt"))(TOKEN) == b"1357"


def test_pin_source_errors_name_the_source_not_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_PIN_VAR", raising=False)
    with pytest.raises(mtls_engine.PinRequired, match=r"^the environment variable NO_SUCH_PIN_VAR .* is not set"):
        mtls_engine.pin_source("env:NO_SUCH_PIN_VAR")(TOKEN)
    monkeypatch.setenv("EMPTY_PIN_VAR", "")
    with pytest.raises(mtls_engine.PinRequired, match=r"EMPTY_PIN_VAR .* is empty"):
        mtls_engine.pin_source("env:EMPTY_PIN_VAR")(TOKEN)
    with pytest.raises(mtls_engine.PinError, match=r"env:1X does not name an environment variable"):
        mtls_engine.pin_source("env:1X")
    # a PIN typed where a source belongs is refused without being echoed
    with pytest.raises(mtls_engine.PinError) as info:
        mtls_engine.pin_source("123456")
    assert "123456" not in str(info.value)
    assert str(info.value).startswith("unknown PIN source (6 characters, not shown in case it is a PIN)")
    with pytest.raises(mtls_engine.PinError, match="unknown PIN source of kind 'pin'; use env:VAR, file:PATH"):
        mtls_engine.pin_source("pin:1234")
    with pytest.raises(mtls_engine.PinError, match="a PIN source is a str"):
        mtls_engine.pin_source(1234)  # type: ignore[arg-type]


def test_prompt_without_a_terminal_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)

    def no_prompt(prompt: str) -> str:
        raise AssertionError("must not prompt without a terminal")

    monkeypatch.setattr("getpass.getpass", no_prompt)
    with pytest.raises(mtls_engine.PinRequired, match="there is no terminal to ask on; give it with --pin-source"):
        mtls_engine.prompt_pin(TOKEN)


def test_pin_memory_digest_is_the_keyed_hash_of_token_and_pin() -> None:
    """Fed in pieces (no token + PIN copy is built), the digest is still the
    HMAC-SHA256 of the token's identity, a NUL and the PIN."""
    import hashlib
    import hmac

    memory = PinMemory()
    ident = b"ACME\x00Card 9\x000042\x00card1"
    for pin in (b"1234", bytearray(b"1234"), b""):
        expected = hmac.new(memory._key, ident + b"\x00" + bytes(pin), hashlib.sha256).digest()
        assert memory._digest(TOKEN, pin) == expected
