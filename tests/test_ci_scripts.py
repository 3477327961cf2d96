"""The set-up script picks the apt suite for pkcs11-provider from
/etc/debian_version (Debian 12: bookworm-backports; 13 and later: main)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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
    assert proc.stdout.strip() == f"pkcs11-provider: {suite}"
