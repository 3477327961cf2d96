"""Application servers of docs/servers.md in their own processes, for the
tests (tests/test_appservers.py) and the benchmark (benchmarks/appservers.py)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "servers.md"
SERVERS = ("uvicorn", "hypercorn", "gunicorn", "aiohttp")
START_TIMEOUT = 60.0


_SNIPPET = re.compile(r"<!-- snippet: (?P<name>\S+) -->\n```python\n(?P<code>.*?)```", re.S)


def snippets() -> dict[str, str]:
    """The files of docs/servers.md: name -> code."""
    return {m.group("name"): m.group("code") for m in _SNIPPET.finditer(DOC.read_text())}


def command(server: str) -> list[str]:
    if server == "gunicorn":
        return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "flask_app:app"]
    return [sys.executable, f"{server}_app.py"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    server: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    folder: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def url(self, path: str = "/whoami") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def write_snippets(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in snippets().items():
        (folder / name).write_text(code)


def start(server: str, folder: Path, env: dict[str, str]) -> Running:
    """The server of docs/servers.md in a new process (output in
    ``folder/<server>.log``), once it listens."""
    write_snippets(folder)
    port = free_port()
    # (gunicorn >= 25 makes a control socket, by default in the home folder: keep it in this run's own)
    full = {**os.environ, **env, "PORT": str(port), "XDG_RUNTIME_DIR": str(folder)}
    full["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), full.get("PYTHONPATH", "")])
    log = folder / f"{server}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(server), cwd=folder, env=full, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
    running = Running(server, proc, port, log, folder)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{server} exited with {proc.returncode}:\n{running.output()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return running
        except OSError:
            time.sleep(0.1)
    running.stop()
    raise AssertionError(f"{server} did not listen within {START_TIMEOUT:g} s:\n{running.output()[-4000:]}")
