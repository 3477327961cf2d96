"""A p11-kit registry of a test's own, for processes started by the test.

p11-kit has no environment variable for its system folders; it exports
``p11_kit_override_system_files`` (its own test suite's hook). A
``sitecustomize.py`` calls it before anything is imported, so the child
reads only this registry: the machine's own .module files and the user's
are never seen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .helpers import ROOT

_SITE = """\
import ctypes
import ctypes.util
_lib = ctypes.CDLL(ctypes.util.find_library("p11-kit") or "libp11-kit.so.0")
_lib.p11_kit_override_system_files.argtypes = [ctypes.c_char_p] * 5
# p11-kit keeps the pointers (no copy): the strings must live as long as the process.
_KEEP = [ctypes.create_string_buffer(p) for p in ({conf!r}, {user_conf!r}, {package!r}, {system!r}, {user!r})]
_lib.p11_kit_override_system_files(*[ctypes.cast(b, ctypes.c_char_p) for b in _KEEP])
"""


class Registry:
    """A folder of ``.module`` files and the site folder that makes a child
    process's p11-kit read only them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules = root / "modules"
        self.site = root / "site"
        for d in (self.modules, self.site, root / "system-modules", root / "user-modules"):
            d.mkdir(parents=True, exist_ok=True)
        (root / "pkcs11.conf").write_text("user-config: none\n")
        (self.site / "sitecustomize.py").write_text(
            _SITE.format(
                conf=str(root / "pkcs11.conf").encode(),
                user_conf=str(root / "user-pkcs11.conf").encode(),
                package=str(self.modules).encode(),
                system=str(root / "system-modules").encode(),
                user=str(root / "user-modules").encode(),
            )
        )

    def register(self, name: str, library: str | os.PathLike[str], *extra: str) -> Path:
        path = self.modules / f"{name}.module"
        path.write_text("\n".join([f"module: {os.fspath(library)}", *extra]) + "\n")
        return path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MTLS_ENGINE_MODULE"}
        env.update(extra or {})
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(ROOT), env.get("PYTHONPATH", "")])
        return env

    def python(
        self, code: str, extra: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=self.env(extra), timeout=120, cwd=str(ROOT))  # fmt: skip

    def cli(
        self, *args: str, extra: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mtls_engine", *args], capture_output=True, text=True,
                              env=self.env(extra), timeout=120, cwd=str(ROOT))  # fmt: skip
