"""Everything that parses user input, fed with generated input: ``pkcs11:``
URIs, PIN sources, access rules, present_to lists, server pins, CRL files
and ``config`` arguments.  The only acceptable outcomes are a result or an
``mtls_engine.Error`` — never another exception, never a crash — and no
message repeats a PIN-like secret it was given."""

from __future__ import annotations

import datetime
import json
import os
import re
import string
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtls_engine
from mtls_engine._api import _read_cert_file
from mtls_engine._config import openssl_cnf
from mtls_engine._lib import lib
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


def _query_values(uri: str) -> dict[str, str]:
    """Each query attribute's raw text, read independently of mtls_engine."""
    if "?" not in uri:
        return {}
    out = {}
    for part in re.split(r"[&;]", uri.split("?", 1)[1]):
        key, _, raw = part.partition("=")
        out[key.strip().lower()] = raw
    return out


def _decoded(raw: str) -> str:
    """A value as p11-kit reads it: percent-decoded, whitespace skipped."""
    return urllib.parse.unquote_to_bytes(re.sub(r"[ \t\r\n\v\f]", "", raw)).decode("utf-8")


@SETTINGS
@given(st.one_of(uri_chars.map(lambda t: "pkcs11:" + t), well_formed_uri, structured_uri, st.text(max_size=80)))
def test_uris_parse_or_raise_uri_error(uri: str) -> None:
    try:
        parsed = parse(uri)
    except mtls_engine.UriError as exc:
        assert str(exc).startswith("the key URI ")
        assert "pin-value=" not in str(exc) or "pin-value=***" in str(exc)
        return
    # what parsed reads back is what the URI says, and every query value is masked
    query = _query_values(uri)
    for name, value in (("pin-value", parsed.pin_value), ("pin-source", parsed.pin_source),
                        ("module-path", parsed.module_path)):  # fmt: skip
        assert value == (_decoded(query[name]) if name in query else None), name
    assert parsed.has_pin_value == ("pin-value" in query)
    assert parsed.safe.lower().startswith("pkcs11:")
    shown_query = parsed.safe.split("?", 1)[1] if "?" in parsed.safe else ""
    assert all(part.endswith("=***") or part == "***" for part in filter(None, shown_query.split("&")))
    path_keys = [p.partition("=")[0].strip().lower() for p in uri[7:].split("?", 1)[0].split(";") if p]
    assert parsed.has_object_attrs == any(k in ("object", "id") for k in path_keys)
    assert (parsed.describe_object() == "any object") == (not {"object", "id", "type"} & set(path_keys))


@SETTINGS
@given(st.integers(min_value=1, max_value=200_000))
def test_huge_uri_values(n: int) -> None:
    """A long label is kept whole: matching uses all of it."""
    parsed = parse("pkcs11:object=" + "a" * n + ";type=private")
    assert parsed.object_type == "private"
    assert (lib.CKA_LABEL, b"a" * n) in parsed.object_template()


@SETTINGS
@given(st.one_of(st.text(max_size=60), st.sampled_from(["env:", "file:", "prompt"]).map(lambda k: k + "X")))
def test_pin_sources(spec: str) -> None:
    try:
        source = mtls_engine.pin_source(spec)
    except mtls_engine.PinError as exc:
        if len(spec) >= 4 and ":" not in spec:
            # a PIN typed by mistake is not echoed: the message is the fixed
            # text with only the length filled in (a spec such as "unkn" is
            # in that text, so a substring check would prove nothing)
            assert str(exc) == (
                f"unknown PIN source ({len(spec)} characters, not shown in case it is a PIN); use env:VAR, "
                "file:PATH or prompt (a PIN itself is never accepted here)"
            )
        else:
            assert str(exc).startswith(("unknown PIN source ", f"env:{spec[4:]} does not name"))
        return
    # accepted: one of the three kinds, named by its repr and nothing else
    kind, _, rest = spec.partition(":")
    assert kind.lower() in ("env", "file", "prompt")
    assert (kind.lower() == "prompt") == (rest == "")
    if kind.lower() == "env":
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rest)
    assert repr(source) == ("pin_source('prompt')" if kind.lower() == "prompt" else f"pin_source({spec!r})")


def _fuzz_client_cert() -> x509.Certificate:
    """A client certificate with a subject, a serial and SANs of each kind."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name.from_rfc4514_string("CN=fuzz client,O=Fuzz")
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(0x1F2E3D).not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("fuzz.example"), x509.RFC822Name("fuzz@example.org"),
                                                    x509.UniformResourceIdentifier("urn:fuzz:1")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip


FUZZ_CERT: list[x509.Certificate] = []


def _admits(entries: list[str], cert: x509.Certificate) -> bool:
    """The oracle: whether an allow= list names this certificate."""
    for entry in entries:
        kind, _, value = entry.partition(":")
        kind = kind.lower()
        if kind == "subject" and x509.Name.from_rfc4514_string(value) == cert.subject:
            return True
        if kind == "serial" and int(value.replace(":", ""), 16) == cert.serial_number:
            return True
        if (kind, value.lower()) in {("dns", "fuzz.example"), ("email", "fuzz@example.org")}:
            return True
        if (kind, value) == ("uri", "urn:fuzz:1"):
            return True
    return False


identity = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["subject:CN=fuzz client,O=Fuzz", "subject:O=Fuzz,CN=fuzz client", "serial:1f2e3d",
                     "serial:1F:2E:3D", "serial:1f2e3e", "dns:FUZZ.example", "dns:other.example",
                     "email:fuzz@example.org", "uri:urn:fuzz:1", "uri:URN:fuzz:1", "ip:1.2.3.4"]),
)  # fmt: skip
host = st.one_of(st.text(max_size=30), st.sampled_from(["fuzz.example", "*.example", "a.fuzz.example", "127.0.0.1",
                                                         "::1", "[::1]", "*.", "*.*.x", "x/y"]))  # fmt: skip


@SETTINGS
@given(st.lists(identity, max_size=5))
def test_access_rules(entries: list[str]) -> None:
    if not FUZZ_CERT:
        FUZZ_CERT.append(_fuzz_client_cert())
    try:
        rule = access_rule(entries)
    except mtls_engine.ConfigError as exc:
        assert "allow= entry" in str(exc) or "RFC 4514" in str(exc) or "allow=" in str(exc)
        return
    assert rule is not None
    assert rule(FUZZ_CERT[0]) is _admits(entries, FUZZ_CERT[0])


@SETTINGS
@given(st.lists(host, max_size=5), host)
def test_present_to(entries: list[str], asked: str) -> None:
    try:
        match = present_matcher(entries)
    except mtls_engine.ConfigError as exc:
        assert "present_to= entry" in str(exc)
        return
    names = [e.strip().lower().rstrip(".") for e in entries]
    for name in names:
        if name.startswith("*."):
            assert match("host" + name[1:]) and match("a.b" + name[1:])  # any name under the domain ...
        else:
            assert match(name) and match(name + ".")  # exact, and with a final dot
            if name.isascii():
                assert match(name.upper())  # in any case
    # ... and nothing that is not listed
    plain = asked.strip().lower().rstrip(".")
    listed = plain in names or any(n.startswith("*.") and plain.endswith(n[1:]) for n in names)
    if not listed and not any(c in plain for c in "[]:") and plain == asked:
        assert not match(asked)


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=50), st.just("sha256/" + "A" * 43 + "="), st.just("ab" * 32)),
                max_size=4))  # fmt: skip
def test_server_pins(entries: list[str]) -> None:
    if not FUZZ_CERT:
        FUZZ_CERT.append(_fuzz_client_cert())
    try:
        rule = pin_rule(entries)
    except mtls_engine.ConfigError as exc:
        assert "server pin" in str(exc) or "server_pins= is empty" in str(exc)
        return
    assert entries  # an empty list is refused
    # none of these pins is this certificate's key or fingerprint
    assert rule(FUZZ_CERT[0]) is False


def _cnf_string(value: str) -> str:
    """A value of openssl.cnf as OpenSSL reads a double-quoted string."""
    assert value.startswith('"') and value.endswith('"'), value
    return re.sub(r"\\(.)", r"\1", value[1:-1])


@SETTINGS
@given(
    st.text(max_size=200), st.sampled_from(["engine", "provider", "both"]), st.one_of(st.none(), st.text(max_size=80))
)
def test_config_arguments(module: str, backend: str, pin_source: str | None) -> None:
    try:
        text = openssl_cnf(module, backend, engine_so="/e/pkcs11.so", provider_so="/p/pkcs11.so", pin_source=pin_source)
    except mtls_engine.ConfigError:
        assert any(c in module for c in "\n\r\0") or pin_source is not None
        return
    # OpenSSL's reading of the file: one setting per line, whatever the path holds
    pairs = []
    for line in text.split("\n"):
        if not line or line.startswith("#") or re.fullmatch(r"\[[a-z_0-9]+\]", line):
            continue
        key, sep, value = line.partition(" = ")
        assert sep and re.fullmatch(r"[A-Za-z_.0-9-]+", key), line
        pairs.append((key, value))
    paths = [_cnf_string(v) for k, v in pairs if k in ("MODULE_PATH", "pkcs11-module-path")]
    assert paths == [module] * (2 if backend == "both" else 1)
    pins = [_cnf_string(v) for k, v in pairs if k == "pkcs11-module-token-pin"]
    assert pins == ([pin_source] if pin_source is not None and backend != "engine" else [])


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
        ("pkcs11:object=k?pin-value=12%0034", r"has a pin-value with a NUL \(%00\) in it; remove it"),
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
