"""The package stays ruff- and mypy --strict-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need
from .helpers import ROOT

BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


@pytest.mark.parametrize(
    "args",
    [
        ["ruff", "check", "mtls_engine", "tests", "csrc"],
        ["ruff", "format", "--check", "mtls_engine", "tests"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_lint(args: list[str]) -> None:
    tool = _tool(args[0])
    need(tool is not None, f"{args[0]} is not installed (pip install -e '.[dev]')")
    assert tool is not None
    proc = subprocess.run([tool, *args[1:]], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
