"""Every bad input gives a named mtls_engine error that says what to fix."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

import mtls_engine
from mtls_engine._context import ssl_ctx_pointer
from mtls_engine._lib import check_same_openssl, lib
from mtls_engine._softhsm import KeyKind

from .conftest import Pki
from .helpers import count_calls, run_python
from .registry import Registry


def _ctx(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


def _load(pki: Pki, key: str, **kw: object) -> mtls_engine.CardKey:
    kw.setdefault("module", pki.module)
    kw.setdefault("pin", pki.card1.pin)
    return mtls_engine.load_card_key(_ctx(pki), key, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("http://card1/key", "does not start with 'pkcs11:'"),
        ("pkcs11:token=card1;object=%zz", "malformed"),
        ("pkcs11:tokn=card1;object=ec256", "unknown attribute 'tokn'"),
        ("pkcs11:token=card1;token=card2", "gives 'token' twice"),
        ("pkcs11:token=card1;type=banana", "unknown type 'banana'"),
        ("pkcs11:token=card1;object=ec256?frobnicate=1", "unknown query attribute 'frobnicate'"),
        ("pkcs11:Token=card1;object=ec256", "writes 'Token' in capitals; p11-kit knows attribute names in lower case"),
        ("pkcs11:token=card1;;object=ec256", "p11-kit would ignore every attribute after it"),
        ("pkcs11:;token=card1;object=ec256", "has an empty attribute"),
        ("pkcs11:token=card1;object=ec\x00256", "NUL character"),
        ("pkcs11:token=card1;object=ec256;type=cert", "must name a private key"),
    ],
)
def test_malformed_key_uri(pki: Pki, uri: str, fragment: str) -> None:
    with pytest.raises(mtls_engine.UriError, match=fragment.replace("(", r"\(")):
        _load(pki, uri)


def test_uri_that_is_not_a_string(pki: Pki) -> None:
    with pytest.raises(mtls_engine.UriError, match="must be a str"):
        _load(pki, 42)  # type: ignore[arg-type]


def test_uri_naming_no_object(pki: Pki) -> None:
    with pytest.raises(mtls_engine.ObjectNotFound, match=r"no private key matches object=nosuchkey.*card1") as e:
        _load(pki, pki.card1.uri(object="nosuchkey", type="private"))
    # The message lists what is there, so the user can fix the URI.
    assert "rsa2048 (id 01)" in str(e.value) and "ec256 (id 02)" in str(e.value)


def test_uri_matching_two_keys(pki: Pki) -> None:
    with pytest.raises(mtls_engine.AmbiguousUri, match=r"2 private keys match object=twin") as e:
        _load(pki, pki.card1.uri(object="twin", type="private"))
    assert "id 10" in str(e.value) and "id 11" in str(e.value)


def test_uri_matching_no_token(pki: Pki) -> None:
    with pytest.raises(mtls_engine.TokenNotFound, match=r"no token matches .*token=nosuchcard") as e:
        _load(pki, "pkcs11:token=nosuchcard;object=ec256")
    assert "'card1'" in str(e.value)


def test_uri_matching_several_tokens(pki: Pki) -> None:
    with pytest.raises(mtls_engine.AmbiguousUri, match=r"3 tokens match .*Add serial="):
        _load(pki, "pkcs11:object=ec256;type=private")


def test_module_path_that_does_not_exist(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-pkcs11.so"
    with pytest.raises(mtls_engine.ModuleLoadError, match=r"does not exist; pass module="):
        _load(pki, pki.key_uri(KeyKind.P256), module=str(missing))


def test_module_that_is_not_a_pkcs11_library(pki: Pki, tmp_path: Path) -> None:
    fake = tmp_path / "fake.so"
    fake.write_text("not a shared library")
    with pytest.raises(mtls_engine.ModuleLoadError, match=r"cannot load PKCS#11 module .*fake.so"):
        _load(pki, pki.key_uri(KeyKind.P256), module=str(fake))


def test_no_module_at_all(pki: Pki, tmp_path: Path) -> None:
    # No argument, no module-path, no $MTLS_ENGINE_MODULE and an empty p11-kit registry.
    reg = Registry(tmp_path / "registry")
    proc = reg.python(
        "import ssl, mtls_engine\n"
        f"mtls_engine.load_card_key(ssl.create_default_context(), {pki.key_uri(KeyKind.P256)!r}, pin='x')\n",
        pki.folder.env,
    )
    assert proc.returncode == 1
    assert (
        "mtls_engine._errors.ModuleLoadError: no PKCS#11 module given and no usable module is registered with "
        "p11-kit (none registered); register your card's middleware with p11-kit: a one-line file such as "
        "/etc/pkcs11/modules/mycard.module" in proc.stderr
    ), proc.stderr
    assert "pass module= (--module), set $MTLS_ENGINE_MODULE" in proc.stderr


def test_certificate_file_that_does_not_match_the_key(pki: Pki) -> None:
    with pytest.raises(mtls_engine.CertKeyMismatch, match=r"does not belong to the private key 'ec256'"):
        _load(pki, pki.key_uri(KeyKind.P256), cert=pki.rsa_cert_file)


def test_certificate_on_token_that_does_not_match_the_key(pki: Pki) -> None:
    with pytest.raises(mtls_engine.CertKeyMismatch, match=r"card-holder rsa2048.*'wrongcert'"):
        _load(pki, pki.card1.uri(object="wrongcert", type="private"))


def test_key_without_certificate(pki: Pki) -> None:
    with pytest.raises(mtls_engine.ObjectNotFound, match=r"no certificate found: looked for a certificate with id 10"):
        _load(pki, pki.card1.uri(id="%10"))


def test_certificate_file_missing_or_garbage(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(mtls_engine.CertificateError, match=r"cannot read certificate file .*nope.pem"):
        _load(pki, pki.key_uri(KeyKind.P256), cert=tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(mtls_engine.CertificateError, match=r"junk.pem.*no readable X.509 certificate"):
        _load(pki, pki.key_uri(KeyKind.P256), cert=junk)


def test_pin_required_when_none_given(pki: Pki) -> None:
    with pytest.raises(mtls_engine.PinRequired, match=r"token 'pintest' .* needs a PIN and none was given"):
        mtls_engine.load_card_key(_ctx(pki), pki.key_uri(KeyKind.P256, pki.pintest), module=pki.module)


def test_pin_given_twice(pki: Pki) -> None:
    uri = pki.pintest.uri(object="ec256", type="private") + "?pin-value=1234"
    with pytest.raises(mtls_engine.PinError, match=r"given twice \(pin= and the URI's pin-value\)") as e:
        _load(pki, uri, pin="5678")
    assert "1234" not in str(e.value) and "5678" not in str(e.value)


def test_pin_value_is_masked_in_messages(pki: Pki) -> None:
    with pytest.raises(mtls_engine.TokenNotFound) as e:
        mtls_engine.load_card_key(_ctx(pki), "pkcs11:token=gone;object=x?pin-value=s3cret99", module=pki.module)
    assert "s3cret99" not in str(e.value)
    assert "pin-value=***" in str(e.value)


def test_unknown_backend(pki: Pki) -> None:
    with pytest.raises(mtls_engine.BackendUnavailable, match="unknown backend 'pkcs12'"):
        _load(pki, pki.key_uri(KeyKind.P256), backend="pkcs12")


def test_not_an_ssl_context(pki: Pki) -> None:
    with pytest.raises(mtls_engine.NotAnSSLContext, match=r"expected an ssl\.SSLContext, got builtins\.dict"):
        mtls_engine.load_card_key({}, pki.key_uri(KeyKind.P256), module=pki.module)  # type: ignore[arg-type]


class _Impostor:
    """An object laid out nothing like a PySSLContext."""

    __slots__ = ("a", "b", "c")


def test_pointer_validation_refuses_wrong_layout() -> None:
    ctx = ssl.create_default_context()
    # One pointer too far: reads the next field, which is not the SSL_CTX.
    for offset in (object.__basicsize__ + 8, object.__basicsize__ - 8):
        with pytest.raises(mtls_engine.InterpreterSslError, match="cannot find the OpenSSL SSL_CTX"):
            ssl_ctx_pointer(ctx, header_size=offset)
    assert ssl_ctx_pointer(ctx) is not None


def test_pointer_validation_is_not_fooled_by_a_foreign_object() -> None:
    with pytest.raises(mtls_engine.NotAnSSLContext):
        ssl_ctx_pointer(_Impostor())


def test_interpreter_with_other_openssl_version() -> None:
    with pytest.raises(mtls_engine.InterpreterSslError, match=r"uses OpenSSL 0x10101 but mtls_engine was built"):
        check_same_openssl(version=0x10101)


def test_interpreter_with_static_openssl() -> None:
    import _json  # a loaded extension module that has no OpenSSL at all

    if getattr(_json, "__file__", None) is None:  # built into some interpreters (Debian's)
        pytest.skip("_json is built into this interpreter; tests/test_interpreter.py covers this with stand-ins")
    with pytest.raises(mtls_engine.InterpreterSslError, match=r"does not use a shared OpenSSL.*statically"):
        check_same_openssl(_json.__file__)


def test_error_queue_left_clean(pki: Pki) -> None:
    with pytest.raises(mtls_engine.CertKeyMismatch):
        _load(pki, pki.key_uri(KeyKind.P256), cert=pki.rsa_cert_file)
    assert lib.ERR_peek_error() == 0


WRONG_PIN_SCRIPT = """
import os, ssl, mtls_engine
uri, module, ca = os.environ["T_URI"], os.environ["T_MODULE"], os.environ["T_CA"]
for attempt in range(2):
    ctx = ssl.create_default_context(cafile=ca)
    try:
        mtls_engine.load_card_key(ctx, uri, module=module, pin=os.environ["T_PIN"])
    except mtls_engine.PinIncorrect as exc:
        print("PinIncorrect:", exc)
"""


def test_wrong_pin_is_tried_exactly_once(pki: Pki, spy: str, spy_log: Path) -> None:
    wrong = "31415926"
    proc = run_python(
        WRONG_PIN_SCRIPT,
        env={"T_URI": pki.key_uri(KeyKind.P256, pki.pintest), "T_MODULE": spy, "T_CA": str(pki.ca_file),
             "T_PIN": wrong, "PKCS11SPY": pki.module, "PKCS11SPY_OUTPUT": str(spy_log)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert "rejected the PIN (CKR_PIN_INCORRECT); it was tried once" in lines[0]
    assert "already rejected this PIN in this process; mtls_engine will not offer it again" in lines[1]
    assert wrong not in proc.stdout + proc.stderr
    assert count_calls(spy_log, "C_Login") == 1
    spy_log.unlink()


AMBIGUOUS_SCRIPT = """
import os, ssl, mtls_engine
ctx = ssl.create_default_context()
try:
    mtls_engine.load_card_key(ctx, "pkcs11:object=ec256", module=os.environ["T_MODULE"], pin=os.environ["T_PIN"])
except mtls_engine.AmbiguousUri as exc:
    print("AmbiguousUri:", exc)
"""


def test_no_login_to_a_guessed_token(pki: Pki, spy: str, spy_log: Path) -> None:
    proc = run_python(
        AMBIGUOUS_SCRIPT,
        env={"T_MODULE": spy, "T_PIN": pki.card1.pin, "PKCS11SPY": pki.module, "PKCS11SPY_OUTPUT": str(spy_log)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("AmbiguousUri: 3 tokens match")
    assert count_calls(spy_log, "C_GetTokenInfo") >= 3  # it did look
    assert count_calls(spy_log, "C_Login") == 0
    spy_log.unlink()
