"""mtls_engine.testing: token folders and cards for users' own tests, and
its pytest plugin (issue 16 D).

The README's example is read from README.md and run as written, by pytest
in a fresh process, with the plugin loaded through its entry point as a
user's project would load it; that run must leave no folder or process
behind.  The same fixtures serve this suite (tests/conftest.py overrides
``mtls_token_folder`` with the session's token folder).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import mtls_engine
from mtls_engine import testing
from mtls_engine.testing import Card, KeyKind, TokenFolder, TokenFolderError, TokenKindUnavailable

from .conftest import Pki, need
from .helpers import ROOT, run_python

README = ROOT / "README.md"
_SNIPPET = re.compile(r"<!-- snippet: (?P<name>\S+) \(run by (?P<tests>[^)]*)\) -->\n```python\n(?P<code>.*?)```", re.S)


def readme_snippet(name: str) -> str:
    found = {m.group("name"): m.group("code") for m in _SNIPPET.finditer(README.read_text())}
    assert name in found, f"README.md has no snippet {name!r} (found {sorted(found)})"
    return found[name]


def _plugin_registered() -> None:
    points = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "mtls_engine"]
    assert [e.value for e in points] == ["mtls_engine._pytest_plugin"], (
        "the pytest11 entry point is not installed; reinstall the package (pip install -e .)"
    )


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest in a fresh process in ``folder``, as in a user's project: the
    plugin comes from its entry point, temporary files go to folder/tmp."""
    tmp = folder / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "PYTHONPATH", "PYTEST_ADDOPTS")}
    env["TMPDIR"] = str(tmp)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "-rs",
         f"--basetemp={folder / 'basetemp'}", *args],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _processes_naming(text: str) -> list[str]:
    """Command lines of running processes that contain ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


RECORD_FOLDER = """
import os


from mtls_engine.testing import KeyKind


def test_where_the_token_folder_is(mtls_token_folder, mtls_card):
    with open(os.environ["T_RECORD"], "w") as f:
        f.write(str(mtls_token_folder.directory))
    assert os.environ["SOFTHSM2_CONF"].startswith(str(mtls_token_folder.directory))
    assert mtls_card.folder is mtls_token_folder and mtls_token_folder.cards == [mtls_card]
    assert mtls_card.label == "mtls-card" and mtls_card.keys == [KeyKind.RSA2048, KeyKind.P256]
    assert mtls_card.key_uri(KeyKind.RSA2048) == "pkcs11:token=mtls-card;object=rsa2048;type=private"
    assert mtls_card.subject(KeyKind.RSA2048) == mtls_card.subject() == "CN=card-holder mtls-card"
"""


def test_readme_example_runs_as_written_with_the_plugin(pki: Pki, tmp_path: Path) -> None:
    _plugin_registered()
    (tmp_path / "test_readme_example.py").write_text(readme_snippet("testing"))
    (tmp_path / "test_record.py").write_text(RECORD_FOLDER)
    record = tmp_path / "folder.txt"
    os.environ["T_RECORD"] = str(record)
    try:
        proc = _pytest(tmp_path)
    finally:
        del os.environ["T_RECORD"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b2 passed\b", proc.stdout), proc.stdout
    # Cleaned up: the token folder is gone, nothing runs from it, and
    # nothing else was left in the temporary folder.
    folder = record.read_text()
    assert folder.startswith(str(tmp_path / "tmp"))
    assert not os.path.exists(folder)
    assert _processes_naming(folder) == []
    assert os.listdir(tmp_path / "tmp") == []


def test_the_readme_example_runs_on_a_tpm2_card(tmp_path: Path) -> None:
    """--mtls-token-kind=tpm2: the same fixture is a TPM 2.0 token (swtpm
    behind tpm2-abrmd, keys generated on the TPM), and the README's test
    passes on it as written; the daemons and the folder are gone after."""
    _plugin_registered()
    missing = testing.missing_tools("tpm2")
    need(not missing, f"a TPM 2.0 test token needs {', '.join(missing)}")
    (tmp_path / "test_readme_example.py").write_text(readme_snippet("testing"))
    (tmp_path / "test_kind.py").write_text(
        "def test_kind(mtls_card):\n    assert mtls_card.folder.kind == 'tpm2'\n    assert 'tpm2' in mtls_card.module\n"
    )
    proc = _pytest(tmp_path, "--mtls-token-kind=tpm2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b2 passed\b", proc.stdout), proc.stdout
    assert _processes_naming(str(tmp_path / "tmp")) == []
    assert os.listdir(tmp_path / "tmp") == []


def test_this_suite_gives_the_plugin_fixtures_its_token_folder(mtls_card: Card, pki: Pki) -> None:
    assert mtls_card.folder is pki.folder and mtls_card.token is pki.card1
    assert mtls_card.keys == [KeyKind.RSA2048, KeyKind.P256, KeyKind.P384]
    assert mtls_card.pin_file.read_text() == pki.card1.pin
    assert os.environ["SOFTHSM2_CONF"] == str(pki.store.conf)


@pytest.mark.parametrize("kind", [KeyKind.RSA2048, KeyKind.P256], ids=lambda k: k.name)
def test_a_card_key_client_handshakes_with_the_local_server(mtls_card: Card, backend: str, kind: KeyKind) -> None:
    ctx = mtls_engine.client_context(key=mtls_card.key_uri(kind), cafile=mtls_card.ca_file, module=mtls_card.module,
                                     pin=mtls_engine.pin_source(mtls_card.pin_source), backend=backend)  # fmt: skip
    subject = f"CN=card-holder {testing.KEY_NAMES[kind][0]}"  # card1's certificates name their key
    with mtls_card.https_server() as server:
        for _ in range(2):
            with urllib.request.urlopen(server.url, context=ctx, timeout=30) as resp:
                assert resp.read() == f"hello, {subject}\n".encode()
    assert server.clients == [subject] * 2
    assert server.errors == []
    expected = mtls_card.certificate(kind)
    assert mtls_card.subject(kind) == subject
    assert expected.issuer == mtls_card.folder.ca.cert.subject
    # the key on the token is the one the certificate names
    assert mtls_engine.load_card_key(ssl.create_default_context(), mtls_card.key_uri(kind), module=mtls_card.module,
                                     pin=mtls_card.pin, backend=backend).certificate == expected  # fmt: skip


def test_the_local_server_refuses_a_client_without_a_certificate(mtls_card: Card) -> None:
    ctx = ssl.create_default_context(cafile=str(mtls_card.ca_file))
    with mtls_card.https_server() as server:
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(server.url, context=ctx, timeout=30).read()
    assert server.clients == []
    assert len(server.errors) == 1 and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in server.errors[0]


def test_pin_file_is_private_and_no_repr_shows_the_pin(mtls_card: Card) -> None:
    assert mtls_card.pin_file.stat().st_mode & 0o777 == 0o600
    assert mtls_card.pin_file.read_text() == mtls_card.pin
    assert mtls_card.pin_source == f"file:{mtls_card.pin_file}"
    for text in (repr(mtls_card), repr(mtls_card.folder)):
        assert mtls_card.pin not in text


def test_pin_env_is_a_pin_source_without_a_file(tmp_path: Path) -> None:
    folder = TokenFolder.create(tmp_path / "f", activate=False)
    card = folder.add_card("envcard", [KeyKind.P256])
    os.environ.pop("T_CARD_PIN", None)
    assert card.pin_env("T_CARD_PIN") == "env:T_CARD_PIN"
    assert os.environ["T_CARD_PIN"] == card.pin
    assert mtls_engine.pin_source("env:T_CARD_PIN")(None) == card.pin.encode()  # type: ignore[arg-type]
    assert not list(tmp_path.rglob("*.pin"))
    folder.close()
    assert "T_CARD_PIN" not in os.environ


def test_errors_name_what_to_fix(mtls_card: Card, tmp_path: Path) -> None:
    (pintest,) = [card for card in mtls_card.folder.cards if card.label == "pintest"]
    with pytest.raises(TokenFolderError, match=r"^pintest has no RSA2048 key \(it has: P256\); add_key"):
        pintest.key_uri(KeyKind.RSA2048)
    with pytest.raises(TokenFolderError, match="already has a card labelled 'card1'; pick another label"):
        mtls_card.folder.add_card("card1")
    with pytest.raises(TokenFolderError, match=r"^unknown token kind 'yubikey'; use one of softhsm2, tpm2$"):
        TokenFolder.create(tmp_path / "x", kind="yubikey")
    assert issubclass(TokenFolderError, mtls_engine.Error)


def test_a_token_kind_that_cannot_be_made_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTLS_ENGINE_TPM2_PKCS11_MODULE", str(tmp_path / "no-such-module.so"))
    assert "libtpm2_pkcs11.so" in testing.missing_tools("tpm2")
    with pytest.raises(
        TokenKindUnavailable, match=r"^a TPM 2\.0 test token needs .*libtpm2_pkcs11\.so.* \(Debian: apt-get"
    ):
        TokenFolder.create(tmp_path / "y", kind="tpm2")
    assert not (tmp_path / "y" / "tpm2").exists()
    assert testing.missing_tools("yubikey") == ["a token kind named 'yubikey' (known: softhsm2, tpm2)"]


def test_a_second_active_folder_in_one_process_is_refused(mtls_card: Card) -> None:
    """SoftHSM2 reads SOFTHSM2_CONF once per process: a second folder would
    silently not be seen.  Its own temporary folder is removed again."""
    mtls_engine.load_card_key(
        ssl.create_default_context(), mtls_card.key_uri(), module=mtls_card.module, pin=mtls_card.pin
    )  # fmt: skip  (SoftHSM2 is loaded in this process)
    with pytest.raises(TokenFolderError, match=r"^cannot add the card 'late': SoftHSM2 is already loaded in this pro"):
        mtls_card.folder.add_card("late")
    before = os.environ["SOFTHSM2_CONF"]
    with pytest.raises(TokenFolderError, match=r"SoftHSM2 is already loaded in this process with SOFTHSM2_CONF="):
        TokenFolder.create()
    assert os.environ["SOFTHSM2_CONF"] == before
    # inactive, it can be made (for subprocesses given its env)
    with TokenFolder.create(activate=False) as other:
        assert other.env["SOFTHSM2_CONF"] != before and other.directory.exists()
    assert not other.directory.exists()


CLEANUP_SCRIPT = """
import json, os, ssl, urllib.request
import mtls_engine
from mtls_engine.testing import KeyKind, TokenFolder

os.environ["SOFTHSM2_CONF"] = "/nonexistent/softhsm2.conf"
with TokenFolder.create() as folder:
    card = folder.add_card("cleanup", [KeyKind.P256])
    ctx = mtls_engine.client_context(key=card.key_uri(), cafile=card.ca_file, module=card.module,
                                     pin=mtls_engine.pin_source(card.pin_source), backend=os.environ["T_BACKEND"])
    with card.https_server() as server, urllib.request.urlopen(server.url, context=ctx) as resp:
        body = resp.read().decode()
print(json.dumps({"folder": str(folder.directory), "body": body, "conf": os.environ.get("SOFTHSM2_CONF"),
                  "exists": os.path.exists(folder.directory)}))
"""


def test_the_context_manager_removes_everything_and_the_process_exits_cleanly(
    pki: Pki, tmp_path: Path, backend: str
) -> None:
    import json

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = run_python(CLEANUP_SCRIPT, env={"T_BACKEND": backend, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]  # no crash at exit, with SoftHSM2's folder gone
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["body"] == "hello, CN=card-holder cleanup\n"
    assert out["conf"] == "/nonexistent/softhsm2.conf"  # the environment is restored
    assert out["folder"].startswith(str(tmp)) and out["exists"] is False
    assert os.listdir(tmp) == []


def test_importing_mtls_engine_does_not_import_testing() -> None:
    proc = run_python("import sys, mtls_engine; print(sorted(m for m in sys.modules if m.startswith('mtls_engine.t')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]"]


def test_the_plugin_pytest_loads_at_every_start_imports_nothing_heavy() -> None:
    """pytest imports the plugin in every run where mtls_engine is installed:
    neither the token machinery nor cryptography may come with it."""
    proc = run_python(
        "import sys, mtls_engine._pytest_plugin; "
        "heavy = ('mtls_engine.t', 'mtls_engine._softhsm', 'cryptography'); "
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]"]
