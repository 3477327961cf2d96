"""``python -m mtls_engine check``: passes on a good card key, and each
broken piece fails at its own step with its own hint.  Every run is a fresh
``python -m mtls_engine`` process, as a user runs it (login state and the
memory of rejected PINs are per process)."""

from __future__ import annotations

import _ssl
import datetime
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtls_engine import _backends, _check
from mtls_engine._lib import InterpreterFacts
from mtls_engine._packages import upstream_version
from mtls_engine._softhsm import KeyKind

from .conftest import Pki, need, need_backend
from .helpers import ROOT
from .servers import echo_server, server_context

SCHEMA = json.loads((ROOT / "docs" / "check.schema.json").read_text())
STEP_IDS = [item["properties"]["id"]["const"] for item in SCHEMA["properties"]["steps"]["prefixItems"]]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mtls_engine", *args], capture_output=True, text=True, env=full, timeout=120
    )


@pytest.fixture
def pin_file(pki: Pki, tmp_path: Path) -> Path:
    f = tmp_path / "pin"
    f.write_text(pki.card1.pin)
    return f


def assert_no_pin(pki: Pki, *outputs: str) -> None:
    for out in outputs:
        assert pki.card1.pin not in out


def check(pki: Pki, pin_file: Path, *args: str) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]]]:
    """Run check --json; validate against the documented schema; steps by id."""
    proc = run_cli("check", "--module", pki.module, "--pin-source", f"file:{pin_file}", "--json", *args)
    assert_no_pin(pki, proc.stdout, proc.stderr)
    # stderr carries only mtls_engine's own log lines (e.g. the PKCS#1 v1.5 adaptation)
    assert all(line.startswith("mtls_engine: warning: ") for line in proc.stderr.splitlines()), proc.stderr
    data = json.loads(proc.stdout)
    jsonschema.validate(data, SCHEMA)
    assert [s["id"] for s in data["steps"]] == STEP_IDS
    assert data["ok"] is (proc.returncode == 0)
    return proc.returncode, data, {s["id"]: s for s in data["steps"]}


def statuses(steps: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {k: v["status"] for k, v in steps.items()}


def test_passes_on_a_good_card_key(pki: Pki, pin_file: Path) -> None:
    rc, data, steps = check(pki, pin_file, "--key", pki.key_uri(KeyKind.P256))
    assert rc == 0 and data["ok"]
    assert {k for k, v in statuses(steps).items() if v != "ok"} == {"connect"}
    assert steps["connect"]["status"] == "skip"
    token = steps["token"]["facts"]
    # SoftHSM2 has no retry counter: not reported
    assert (token["label"], token["serial"], token["pin_state"]) == ("card1", pki.card1.serial, "not_reported")
    key = steps["key"]["facts"]
    assert (key["label"], key["id"], key["type"], key["bits"], key["curve"]) == ("ec256", "02", "EC", 256, "P-256")
    assert steps["match"]["facts"]["subject"] == "CN=card-holder ec256"
    sig = steps["signature"]["facts"]
    assert (sig["algorithm"], sig["verified"]) == ("ECDSA", True)
    assert steps["openssl"]["facts"]["python_openssl"] == ssl.OPENSSL_VERSION
    assert steps["login"]["facts"]["method"] == "pin"


def _dpkg_upstream(package: str) -> str | None:
    """The project version of an installed Debian package (None: unknown here)."""
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    return upstream_version(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def test_openssl_step_reports_the_interpreter(pki: Pki, pin_file: Path) -> None:
    """What the import's interpreter check decided on, and the OpenSSL each
    side runs with and was compiled with, as this process sees them."""
    _, _, steps = check(pki, pin_file, "--key", pki.key_uri(KeyKind.P256))
    step = steps["openssl"]
    facts = step["facts"]
    here = InterpreterFacts.of_this_process()
    python = sys.version.split()[0]
    build = ", ".join(n for n, on in (("debug", here.debug), ("trace-refs", here.trace_refs)) if on) or "release"
    assert facts["interpreter"] == {
        "implementation": "CPython", "version": python, "executable": sys.executable, "build": build,
        "debug": here.debug, "trace_refs": here.trace_refs, "free_threaded": False, "abiflags": sys.abiflags,
        "pointer_size": here.pointer_size, "object_header": object.__basicsize__,
        "expected_object_header": object.__basicsize__, "ssl_module": _ssl.__file__,
    }  # fmt: skip
    assert step["status"] == "ok"
    assert step["summary"].startswith(f"{ssl.OPENSSL_VERSION}; CPython {python} ({build} build); Python's ssl")
    assert facts["python_openssl"] == facts["extension_openssl"] == ssl.OPENSSL_VERSION
    major, minor, _, patch, _ = ssl._OPENSSL_API_VERSION  # type: ignore[attr-defined]
    assert facts["python_openssl_built"] == f"{major}.{minor}.{patch}"
    # mtls_engine was compiled here, with the libssl-dev headers installed now.
    headers = _dpkg_upstream("libssl-dev")
    if headers is not None and not os.environ.get("MTLS_ENGINE_OPENSSL_PREFIX"):
        assert facts["extension_openssl_built"] == headers


def test_backends_step_says_what_each_backend_is(pki: Pki, pin_file: Path) -> None:
    """libp11's engine with libp11's version from dpkg (where OpenSSL has
    an ENGINE API), pkcs11-provider with its version from its ELF package
    note; the versions are those installed here."""
    _, _, steps = check(pki, pin_file, "--key", pki.key_uri(KeyKind.P256))
    facts = steps["backends"]["facts"]
    engine, provider = facts["engine"], facts["provider"]
    need_backend("provider")
    assert provider["available"]
    summary = steps["backends"]["summary"]
    provider_version = _dpkg_upstream("pkcs11-provider")
    need(provider_version is not None, "dpkg knows pkcs11-provider")
    assert provider["implementation"] == "pkcs11-provider"
    assert provider["version"] == provider_version
    assert provider["package"]["source"] == "elf-note"
    assert provider["path"] == os.path.join(_backends.modules_dir(), "pkcs11.so")
    # libp11's own provider: in sid (libp11 0.4.21), not in Debian 12 or 13
    libp11_provider = os.path.join(_backends.modules_dir(), "pkcs11prov.so")
    libp11_prov = libp11_provider if os.path.exists(libp11_provider) else None
    assert provider["installed"] == {"pkcs11-provider": provider["path"], "libp11": libp11_prov}
    assert provider["params"]["name"] == "PKCS#11 Provider"
    assert f"provider: pkcs11-provider {provider_version} ({provider['path']})" in summary
    need_backend("engine")
    assert engine["available"]
    libp11 = _dpkg_upstream("libengine-pkcs11-openssl")
    assert engine["implementation"] == "libp11" and engine["libp11_version"] == libp11
    assert engine["path"] == engine["detail"] == os.path.join(_backends.engines_dir(), "pkcs11.so")
    assert engine["package"] == {"name": "libengine-pkcs11-openssl", "version": engine["package"]["version"],
                                 "upstream": libp11, "source": "dpkg"}  # fmt: skip
    assert f"engine: libp11 {libp11} ({engine['path']}); provider: pkcs11-provider {provider_version}" in summary


def test_text_output_marks_each_step(pki: Pki, pin_file: Path) -> None:
    proc = run_cli(
        "check", "--module", pki.module, "--pin-source", f"file:{pin_file}", "--key", pki.key_uri(KeyKind.RSA2048)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    assert sum(line.startswith("✓ ") for line in lines) == len(STEP_IDS) - 1
    assert any(line.startswith("- mTLS handshake") for line in lines)
    assert any("RSA-PSS-SHA256 made on the card, verified" in line for line in lines)
    assert_no_pin(pki, proc.stdout, proc.stderr)


def test_connect_handshake_accepted(pki: Pki, pin_file: Path, backend: str) -> None:
    srv = server_context(pki.server_cert, pki.server_key, pki.ca_file)
    with echo_server(srv) as server:
        rc, _, steps = check(
            pki, pin_file, "--key", pki.key_uri(KeyKind.P256), "--backend", backend,
            "--connect", f"localhost:{server.port}", "--cafile", str(pki.ca_file),
        )  # fmt: skip
    assert rc == 0
    facts = steps["connect"]["facts"]
    assert steps["connect"]["status"] == "ok"
    assert (facts["accepted"], facts["version"], facts["server_subject"]) == (True, "TLSv1.3", "commonName=localhost")
    assert steps["backends"]["facts"]["chosen"] == backend


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=lambda v: v.name)
def test_server_refusing_the_client(pki: Pki, pin_file: Path, version: ssl.TLSVersion) -> None:
    srv = server_context(pki.server_cert, pki.server_key, pki.other_ca_file)  # trusts another client CA
    srv.maximum_version = version
    with echo_server(srv) as server:
        rc, _, steps = check(
            pki, pin_file, "--key", pki.key_uri(KeyKind.P256),
            "--connect", f"localhost:{server.port}", "--cafile", str(pki.ca_file),
        )  # fmt: skip
    assert rc == 1
    step = steps["connect"]
    assert step["status"] == "fail"
    assert step["summary"].startswith("the server refused the card's certificate: it sent the alert 'unknown_ca'")
    assert step["hint"].startswith("unknown_ca usually means the server does not trust the CA that issued the card's")
    assert step["hint"].endswith("; the card's certificate was issued by CN=mtls_engine test CA")
    assert step["facts"]["alert"] == "unknown_ca"
    # everything before it passed: the card is fine, the server is the problem
    assert all(s == "ok" for k, s in statuses(steps).items() if k != "connect")


def test_server_not_trusted_by_the_client(pki: Pki, pin_file: Path) -> None:
    srv = server_context(pki.server_cert, pki.server_key, pki.ca_file)
    with echo_server(srv) as server:
        rc, _, steps = check(
            pki, pin_file, "--key", pki.key_uri(KeyKind.P256),
            "--connect", f"localhost:{server.port}", "--cafile", str(pki.other_ca_file),
        )  # fmt: skip
    assert rc == 1
    assert steps["connect"]["status"] == "fail"
    assert "the server's certificate was not accepted" in steps["connect"]["summary"]
    assert steps["connect"]["hint"].endswith(
        "does not hold the CA that issued the server's certificate; pass --cafile with that CA"
    )


def _failed_at(steps: dict[str, dict[str, Any]], step: str) -> dict[str, Any]:
    order = STEP_IDS
    got = statuses(steps)
    assert got[step] == "fail", got
    assert all(got[s] == "skip" for s in order[order.index(step) + 1 :]), got
    assert all(got[s] in ("ok", "warn") for s in order[: order.index(step)]), got
    return steps[step]


def test_missing_module(pki: Pki, pin_file: Path, tmp_path: Path) -> None:
    proc = run_cli("check", "--module", str(tmp_path / "nope.so"), "--json")
    assert proc.returncode == 1
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    step = _failed_at(steps, "module")
    assert "nope.so' does not exist" in step["summary"]
    assert step["hint"].startswith("pass --module with the path of your card's PKCS#11 library")
    assert step["facts"]["error"] == "ModuleLoadError"


def test_wrong_token_label(pki: Pki, pin_file: Path) -> None:
    rc, _, steps = check(pki, pin_file, "--key", "pkcs11:token=nosuchcard;object=ec256;type=private")
    step = _failed_at(steps, "token")
    assert rc == 1
    assert "no token matches 'pkcs11:token=nosuchcard" in step["summary"]
    assert "tokens present: " in step["summary"] and "token 'card1'" in step["summary"]
    assert step["hint"].startswith("insert the card, or fix the token=/serial= attributes of --key")


def test_missing_object(pki: Pki, pin_file: Path) -> None:
    rc, _, steps = check(pki, pin_file, "--key", pki.card1.uri(object="nosuchkey", type="private"))
    step = _failed_at(steps, "key")
    assert rc == 1
    assert "no private key matches object=nosuchkey" in step["summary"]
    assert step["hint"].startswith("fix --key's object= or id=")
    assert step["facts"]["error"] == "ObjectNotFound"


def test_no_key_given_lists_the_choices(pki: Pki, pin_file: Path) -> None:
    rc, _, steps = check(pki, pin_file, "--key", pki.card1.uri())  # a token, no key
    step = _failed_at(steps, "key")
    assert rc == 1
    assert step["facts"]["error"] == "AmbiguousUri"
    assert (
        f"pkcs11:serial={pki.card1.serial};token=card1;id=%02;object=ec256;type=private" in step["facts"]["candidates"]
    )


def test_mismatched_certificate(pki: Pki, pin_file: Path) -> None:
    rc, _, steps = check(pki, pin_file, "--key", pki.card1.uri(object="wrongcert", type="private"))
    step = _failed_at(steps, "match")
    assert rc == 1
    assert "does not belong to the private key 'wrongcert'" in step["summary"]
    assert step["hint"].startswith("use the certificate issued for this key")


def _reissue(pki: Pki, tmp_path: Path, name: str, **validity: datetime.datetime) -> Path:
    card_cert = x509.load_pem_x509_certificate(pki.cert_file(KeyKind.P256).read_bytes())
    pub = card_cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert = pki.ca.issue(pub, name, **validity)
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_expired_certificate(pki: Pki, pin_file: Path, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = _reissue(pki, tmp_path, "expired", not_before=now - datetime.timedelta(days=400),
                       not_after=now - datetime.timedelta(days=35))  # fmt: skip
    rc, _, steps = check(pki, pin_file, "--key", pki.key_uri(KeyKind.P256), "--cert", str(expired))
    step = _failed_at(steps, "validity")
    assert rc == 1
    assert step["summary"].startswith("expired on ") and "(35 days ago)" in step["summary"]
    assert step["hint"] == "servers refuse an expired certificate: have a new one issued for this key"


def test_not_yet_valid_and_expiring_soon(pki: Pki, pin_file: Path, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    future = _reissue(pki, tmp_path, "future", not_before=now + datetime.timedelta(days=2))
    rc, _, steps = check(pki, pin_file, "--key", pki.key_uri(KeyKind.P256), "--cert", str(future))
    assert rc == 1 and _failed_at(steps, "validity")["summary"].startswith("not valid yet")
    soon = _reissue(pki, tmp_path, "soon", not_after=now + datetime.timedelta(days=10, hours=1))
    rc, data, steps = check(pki, pin_file, "--key", pki.key_uri(KeyKind.P256), "--cert", str(soon))
    assert rc == 0 and data["ok"]
    assert steps["validity"]["status"] == "warn"
    assert steps["validity"]["facts"]["days_left"] == 10
    assert steps["validity"]["hint"] == "have the certificate renewed before it expires"


def test_wrong_pin(pki: Pki, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("99999999")
    rc, _, steps = check(pki, wrong, "--key", pki.key_uri(KeyKind.P256, pki.pintest))
    step = _failed_at(steps, "login")
    assert rc == 1
    assert "rejected the PIN (CKR_PIN_INCORRECT); it was tried once" in step["summary"]
    assert step["hint"].startswith("check the PIN before trying again")
    assert step["facts"]["error"] == "PinIncorrect"


def test_no_pin_and_no_terminal(pki: Pki) -> None:
    proc = run_cli("check", "--module", pki.module, "--key", pki.key_uri(KeyKind.P256, pki.pintest), "--json")
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    step = _failed_at(steps, "login")
    assert proc.returncode == 1
    assert "there is no terminal to ask on" in step["summary"]
    assert step["hint"].startswith("give the PIN with --pin-source env:VAR or file:PATH")


def test_key_without_pss_warns(pki: Pki, pin_file: Path) -> None:
    rc, data, steps = check(pki, pin_file, "--key", pki.card1.uri(object="nopss", type="private"))
    step = steps["mechanisms"]
    assert rc == 0 and data["ok"]  # it works, at TLS 1.2: a warning, not a failure
    assert step["status"] == "warn"
    assert step["summary"].startswith("the key's CKA_ALLOWED_MECHANISMS exclude RSA-PSS: TLS 1.3 is impossible")
    assert step["hint"].startswith("a server that requires TLS 1.3 will refuse this card")
    allowed = step["facts"]["allowed_mechanisms"]
    assert step["facts"]["tls13"] is False
    assert "CKM_RSA_PKCS" in allowed and not [m for m in allowed if "PSS" in m]
    assert steps["signature"]["facts"]["algorithm"] == "RSA-PKCS1"
    assert steps["signature"]["status"] == "ok"


def test_key_without_pss_against_a_tls13_only_server(pki: Pki, pin_file: Path) -> None:
    srv = server_context(pki.server_cert, pki.server_key, pki.ca_file)
    srv.minimum_version = ssl.TLSVersion.TLSv1_3
    with echo_server(srv) as server:
        rc, _, steps = check(
            pki, pin_file, "--key", pki.card1.uri(object="nopss", type="private"),
            "--connect", f"localhost:{server.port}", "--cafile", str(pki.ca_file),
        )  # fmt: skip
    assert rc == 1
    assert steps["mechanisms"]["status"] == "warn"
    step = steps["connect"]
    assert step["status"] == "fail"
    assert "'protocol_version'" in step["summary"]
    assert step["hint"].endswith(
        "this card cannot sign RSA-PSS, so it is capped at TLS 1.2: a TLS-1.3-only server cannot accept it"
    )


def test_bad_connect_argument_is_a_usage_error(pki: Pki) -> None:
    proc = run_cli("check", "--module", pki.module, "--connect", "no-port-here")
    assert proc.returncode == 2
    assert "--connect wants HOST:PORT" in proc.stderr


def test_prompts_for_the_pin_on_a_terminal_without_echo(pki: Pki) -> None:
    """No --pin-source on a terminal: the PIN is asked for, not echoed, and
    used for exactly this token."""
    from mtls_engine._softhsm import _run_with_tty_pin

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    args = [sys.executable, "-m", "mtls_engine", "check", "--module", pki.module, "--key", pki.key_uri(KeyKind.P256)]
    rc, out = _run_with_tty_pin(args, pki.card1.pin, env)
    assert rc == 0, out
    _, _, rest = out.partition(f"PIN for token 'card1' (serial {pki.card1.serial}")
    assert rest, out
    assert pki.card1.pin not in out  # echo was off
    assert "✓ login" in rest and "all checks passed" in rest


class _NewerHeaders:
    """The binding, as if compiled with the headers of the next OpenSSL minor release."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def mtls_built_openssl_number(self) -> int:
        return int(self._real.OpenSSL_version_num()) + 0x00100000


def test_newer_headers_advice_names_the_matching_libssl_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers newer than the running OpenSSL (experimental's OpenSSL 4
    libssl-dev beside sid's OpenSSL 3): a rebuild would use them again, so
    the advice is the development package matching Python's libssl."""
    if _check.BUILT_IN_OPENSSL is not None:
        pytest.skip("this Python has OpenSSL built in: that warning comes first")
    monkeypatch.setattr(_check, "lib", _NewerHeaders(_check.lib))
    st = _check.Step("openssl", "OpenSSL")
    _check.Checker._openssl(cast(Any, None), st)
    running = _check._number_version_text(int(_check.lib.OpenSSL_version_num()))
    assert st.status == "warn" and st.hint is not None
    assert f"newer than the OpenSSL {running} it runs with: a rebuild picks up the same headers" in st.hint
    assert "(Debian: the libssl-dev of the same version as the libssl package providing " in st.hint
    assert st.hint.endswith("then rebuild (pip install --force-reinstall --no-binary mtls_engine mtls_engine)")
