"""No module given anywhere: the card's module is found among the PKCS#11
modules registered with p11-kit (a registry of each test's own, see
tests/registry.py), and the key URI's token picks it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtls_engine import _softhsm, testing
from mtls_engine._backends import BACKENDS, STATUS
from mtls_engine._softhsm import KeyKind

from . import p11shim
from .conftest import Pki, need
from .registry import Registry

SKIPPED_MODULE_NOISE = "p11shim: MTLS_SHIM_MODULE is not set"


@dataclass
class RegCard:
    folder: testing.TokenFolder
    card: testing.Card
    work: Path

    @property
    def env(self) -> dict[str, str]:
        return dict(self.folder.env)

    def registry(self, name: str) -> Registry:
        return Registry(self.work / name)


@pytest.fixture(scope="module")
def regcard(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegCard]:
    work = tmp_path_factory.mktemp("registry")
    # Not active: only the child processes given its env see this store.
    folder = testing.TokenFolder.create(work / "tokens", ca=pki.ca, activate=False)
    card = folder.add_card("regcard", [KeyKind.P256, KeyKind.RSA2048])
    yield RegCard(folder, card, work)
    folder.close()


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return p11shim.build()
    except p11shim.ShimUnavailable as exc:
        need(False, str(exc))
        raise


def _load_code(card: testing.Card, key: str, backend: str = "auto") -> str:
    return (
        "import ssl, mtls_engine\n"
        f"ctx = ssl.create_default_context(cafile={str(card.ca_file)!r})\n"
        f"ck = mtls_engine.load_card_key(ctx, {key!r}, pin=mtls_engine.pin_source({card.pin_source!r}), "
        f"backend={backend!r})\n"
        "print(ck.module)\n"
    )


def test_one_registered_module_holds_the_token(regcard: RegCard) -> None:
    reg = regcard.registry("one")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), regcard.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == regcard.folder.module


def test_two_modules_the_token_in_one(regcard: RegCard) -> None:
    trust = shutil.which("p11-kit") and "p11-kit-trust.so"
    need(bool(trust), "p11-kit's trust module (Debian: p11-kit-modules) as a second registered module")
    reg = regcard.registry("two")
    reg.register("aaa-trust", "p11-kit-trust.so")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), regcard.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == regcard.folder.module


def test_same_token_in_two_modules_is_ambiguous(regcard: RegCard, shim: Path, tmp_path: Path) -> None:
    # The shim forwards to the same SoftHSM2 store: both modules show regcard.
    reg = regcard.registry("twice")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    reg.register("mtls-test-shim", shim)
    env = {**regcard.env, **p11shim.shim_env(regcard.folder.module, tmp_path, log=False)}
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), env)
    assert proc.returncode != 0
    err = proc.stderr
    assert "AmbiguousUri: 2 tokens in the modules registered with p11-kit match" in err, err
    assert f"in mtls-test-softhsm ({regcard.folder.module})" in err
    assert f"in mtls-test-shim ({shim})" in err
    assert "p11-kit_message" not in err and regcard.card.pin not in err
    # Each line's URI picks that module's token: the shim's one loads through the shim.
    line = next(part for part in err.split("; ") if f"in mtls-test-shim ({shim})" in part)
    pick = line.split("): ", 1)[1].strip()
    assert f"?module-path={shim}" in pick
    proc = reg.python(_load_code(regcard.card, pick), env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(shim)


def test_a_module_failing_to_load_is_skipped_quietly(regcard: RegCard, shim: Path) -> None:
    # The shim with no MTLS_SHIM_MODULE fails C_GetFunctionList and prints to stderr.
    reg = regcard.registry("failing")
    reg.register("aaa-broken", shim)
    reg.register("mtls-test-softhsm", regcard.folder.module)
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), regcard.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == regcard.folder.module
    assert SKIPPED_MODULE_NOISE not in proc.stderr
    listing = reg.cli("list", "--json", extra=regcard.env)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    assert [m["module"]["path"] for m in data["modules"]] == [regcard.folder.module]
    (skipped,) = data["skipped"]
    assert str(shim) in skipped["error"]
    assert SKIPPED_MODULE_NOISE not in listing.stderr
    check = reg.cli("check", "--key", regcard.card.key_uri(), "--pin-source", regcard.card.pin_source, "--json",
                    extra=regcard.env)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    step = next(s for s in json.loads(check.stdout)["steps"] if s["id"] == "module")
    assert step["facts"]["origin"] == "registered with p11-kit by the p11-kit registry entry 'mtls-test-softhsm'"
    assert any(str(shim) in s for s in step["facts"]["skipped"])
    assert SKIPPED_MODULE_NOISE not in check.stderr


def test_a_module_failing_to_initialise_is_skipped_quietly(regcard: RegCard, tmp_path: Path) -> None:
    # tpm2-pkcs11 with no TPM behind its TCTI: C_Initialize fails, with ERROR lines on stderr.
    tpm2 = next((c for c in _softhsm.library_candidates("pkcs11/libtpm2_pkcs11.so") if os.path.exists(c)), None)
    need(tpm2 is not None, "tpm2-pkcs11 (Debian: libtpm2-pkcs11-1) as a module that fails to initialise")
    reg = regcard.registry("tpm-fails")
    reg.register("aaa-tpm2", str(tpm2))
    reg.register("mtls-test-softhsm", regcard.folder.module)
    env = {**regcard.env, "TPM2_PKCS11_TCTI": f"swtpm:path={tmp_path / 'no-tpm'}", "TPM2_PKCS11_STORE": str(tmp_path)}
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == regcard.folder.module
    assert "ERROR" not in proc.stderr, proc.stderr
    listing = reg.cli("list", "--json", extra=env)
    assert listing.returncode == 0, listing.stderr
    (skipped,) = json.loads(listing.stdout)["skipped"]
    assert skipped["name"] == "aaa-tpm2"
    assert f"PKCS#11 module {tpm2!r} failed to initialise (CKR_" in skipped["error"]
    assert "ERROR" not in listing.stderr, listing.stderr


def test_a_registry_naming_a_missing_library(regcard: RegCard, tmp_path: Path) -> None:
    reg = regcard.registry("missing")
    missing = tmp_path / "no-such-pkcs11.so"
    reg.register("gone", missing)
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), regcard.env)
    assert "ModuleLoadError: no PKCS#11 module given and no usable module is registered with p11-kit" in proc.stderr
    assert f"couldn't load module: {missing}" in proc.stderr
    assert "'module: /path/to/your-pkcs11-library.so'" in proc.stderr
    # Beside a usable module it is only reported.
    reg.register("mtls-test-softhsm", regcard.folder.module)
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), regcard.env)
    assert proc.returncode == 0, proc.stderr
    listing = reg.cli("list", "--json", extra=regcard.env)
    assert any(str(missing) in s["error"] for s in json.loads(listing.stdout)["skipped"]), listing.stdout


def test_no_registry_at_all(regcard: RegCard) -> None:
    reg = regcard.registry("empty")
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), regcard.env)
    assert "ModuleLoadError: no PKCS#11 module given and no usable module is registered with p11-kit " \
           "(none registered)" in proc.stderr  # fmt: skip
    assert ".module" in proc.stderr and "module=" in proc.stderr
    listing = reg.cli("list", extra=regcard.env)
    assert listing.returncode == 1
    assert "ModuleLoadError: no PKCS#11 module given and none is registered with p11-kit" in listing.stderr


def test_token_not_in_any_registered_module(regcard: RegCard) -> None:
    reg = regcard.registry("notfound")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    proc = reg.python(_load_code(regcard.card, "pkcs11:token=nosuchcard;object=ec256;type=private"), regcard.env)
    assert "TokenNotFound: no token matches 'pkcs11:token=nosuchcard;object=ec256;type=private' in the modules " \
           "registered with p11-kit: mtls-test-softhsm" in proc.stderr, proc.stderr  # fmt: skip
    assert "token 'regcard'" in proc.stderr


def test_explicit_module_beats_the_registry(regcard: RegCard, shim: Path, tmp_path: Path) -> None:
    # Ambiguous through the registry, but module= (and $MTLS_ENGINE_MODULE) decide.
    reg = regcard.registry("precedence")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    reg.register("mtls-test-shim", shim)
    env = {**regcard.env, **p11shim.shim_env(regcard.folder.module, tmp_path, log=False)}
    code = _load_code(regcard.card, regcard.card.key_uri()).replace("backend=", f"module={str(shim)!r}, backend=")
    proc = reg.python(code, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(shim)
    proc = reg.python(_load_code(regcard.card, regcard.card.key_uri()), {**env, "MTLS_ENGINE_MODULE": str(shim)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(shim)


HANDSHAKES = """
import json, ssl, sys, urllib.request, mtls_engine
url, ca, pin_source, uris, backends = json.loads(sys.argv[1])
out = []
for backend in backends:
    for uri in uris:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = ssl.create_default_context(cafile=ca)
            ctx.minimum_version = ctx.maximum_version = version
            ck = mtls_engine.load_card_key(ctx, uri, pin=mtls_engine.pin_source(pin_source), backend=backend)
            with urllib.request.urlopen(url, context=ctx) as resp:
                body = resp.read().decode()
            out.append([backend, uri, version.name, ck.module, body])
print(json.dumps(out))
"""


def test_handshakes_with_no_module_argument(regcard: RegCard) -> None:
    backends = [b for b in BACKENDS if STATUS[b]()[0]]
    need(len(backends) == len(BACKENDS), "both backends (libp11's engine and pkcs11-provider)")
    reg = regcard.registry("handshakes")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    card = regcard.card
    uris = [card.key_uri(KeyKind.P256), card.key_uri(KeyKind.RSA2048)]
    with regcard.folder.https_server() as server:
        arg = json.dumps([server.url, str(card.ca_file), card.pin_source, uris, backends])
        proc = subprocess.run([*_python(), "-c", HANDSHAKES, arg], capture_output=True, text=True,
                              env=reg.env(regcard.env), timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert len(got) == len(backends) * 2 * 2
    for _backend, uri, _version, module, body in got:
        kind = KeyKind.P256 if uri == uris[0] else KeyKind.RSA2048
        assert module == regcard.folder.module
        assert body == f"hello, {card.subject(kind)}\n"


def _python() -> list[str]:
    return [sys.executable]


def test_commands_with_no_module(regcard: RegCard, tmp_path: Path) -> None:
    reg = regcard.registry("commands")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    card = regcard.card
    check = reg.cli("check", "--key", card.key_uri(), "--pin-source", card.pin_source, extra=regcard.env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{regcard.folder.module} (registered with p11-kit by the p11-kit registry entry" in check.stdout
    listing = reg.cli("list", extra=regcard.env)
    assert listing.returncode == 0, listing.stderr
    assert "1 module(s) registered with p11-kit" in listing.stdout
    assert f"token 'regcard' serial {card.serial}" in listing.stdout
    assert "private key" not in listing.stdout  # not logged in
    login = reg.cli("list", "--login", "--token", card.key_uri(), "--pin-source", card.pin_source, "--json",
                    extra=regcard.env)  # fmt: skip
    assert login.returncode == 0, login.stderr
    (module,) = json.loads(login.stdout)["modules"]
    (slot,) = [s for s in module["slots"] if s["token"] and s["token"]["label"] == "regcard"]
    assert {o["label"] for o in slot["token"]["objects"] if o["class"] == "private_key"} == {"ec256", "rsa2048"}
    with regcard.folder.https_server() as server:
        conn = reg.cli("connect", server.url, "--key", card.key_uri(), "--cafile", str(card.ca_file),
                       "--pin-source", card.pin_source, extra=regcard.env)  # fmt: skip
    assert conn.returncode == 0, conn.stderr
    assert f"hello, {card.subject()}" in conn.stdout


def test_config_and_uri_pem_with_no_module_for_s_client(regcard: RegCard, tmp_path: Path) -> None:
    need(shutil.which("openssl") is not None, "the openssl command line tool")
    need(STATUS["provider"]()[0], STATUS["provider"]()[1])
    reg = regcard.registry("stock")
    reg.register("aaa-trust", "p11-kit-trust.so")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    card = regcard.card
    cnf, pem = tmp_path / "openssl.cnf", tmp_path / "key.pem"
    proc = reg.cli("config", "--backend", "provider", "--key", card.key_uri(), "--pin-source",
                   f"file:{card.pin_file}", "-o", str(cnf), extra=regcard.env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in cnf.read_text().splitlines() if ln.startswith("pkcs11-module-path")]
    assert regcard.folder.module in line
    proc = reg.cli("uri-pem", card.key_uri(), "-o", str(pem), extra=regcard.env)
    assert proc.returncode == 0, proc.stderr
    with regcard.folder.https_server() as server:
        s = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-servername", "localhost",
             "-CAfile", str(card.ca_file), "-verify_return_error", "-cert", str(card.cert_file()),
             "-key", str(pem), "-ign_eof", "-quiet"],
            input=b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", capture_output=True, timeout=60,
            env={**regcard.env, "OPENSSL_CONF": str(cnf)},
        )  # fmt: skip
    assert f"hello, {card.subject()}".encode() in s.stdout, s.stderr.decode(errors="replace")[-2000:]


@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_list_and_check_survive_a_module_that_hangs_or_crashes(
    regcard: RegCard, shim: Path, tmp_path: Path, fault: str
) -> None:
    reg = regcard.registry(f"fault-{fault}")
    reg.register("aaa-faulty", shim)
    reg.register("mtls-test-softhsm", regcard.folder.module)
    env = {**regcard.env, **p11shim.shim_env(regcard.folder.module, tmp_path, log=False), "MTLS_SHIM_INIT_FAULT": fault}
    expected = "did not return from C_Initialize within" if fault == "hang" else "crashed in C_Initialize (SIGABRT"
    listing = reg.cli("list", "--json", extra=env)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    assert [m["module"]["path"] for m in data["modules"]] == [regcard.folder.module]
    (skipped,) = data["skipped"]
    assert skipped["path"] == str(shim) and expected in skipped["error"], skipped
    check = reg.cli("check", "--key", regcard.card.key_uri(), "--pin-source", regcard.card.pin_source, "--json",
                    extra=env)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    step = next(s for s in json.loads(check.stdout)["steps"] if s["id"] == "module")
    assert step["facts"]["path"] == regcard.folder.module
    assert any(str(shim) in s and expected in s for s in step["facts"]["skipped"]), step


def test_serve_with_no_module(regcard: RegCard) -> None:
    reg = regcard.registry("serve")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    card = regcard.card
    proc = subprocess.Popen(
        [*_python(), "-m", "mtls_engine", "serve", "--key", card.key_uri(KeyKind.RSA2048), "--client-ca",
         str(card.ca_file), "--port", "0", "--pin-source", card.pin_source],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=reg.env(regcard.env),
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"listening on https://127\.0\.0\.1:(\d+)/", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None else "")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the server's CertificateVerify is checked all the same
        ctx.load_cert_chain(regcard.folder.server_cert, regcard.folder.server_key)
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=30) as raw:
            with ctx.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der == ssl.PEM_cert_to_DER_cert(card.cert_file(KeyKind.RSA2048).read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_inject_and_server_context_with_no_module(regcard: RegCard) -> None:
    reg = regcard.registry("inject")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    card = regcard.card
    with regcard.folder.https_server() as server:
        code = (
            "import ssl, urllib.request, mtls_engine\n"
            f"info = mtls_engine.inject({card.key_uri()!r}, present_to=['127.0.0.1'], "
            f"pin=mtls_engine.pin_source({card.pin_source!r}))\n"
            f"ctx = ssl.create_default_context(cafile={str(card.ca_file)!r})\n"
            f"print(info.module, urllib.request.urlopen({server.url!r}, context=ctx).read().decode().strip())\n"
            f"srv = mtls_engine.server_context(None, {card.key_uri(KeyKind.RSA2048)!r}, {str(card.ca_file)!r}, "
            f"pin=mtls_engine.pin_source({card.pin_source!r}))\n"
            "print(isinstance(srv, ssl.SSLContext))\n"
        )
        proc = reg.python(code, regcard.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{regcard.folder.module} hello, {card.subject()}", "True"]


def test_module_name_in_the_uri_picks_among_registered_modules(regcard: RegCard, shim: Path, tmp_path: Path) -> None:
    reg = regcard.registry("module-name")
    reg.register("mtls-test-softhsm", regcard.folder.module)
    reg.register("mtls-test-shim", shim)
    env = {**regcard.env, **p11shim.shim_env(regcard.folder.module, tmp_path, log=False)}
    base = regcard.card.key_uri()
    for name, expected in (("mtls-test-shim", str(shim)), ("softhsm2", regcard.folder.module),
                           ("libsofthsm2", regcard.folder.module)):  # fmt: skip
        proc = reg.python(_load_code(regcard.card, f"{base}?module-name={name}"), env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected
