"""Where a PIN could show, and how long its copies live.

No error, repr, log line or message shows a PIN, whatever the URI around it;
the command line refuses a PIN in its arguments; PIN copies are wiped after
the login (in a forked child too); a PIN file is read as its first line;
``protect_process`` keeps a card-holding process out of core dumps.
"""

from __future__ import annotations

import json
import logging
import ssl
import string
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mtls_engine
from mtls_engine._backends import provider_status
from mtls_engine._cli import main
from mtls_engine._pin import pin_getter
from mtls_engine._softhsm import KeyKind
from mtls_engine._uri import parse, redact

from .conftest import SHIM_PIN, Pki, ShimCard, need
from .helpers import count_calls, run_module, run_python
from .test_hostile_input import SCALE

TOKEN = mtls_engine.TokenInfo("card1", "ACME", "Card 9", "0042", 0, 1)

# A marker in the middle of every generated PIN: a leak of any part of the
# PIN between the characters that cut URIs apart shows as the marker.
MARK = "Qz7Wx"
SPECIALS = "#?&;%=/:, +"
pin_part = st.text(alphabet=string.digits + string.ascii_letters + SPECIALS + "é€\t", max_size=10)
pins = st.builds(lambda a, b: a + MARK + b, pin_part, pin_part)


def _encodings(pin: str) -> list[str]:
    """The PIN as a URI may carry it: as typed, fully percent-encoded, and
    with only the characters that cut a URI encoded."""
    partly = "".join(urllib.parse.quote(c, safe="") if c in "#?&;%=" else c for c in pin)
    return [pin, urllib.parse.quote(pin, safe=""), partly]


def _forms(pin: str) -> list[str]:
    """What must never be shown: the PIN, its encodings, and the marker."""
    return [*{*_encodings(pin), urllib.parse.quote(pin), urllib.parse.quote_plus(pin)}, MARK]


PLACES = [
    "pkcs11:token=card1;object=key?pin-value={}",
    "pkcs11:token=card1;object=key?module-path=/x.so&pin-value={}",
    "pkcs11:token=card1;object=key?pin-value={}&module-name=m",
    "pkcs11:token=card1?pin={}",  # misspelt
    "pkcs11:token=card1?pin%2dvalue={}",  # percent-encoded name
    "pkcs11:token=card1?PIN-VALUE={}",
    "pkcs11:token=card1;pin-value={}",  # in the path
    "pkcs11:token=card1;object=key;pin={}?pin-source=file:/x",
    "pkcs11:token=card1?pin-value={}&pin-value=1",  # twice
    "pkcs11:token=card1;type=bogus?pin-value={}",
    "pkcs11:token=%zz?pin-value={}",  # malformed for p11-kit
    " pkcs11:token=card1?pin-value={}",  # not a pkcs11: URI
    "pkcs11:token=card1?pin-value={}\x00",
]


def _assert_hidden(text: str, pin: str) -> None:
    for form in _forms(pin):
        assert form not in text, (form, text)


@settings(max_examples=300 * SCALE, deadline=None)
@given(pins, st.sampled_from(PLACES), st.integers(min_value=0, max_value=2))
def test_no_pin_in_any_shown_form_of_a_uri(pin: str, place: str, encoding: int) -> None:
    """Every way a URI is shown (redact(), a ParsedUri's repr and safe form,
    every UriError, the PIN-twice error) hides every form of the PIN."""
    uri = place.format(_encodings(pin)[encoding])
    _assert_hidden(redact(uri), pin)
    try:
        parsed = parse(uri)
    except mtls_engine.UriError as exc:
        _assert_hidden(str(exc), pin)
        _assert_hidden(repr(exc), pin)
        return
    for shown in (repr(parsed), str(parsed), parsed.safe, parsed.describe_object()):
        _assert_hidden(shown, pin)
    try:
        pin_getter("0000", parsed)
    except mtls_engine.PinError as exc:
        _assert_hidden(str(exc), pin)


@settings(max_examples=200 * SCALE, deadline=None)
@given(st.binary(max_size=10), st.binary(max_size=10), st.sampled_from(PLACES))
def test_no_pin_bytes_in_any_shown_form_of_a_uri(head: bytes, tail: bytes, place: str) -> None:
    """A PIN of any bytes (not UTF-8, NUL, separators), percent-encoded."""
    pin = head + MARK.encode() + tail
    encoded = urllib.parse.quote_from_bytes(pin, safe="")
    forms = [encoded, encoded.lower(), MARK]
    uri = place.format(encoded)
    shown = [redact(uri)]
    try:
        parsed = parse(uri)
        shown += [repr(parsed), parsed.safe]
    except mtls_engine.UriError as exc:
        shown.append(str(exc))
    for text in shown:
        assert not any(form in text for form in forms), text


def test_redact_masks_the_whole_value() -> None:
    """p11-kit keeps '#' and '?' in a value: the whole value is masked."""
    assert redact("pkcs11:token=a;object=b?pin-value=5820#9461") == "pkcs11:token=a;object=b?pin-value=***"
    assert redact("pkcs11:token=a?pin-value=58?20&module-path=/m.so") == "pkcs11:token=a?pin-value=***&***"
    parsed = parse("pkcs11:token=a;object=b?pin-value=5820#9461")
    assert parsed.pin_value == "5820#9461"  # what p11-kit reads, so what must be hidden
    assert repr(parsed) == "ParsedUri('pkcs11:token=a;object=b?pin-value=***')"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("pkcs11:token=card1?pin=SECRET77", "unknown query attribute 'pin'; did you mean 'pin-value'?"),
        ("pkcs11:token=card1?pin%2dvalue=SECRET77", "write the name 'pin-value' without percent-encoding"),
        ("pkcs11:token=card1;pin-value=SECRET77", "pin-value is a query attribute: put it after '?'"),
        ("pkcs11:token=card1?pin-value=SEC&RET77", "not shown in case it is part of a PIN"),
    ],
)
def test_misspelt_attributes_are_named_without_the_pin(uri: str, message: str) -> None:
    with pytest.raises(mtls_engine.UriError) as exc:
        parse(uri)
    assert message in str(exc.value)
    assert "SECRET77" not in str(exc.value) and "RET77" not in str(exc.value)


def test_no_pin_in_errors_or_log_lines_of_a_real_load(
    pki: Pki, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Through the real module: the token is not found, and neither the
    error nor any log record shows the PIN."""
    pin = f"58#2?{MARK}0&9;4%61"
    caplog.set_level(logging.DEBUG, logger="mtls_engine")
    for encoded in _encodings(pin):
        uri = f"pkcs11:token=nosuchcard;object=ec256?pin-value={encoded}"
        with pytest.raises(mtls_engine.Error) as exc:
            mtls_engine.load_card_key(ssl.create_default_context(), uri, module=pki.module)
        _assert_hidden(str(exc.value), pin)
    _assert_hidden("\n".join(r.getMessage() for r in caplog.records), pin)


# -- the command line ----------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["connect", "https://localhost:1/", "--key", "pkcs11:token=card1;object=ec256?pin-value=24681357"],
        [
            "connect",
            "https://localhost:1/",
            "--key",
            "pkcs11:token=card1;object=ec256",
            "--cert",
            "pkcs11:token=card1;object=ec256?PIN-VALUE=24681357",
        ],
        ["check", "--key", "pkcs11:token=card1;object=ec256?module-path=/m.so&pin-value=24681357"],
        ["list", "--login", "--token", "pkcs11:token=card1?pin%2Dvalue=24681357"],
        ["uri-pem", "pkcs11:token=card1;object=ec256?pin-value=24681357"],
        ["serve", "--key", "pkcs11:token=card1;pin-value=24681357", "--client-ca", "ca.pem"],
    ],
    ids=["connect-key", "connect-cert", "check", "list-token", "uri-pem", "serve"],
)
def test_cli_refuses_a_pin_in_its_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("mtls_engine: PinOnCommandLine: ")
    assert "carries a pin-value" in err and "--pin-source env:VAR|file:PATH" in err
    assert "24681357" not in out + err


def test_cli_refusal_is_a_usage_error_of_the_whole_process(pki: Pki) -> None:
    proc = run_module("mtls_engine", "connect", "https://localhost:1/", "--module", pki.module,
                      "--key", pki.key_uri(KeyKind.P256) + "?pin-value=" + pki.card1.pin)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "PinOnCommandLine: --key carries a pin-value" in proc.stderr
    assert pki.card1.pin not in proc.stdout + proc.stderr


def test_cli_keeps_a_pin_source_in_a_uri(capsys: pytest.CaptureFixture[str]) -> None:
    """pin-source names a file, not a PIN: it is not refused."""
    code = main(["uri-pem", "pkcs11:token=card1;object=ec256?pin-source=file:/pin"])
    assert code == 0
    assert "PinOnCommandLine" not in capsys.readouterr().err


# -- PIN files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "pin"),
    [
        (b"2468\n", b"2468"),
        (b"2468", b"2468"),
        (b"2468\r\n", b"2468"),
        (b"2468\n\n \n", b"2468"),
        (b"24 68\n", b"24 68"),
    ],
)
def test_pin_file_is_read_as_its_first_line(tmp_path: Path, data: bytes, pin: bytes) -> None:
    f = tmp_path / "pin"
    f.write_bytes(data)
    got = mtls_engine.pin_source(f"file:{f}")(TOKEN)
    assert isinstance(got, bytearray) and got == pin


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"2468\n1357\n", "has more than one line; it must hold the PIN on its first line only"),
        (b"\n2468\n", "has more than one line"),
        (b"2468\r\n#comment\n", "has more than one line"),
        (b"1" * 4097, "is larger than 4096 bytes"),
        (b"", "is empty"),
        (b"\r\n", "is empty"),
    ],
)
def test_pin_file_problems_are_named(tmp_path: Path, data: bytes, message: str) -> None:
    f = tmp_path / "pin"
    f.write_bytes(data)
    with pytest.raises(mtls_engine.PinError) as exc:
        mtls_engine.pin_source(f"file:{f}")(TOKEN)
    assert message in str(exc.value) and str(f) in str(exc.value)
    assert "2468" not in str(exc.value) and "1357" not in str(exc.value)


TWO_LINE_SCRIPT = """
import os, ssl, mtls_engine
try:
    mtls_engine.load_card_key(ssl.create_default_context(), os.environ["T_URI"], module=os.environ["T_MODULE"],
                              pin=mtls_engine.pin_source("file:" + os.environ["T_PIN_FILE"]))
except mtls_engine.PinError as exc:
    print(type(exc).__name__ + ":", exc)
"""


def test_a_two_line_pin_file_costs_no_login(pki: Pki, spy: str, spy_log: Path, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(f"{pki.card1.pin}\n{pki.card1.pin}\n")
    proc = run_python(TWO_LINE_SCRIPT, env={"T_URI": pki.key_uri(KeyKind.P256), "T_MODULE": spy,
                                            "T_PIN_FILE": str(pin_file), "PKCS11SPY": pki.module,
                                            "PKCS11SPY_OUTPUT": str(spy_log)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PinError: the PIN file named by file:"), proc.stdout
    assert "has more than one line" in proc.stdout
    assert count_calls(spy_log, "C_GetTokenInfo") >= 1  # it found the token ...
    assert count_calls(spy_log, "C_Login") == 0  # ... and did not log in
    spy_log.unlink()


# -- PIN copies are wiped --------------------------------------------------------

WIPE_SCRIPT = """
import json, os, ssl
import mtls_engine, mtls_engine._api as api

made = []  # every PIN copy the getter handed out
real = api.pin_getter

def recording(pin, *uris):
    get = real(pin, *uris)
    def got(token):
        out = get(token)
        made.append(out)
        return out
    return got

api.pin_getter = recording

def state():
    return [{"type": type(b).__name__, "length": len(b), "wiped": not any(b)} for b in made]

mtls_engine.load_card_key(ssl.create_default_context(), os.environ["T_URI"], module=os.environ["T_MODULE"],
                          pin=mtls_engine.pin_source("env:T_PIN"), backend=os.environ["T_BACKEND"])
parent = state()
made.clear()
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the fork hook has logged the child in again by now
    os.write(w, json.dumps(state()).encode())
    os._exit(0)
os.close(w)
child = json.loads(os.fdopen(r).read())
os.waitpid(pid, 0)
print(json.dumps({"parent": parent, "child": child}))
"""


def test_pin_copies_are_wiped_in_the_parent_and_a_forked_child(shim_card: ShimCard, tmp_path: Path) -> None:
    """The PIN copy of the login (and of the child's login again after a
    fork, which pkcs11-provider's re-initialisation needs) is a bytearray,
    all zeros once the key is loaded."""
    ok, why = provider_status()
    need(ok, why)  # the provider logs the child out, so the child logs in again
    env = {**shim_card.env(tmp_path / "shim"), "T_URI": shim_card.key_uri, "T_PIN": SHIM_PIN,
           "T_BACKEND": "provider"}  # fmt: skip
    proc = run_python(WIPE_SCRIPT, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    expected = [{"type": "bytearray", "length": len(SHIM_PIN), "wiped": True}]
    assert out == {"parent": expected, "child": expected}


def test_a_rejected_pin_copy_is_wiped(pki: Pki) -> None:
    from mtls_engine._p11 import Module
    from mtls_engine._pin import PinMemory

    mod = Module.load(pki.module)
    token = mod.find_token(parse(pki.pintest.uri()))
    copy = bytearray(b"97531864")
    with pytest.raises(mtls_engine.PinIncorrect):
        mod.login(token, lambda t: copy, pin_memory=PinMemory())
    assert copy == bytearray(8)


def test_utf8_pin_copies_match_str_encode() -> None:
    from mtls_engine._secret import utf8_into

    for text in ["1234", "pässwörd", "€uro", "𝄞clef", ""]:
        assert utf8_into(text) == text.encode("utf-8")
    with pytest.raises(mtls_engine.PinError, match="lone surrogate"):
        utf8_into("12\ud800")


# -- core dumps -------------------------------------------------------------------

DUMPABLE_SCRIPT = """
import ctypes, json, os, resource, ssl, sys
PR_GET_DUMPABLE = 3
libc = ctypes.CDLL(None)
before = {"dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), "core": resource.getrlimit(resource.RLIMIT_CORE)}
import mtls_engine
if os.environ.get("T_URI"):
    mtls_engine.load_card_key(ssl.create_default_context(), os.environ["T_URI"], module=os.environ["T_MODULE"],
                              pin=os.environ["T_PIN"])
else:
    mtls_engine.protect_process()
after = {"dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), "core": resource.getrlimit(resource.RLIMIT_CORE)}
pid = os.fork()
if pid == 0:
    os._exit(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps({"before": before, "after": after, "child_dumpable": child}))
"""


def _dumpable(env: dict[str, str]) -> dict[str, Any]:
    need(sys.platform.startswith("linux"), "prctl(PR_GET_DUMPABLE) is Linux's")
    proc = run_python(DUMPABLE_SCRIPT, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_protect_process_makes_the_process_non_dumpable() -> None:
    out = _dumpable({"MTLS_ENGINE_PROTECT_PROCESS": ""})
    assert out["before"]["dumpable"] == 1
    assert out["after"] == {"dumpable": 0, "core": [0, 0]}
    assert out["child_dumpable"] == 0  # a forked worker too


def test_protect_process_by_environment_before_the_login(pki: Pki) -> None:
    env = {"T_URI": pki.key_uri(KeyKind.P256), "T_MODULE": pki.module, "T_PIN": pki.card1.pin}
    assert _dumpable({**env, "MTLS_ENGINE_PROTECT_PROCESS": "1"})["after"] == {"dumpable": 0, "core": [0, 0]}
    assert _dumpable({**env, "MTLS_ENGINE_PROTECT_PROCESS": "0"})["after"]["dumpable"] == 1


def test_protect_process_setting_is_checked(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTLS_ENGINE_PROTECT_PROCESS", "yes")
    with pytest.raises(mtls_engine.ConfigError, match=r"MTLS_ENGINE_PROTECT_PROCESS must be 1 .* or 0, not 'yes'"):
        mtls_engine.load_card_key(ssl.create_default_context(), pki.key_uri(KeyKind.P256), module=pki.module,
                                  pin=pki.card1.pin)  # fmt: skip
