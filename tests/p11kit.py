"""A real ``p11-kit server`` exporting a SoftHSM2 token on a unix socket, and
where this machine keeps ``p11-kit-client.so`` (asked of pkg-config and the
package system, never assumed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


def client_module() -> str | None:
    """p11-kit-client.so: in p11-kit's module folder (``pkg-config
    p11-kit-1 --variable p11_module_path``), else wherever the package that
    ships it put it (``dpkg -L p11-kit-modules``)."""
    try:
        folder = subprocess.run(
            ["pkg-config", "p11-kit-1", "--variable", "p11_module_path"],
            capture_output=True, text=True, check=False, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        folder = ""
    if folder and os.path.exists(os.path.join(folder, "p11-kit-client.so")):
        return os.path.join(folder, "p11-kit-client.so")
    try:
        files = subprocess.run(
            ["dpkg", "-L", "p11-kit-modules"], capture_output=True, text=True, check=False, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        files = []
    for path in files:
        if os.path.basename(path) == "p11-kit-client.so" and os.path.exists(path):
            return path
    return None


def server_missing() -> str | None:
    """Why ``p11-kit server`` cannot run here, or None."""
    if shutil.which("p11-kit") is None:
        return "p11-kit is not installed (Debian: apt-get install p11-kit p11-kit-modules)"
    probe = subprocess.run(["p11-kit", "server", "--help"], capture_output=True, text=True, check=False, timeout=30)
    if "usage: p11-kit server" not in probe.stdout + probe.stderr:
        return "this p11-kit has no 'server' command (p11-kit 0.23.x and later have it)"
    if client_module() is None:
        return "p11-kit-client.so is not installed (Debian: apt-get install p11-kit-modules)"
    return None


class P11KitServer:
    """``p11-kit server`` in the foreground, in a process group of its own
    (it forks one p11-kit-remote per connection), exporting ``token_uri``
    of ``provider`` on ``socket``.  ``stop`` ends the whole group: every
    client connection breaks, as when a network HSM goes away."""

    def __init__(self, socket: Path, provider: str, token_uri: str, env: dict[str, str]) -> None:
        self.socket = socket
        self.provider = provider
        self.token_uri = token_uri
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["p11-kit", "server", "--foreground", "--name", str(self.socket), "--provider", self.provider,
             self.token_uri],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"p11-kit server did not open {self.socket}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its p11-kit-remote children
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        # The server removes its socket on SIGTERM; make sure of it, so a
        # client cannot connect to anything until start() again.
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> P11KitServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
