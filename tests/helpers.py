"""Running mtls_engine in a fresh interpreter (for exit status, PKCS#11
call counting through pkcs11-spy, and anything that must not share this
process's module state)."""

from __future__ import annotations

import os
import re
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


def run_module(
    module: str, *args: str, site: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m module args...`` in a fresh interpreter; ``site`` is a
    folder put first on its path (a ``sitecustomize.py`` there runs before
    anything is imported: where tests put their stand-ins)."""
    env = dict(os.environ)
    paths = [str(site)] if site is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT)
    )


def count_calls(log: Path, name: str) -> int:
    """How many times the pkcs11-spy log shows the PKCS#11 function ``name``.
    A missing log raises: it means the spy never ran, not that nothing was
    called."""
    if not log.exists():
        raise FileNotFoundError(
            f"no pkcs11-spy log at {log}: the spy never ran (was the module the spy, with PKCS11SPY_OUTPUT set?)"
        )
    n = 0
    for line in log.read_text(errors="replace").splitlines():
        # spy lines look like: "5: C_Login" followed by the call's details
        parts = line.split(": ", 1)
        if len(parts) == 2 and parts[0].strip().isdigit() and parts[1].strip() == name:
            n += 1
    return n


# The text of an ssl.SSLError for an alert the peer sent: "[SSL: REASON] words".
# OpenSSL 3.5 (measured, Debian 13) words the SSLV3_ALERT_* reasons (alerts
# 10-47: handshake_failure, bad_certificate, certificate_expired, ...) as
# "ssl/tls alert ..." where 3.0 (Debian 12) says "sslv3 alert ..."; the
# reason code (SSLV3_ALERT_HANDSHAKE_FAILURE) and the alert it names are the
# same, and TLSV1_ALERT_* / TLSV13_ALERT_* texts did not change.
_SSLV3_WORDING = re.compile(r"\[SSL: SSLV3_ALERT_([A-Z_]+)\] (?:sslv3|ssl/tls) alert ([a-z ]+)")


def same_alert_text(got: str, expected: str) -> bool:
    """``got`` is ``expected`` (written as OpenSSL 3.0 words it), allowing
    only OpenSSL 3.5's wording of SSLV3_ALERT_* reasons: the reason code and
    the alert's name must match exactly."""
    if got == expected:
        return True
    g, e = _SSLV3_WORDING.fullmatch(got), _SSLV3_WORDING.fullmatch(expected)
    return bool(g and e and g.groups() == e.groups() and g.group(1).lower().replace("_", " ") == g.group(2))
