"""Everything that parses user input, fed with generated input: ``pkcs11:``
URIs, PIN sources, access rules, present_to lists, server pins, CRL files
and ``config`` arguments.  The only acceptable outcomes are a result or an
``mtls_engine.Error`` — never another exception, never a crash — and no
message repeats a PIN-like secret it was given."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtls_engine
from mtls_engine._api import _read_cert_file
from mtls_engine._config import openssl_cnf
from mtls_engine._server import access_rule, pin_rule, present_matcher, read_crls
from mtls_engine._softhsm import CA, KeyKind, TokenStore
from mtls_engine._uri import parse

from .conftest import TEST_PIN, Pki
from .helpers import run_python

# MTLS_FUZZ_SCALE multiplies every example count: the suite runs 1 (a few
# seconds); the long run is documented in docs/reliability.md.
SCALE = max(1, int(os.environ.get("MTLS_FUZZ_SCALE", "1") or "1"))
SETTINGS = settings(
    max_examples=250 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# URI-ish text: the characters URIs are made of, with percent signs, NULs
# and non-ASCII mixed in, and whole attributes repeated or unknown.
uri_chars = st.text(alphabet=string.ascii_letters + string.digits + "%;=?&:/.-_*~ \x00é€", max_size=120)
PATH_ATTRS = ["token", "object", "id", "serial", "type", "manufacturer", "model", "slot-id", "library-description"]
QUERY_ATTRS = ["pin-value", "pin-source", "module-path", "module-name"]
attribute = st.sampled_from([*PATH_ATTRS, *QUERY_ATTRS, "x-unknown", "", "ID", "Token"])
value = st.one_of(uri_chars, st.binary(max_size=40).map(lambda b: "".join(f"%{x:02x}" for x in b)))


def _uri(path: list[tuple[str, str]], query: list[tuple[str, str]]) -> str:
    text = "pkcs11:" + ";".join(f"{k}={v}" for k, v in path)
    return text + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")


# known attributes in their places (mostly parses: exercises matching and
# masking), and anything anywhere (mostly refused: exercises the errors)
well_formed_uri = st.builds(
    _uri,
    st.lists(st.tuples(st.sampled_from(PATH_ATTRS), value), max_size=6),
    st.lists(st.tuples(st.sampled_from(QUERY_ATTRS), value), max_size=2),
)
structured_uri = st.builds(_uri, st.lists(st.tuples(attribute, value), max_size=6),
                           st.lists(st.tuples(attribute, value), max_size=3))  # fmt: skip


@SETTINGS
@given(st.one_of(uri_chars.map(lambda t: "pkcs11:" + t), well_formed_uri, structured_uri, st.text(max_size=80)))
def test_uris_parse_or_raise_uri_error(uri: str) -> None:
    try:
        parsed = parse(uri)
    except mtls_engine.UriError as exc:
        assert "pin-value=" not in str(exc) or "pin-value=***" in str(exc)
        return
    # what parsed can be described and re-masked without error
    assert parsed.safe.lower().startswith("pkcs11:")
    assert isinstance(parsed.describe_object(), str)
    assert (parsed.pin_value, parsed.pin_source, parsed.module_path) is not None  # readable as text
    if parsed.pin_value is not None:
        assert "pin-value=***" in parsed.safe.lower()


@SETTINGS
@given(st.integers(min_value=1, max_value=200_000))
def test_huge_uri_values(n: int) -> None:
    try:
        parse("pkcs11:object=" + "a" * n + ";type=private")
    except mtls_engine.UriError:
        pass


@SETTINGS
@given(st.text(max_size=60))
def test_pin_sources(spec: str) -> None:
    try:
        mtls_engine.pin_source(spec)
    except mtls_engine.PinError as exc:
        if len(spec) >= 4 and ":" not in spec:
            # a PIN typed by mistake is not echoed: the message is the fixed
            # text with only the length filled in (a spec such as "unkn" is
            # in that text, so a substring check would prove nothing)
            assert str(exc) == (
                f"unknown PIN source ({len(spec)} characters, not shown in case it is a PIN); use env:VAR, "
                "file:PATH or prompt (a PIN itself is never accepted here)"
            )
        return


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=5))
def test_access_rules_present_to_and_pins(entries: list[str]) -> None:
    for build in (access_rule, present_matcher, pin_rule):
        try:
            build(entries)
        except mtls_engine.ConfigError:
            pass


@SETTINGS
@given(
    st.text(max_size=200), st.sampled_from(["engine", "provider", "both"]), st.one_of(st.none(), st.text(max_size=80))
)
def test_config_arguments(module: str, backend: str, pin_source: str | None) -> None:
    try:
        text = openssl_cnf(module, backend, engine_so="/e/pkcs11.so", provider_so="/p/pkcs11.so", pin_source=pin_source)
    except mtls_engine.ConfigError:
        return
    assert isinstance(text, str)


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_crl_files(tmp_path: Path, data: bytes) -> None:
    ca = _ca()
    path = tmp_path / "fuzz.crl"
    for body in (data, b"-----BEGIN X509 CRL-----\n" + data + b"\n-----END X509 CRL-----\n", ca.crl()[:-40] + data):
        path.write_bytes(body)
        try:
            read_crls(path, [ca.cert])
        except mtls_engine.CrlError:
            pass


_CA: list[CA] = []


def _ca() -> CA:
    if not _CA:
        _CA.append(CA.create("fuzz CA"))
    return _CA[0]


def test_named_refusals_found_by_the_fuzzer() -> None:
    """Inputs the generated tests first broke on, now refused by name."""
    import pytest

    for uri, message in [
        ("pkcs11:object=k?pin-value=%80", r"has a pin-value that is not UTF-8 text once percent-decoded"),
        ("pkcs11:object=k?pin-source=%ff", r"has a pin-source that is not UTF-8"),
        ("pkcs11:object=k?pin-value=1&pin-value=2", r"gives 'pin-value' twice; give it once"),
        ("pkcs11:object=\ud800", r"is not valid Unicode text"),
    ]:
        with pytest.raises(mtls_engine.UriError, match=message) as info:
            parse(uri)
        assert "pin-value=1" not in str(info.value) and "%80" not in str(info.value)


# -- certificate objects on the token that are no certificate -------------------

JUNK_SCRIPT = """
import json, os
import mtls_engine
from mtls_engine._lib import ffi, lib
from mtls_engine._p11 import Module, ulong_bytes
from mtls_engine._pin import MEMORY

mod = Module.load(os.environ["T_MODULE"])
(tok,) = [t for t in mod.tokens() if t.label == "junkcard"]
mod.login(tok, lambda t: os.environ["T_PIN"].encode(), pin_memory=MEMORY)
rw = ffi.new("CK_SESSION_HANDLE *")
assert mod.fl.C_OpenSession(tok.slot_id, lib.CKF_SERIAL_SESSION | lib.CKF_RW_SESSION, ffi.NULL, ffi.NULL, rw) == 0
for key_id in ("07", "08"):  # 07 has only junk, 08 a good certificate and junk
    values = [(lib.CKA_CLASS, ulong_bytes(lib.CKO_CERTIFICATE)), (lib.CKA_CERTIFICATE_TYPE, ulong_bytes(0)),
              (lib.CKA_TOKEN, b"\\x01"), (lib.CKA_ID, bytes.fromhex(key_id)), (lib.CKA_LABEL, b"junk"),
              (lib.CKA_SUBJECT, b"\\x30\\x00"), (lib.CKA_VALUE, b"\\x30\\x82\\x01\\x00 not a certificate")]
    attrs = ffi.new("CK_ATTRIBUTE[]", len(values))
    keep = []
    for i, (t, v) in enumerate(values):
        keep.append(ffi.new("unsigned char[]", v))
        attrs[i].type, attrs[i].pValue, attrs[i].ulValueLen = t, keep[-1], len(v)
    handle = ffi.new("CK_OBJECT_HANDLE *")
    assert mod.fl.C_CreateObject(rw[0], attrs, len(values), handle) == 0
out = {}
for label in ("lonely", "renewed"):
    try:
        ctx = mtls_engine.client_context(key=f"pkcs11:token=junkcard;object={label};type=private",
                                         cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                         pin=os.environ["T_PIN"], backend=os.environ["T_BACKEND"])
        out[label] = "loaded"
    except mtls_engine.Error as exc:
        out[label] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


def test_unreadable_certificate_objects_on_the_token(pki: Pki, tmp_path: Path, backend: str) -> None:
    store = TokenStore.create(tmp_path / "softhsm")
    token = store.init_token("junkcard", pin=TEST_PIN)
    token.generate_key(KeyKind.P256, "lonely", "07")
    pub = token.generate_key(KeyKind.P256, "renewed", "08")
    token.store_certificate(pki.ca.issue(pub, "card-holder renewed"), "renewed", "08", tmp_path)
    proc = run_python(JUNK_SCRIPT, env={**store.env, "T_MODULE": store.module, "T_PIN": TEST_PIN,
                                        "T_CA": str(pki.ca_file), "T_BACKEND": backend})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["renewed"] == "loaded"  # the junk next to a good certificate is passed over
    name, message = out["lonely"]
    assert name == "CertificateError"
    assert message.startswith("looked for a certificate with id 07 (the key's id) on token 'junkcard'")
    assert "found 1 certificate object(s), none of them a readable X.509 certificate" in message
    assert "pkcs11-tool --write-object CERT.der --type cert --id ID" in message


@SETTINGS
@given(data=st.one_of(st.binary(max_size=3000), st.builds(lambda b: b"-----BEGIN CERTIFICATE-----\n" + b,
                                                         st.binary(max_size=2000))))  # fmt: skip
def test_certificate_files(tmp_path: Path, data: bytes) -> None:
    """cert= files: certificates or a CertificateError saying the file holds none."""
    path = tmp_path / "cert.pem"
    path.write_bytes(data)
    try:
        ders = _read_cert_file(str(path))
    except mtls_engine.CertificateError as exc:
        assert str(path) in str(exc) and "no readable X.509 certificate" in str(exc)
    else:
        assert ders  # only what cryptography read as certificates
