"""Running mtls_engine in a fresh interpreter (for exit status, PKCS#11
call counting through pkcs11-spy, and anything that must not share this
process's module state)."""

from __future__ import annotations

import os
import re
import ssl
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
# same, and TLSV1_ALERT_* / TLSV13_ALERT_* texts did not change.  OpenSSL 4.0
# (reported on Debian experimental's 4.0.3) says "tls alert ...".
_SSLV3_WORDING = re.compile(r"\[SSL: SSLV3_ALERT_([A-Z_]+)\] (?:sslv3|ssl/tls|tls) alert ([a-z ]+)")


def same_alert_text(got: str, expected: str) -> bool:
    """``got`` is ``expected`` (written as OpenSSL 3.0 words it), allowing
    only OpenSSL 3.5's wording of SSLV3_ALERT_* reasons: the reason code and
    the alert's name must match exactly."""
    if got == expected:
        return True
    g, e = _SSLV3_WORDING.fullmatch(got), _SSLV3_WORDING.fullmatch(expected)
    return bool(g and e and g.groups() == e.groups() and g.group(1).lower().replace("_", " ") == g.group(2))


def ca_names_seen(port: int, tls: str, cafile: Path, cert: Path, key: Path) -> list[str] | None:
    """The acceptable client CA names ``openssl s_client`` (``tls``: "1.2"
    or "1.3") read from the server on ``port``, one line per name as it
    prints them; None when it says the server sent none."""
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-tls" + tls.replace(".", "_"), "-CAfile", str(cafile), "-cert", str(cert), "-key", str(key)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    out = proc.stdout
    assert f"New, TLSv{tls}, Cipher is " in out, out + proc.stderr  # the handshake was made, in that version
    if "No client certificate CA names sent" in out:
        assert "Acceptable client certificate CA names" not in out, out
        return None
    assert "Acceptable client certificate CA names\n" in out, out + proc.stderr
    names = []
    for line in out.split("Acceptable client certificate CA names\n", 1)[1].splitlines():
        if line.startswith(("Client Certificate Types", "Requested Signature", "Shared ", "---")) or not line:
            break
        names.append(line)
    return names


def client_hello(version: ssl.TLSVersion) -> bytes:
    """The bytes of a real ClientHello (Python's client, made in memory):
    what a client that then hangs up has sent."""
    ctx = ssl.create_default_context()
    ctx.maximum_version = version
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert hello[:1] == b"\x16", hello  # a TLS handshake record
    return hello
