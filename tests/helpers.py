"""Running mtls_engine in a fresh interpreter (for exit status, PKCS#11
call counting through pkcs11-spy, and anything that must not share this
process's module state)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=str(ROOT),
    )  # fmt: skip


def count_calls(log: Path, name: str) -> int:
    """How many times the pkcs11-spy log shows the PKCS#11 function ``name``."""
    if not log.exists():
        return 0
    n = 0
    for line in log.read_text(errors="replace").splitlines():
        # spy lines look like: "5: C_Login" followed by the call's details
        parts = line.split(": ", 1)
        if len(parts) == 2 and parts[0].strip().isdigit() and parts[1].strip() == name:
            n += 1
    return n
