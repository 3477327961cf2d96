"""The set-up script picks the apt suite for pkcs11-provider from
/etc/debian_version (Debian 12: bookworm-backports; 13 and later: main);
the sanitizer script parses and explains itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import need
from .helpers import ROOT


@pytest.mark.parametrize(
    ("debian_version", "suite"),
    [
        ("12.11", "bookworm-backports"),
        ("12.0", "bookworm-backports"),
        ("bookworm/sid", "bookworm-backports"),
        ("13.1", "main"),
        ("14.0", "main"),
        ("trixie/sid", "main"),
        ("forky/sid", "main"),
        ("11.9", "none"),
        ("", "none"),
    ],
)
def test_pkcs11_provider_suite_follows_debian_version(tmp_path: Path, debian_version: str, suite: str) -> None:
    version_file = tmp_path / "debian_version"
    version_file.write_text(debian_version + "\n")
    proc = subprocess.run(
        ["bash", str(ROOT / "ci" / "setup.sh"), "--plan"],
        env={"PATH": "/usr/bin:/bin", "MTLS_DEBIAN_VERSION_FILE": str(version_file)},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"pkcs11-provider: {suite}"


@pytest.mark.parametrize(
    ("openssl_major", "plan"),
    [("3", "install"), ("1", "install"), ("4", "skip (this OpenSSL has no ENGINE API)")],
)
def test_libp11_engine_is_skipped_where_openssl_has_no_engine_api(
    tmp_path: Path, openssl_major: str, plan: str
) -> None:
    """The set-up script asks the Python that will run mtls_engine which
    OpenSSL it has; on OpenSSL 4 it leaves libp11's engine out."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho {openssl_major}\n")
    python.chmod(0o755)
    version_file = tmp_path / "debian_version"
    version_file.write_text("forky/sid\n")
    proc = subprocess.run(
        ["bash", str(ROOT / "ci" / "setup.sh"), "--plan"],
        env={"PATH": "/usr/bin:/bin", "MTLS_DEBIAN_VERSION_FILE": str(version_file), "PYTHON": str(python)},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["pkcs11-provider: main", f"libengine-pkcs11-openssl: {plan}"]


def test_sanitize_script_parses_and_explains_itself() -> None:
    """ci/sanitize.sh (the on-demand ASan + UBSan run) is valid shell and its
    --help says what it does, without building or running anything."""
    script = ROOT / "ci" / "sanitize.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The test suite against an AddressSanitizer + UndefinedBehaviorSanitizer")
    for needed in ("bash ci/sanitize.sh --build", "RTLD_DEEPBIND", "mechanism_list_purge", ".venv-asan"):
        assert needed in proc.stdout, needed


def test_sanitize_preload_compiles(tmp_path: Path) -> None:
    """The RTLD_DEEPBIND filter ci/sanitize.sh preloads builds as a shared
    object that defines dlopen."""
    cc = shutil.which("cc")
    need(cc is not None, "no C compiler (cc) to build ci/strip_deepbind.c")
    assert cc is not None
    out = tmp_path / "strip_deepbind.so"
    source = ROOT / "ci" / "strip_deepbind.c"
    command = [cc, "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(out), str(source), "-ldl"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(out)], capture_output=True, text=True, timeout=30)
    assert " T dlopen" in symbols.stdout, symbols.stdout


def test_newest_script_parses_and_explains_itself() -> None:
    """ci/newest.sh (the on-demand Debian sid run) is valid shell and says
    what it does without doing anything."""
    script = ROOT / "ci" / "newest.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The whole suite in CI mode on Debian's newest platform")
    for needed in ("bash ci/newest.sh ROOT", "debootstrap", "CI=true bash ci/test.sh", "MTLS_NEWEST_MIRROR"):
        assert needed in proc.stdout, needed
