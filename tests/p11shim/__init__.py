"""A PKCS#11 pass-through module ("shim") for tests and benchmarks.

``shim.c`` forwards every call to a real module (SoftHSM2) and simulates
what SoftHSM2 lacks: the PIN-state flags (count low, final try, locked), a
retry counter that persists across processes like a card's, a pinpad reader,
a slow card and a client signing with another key than its certificate's
(``sign_with``: the key with that label signs instead); it logs the calls it
wraps (never a PIN).  Typical use::

    so = p11shim.build()
    env = p11shim.shim_env(softhsm_module, tmp_path, max_tries=3, sign_delay_ms=100)
    # run the code under test in a fresh process with env, module=str(so)
    assert p11shim.count(env["MTLS_SHIM_LOG"], "C_Login") == 1

The shim reads its environment once per process, on the first
C_GetFunctionList, so a test changes it by starting a new process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "ShimUnavailable",
    "build",
    "card_windows",
    "count",
    "count_by_process",
    "read_log",
    "read_log_pids",
    "shim_env",
    "signatures",
]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "shim.c"
FLAGS = ("count_low", "final_try", "locked", "pinpad")
_CFLAGS = ["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-fvisibility=hidden"]
_LIBS = ["-ldl", "-lpthread"]


class ShimUnavailable(RuntimeError):
    """No C compiler or no p11-kit PKCS#11 header (a missing tool, not a bug)."""


def _include_dir() -> str:
    """Where p11-kit's ``p11-kit/pkcs11.h`` lives (pkg-config, else Debian's path)."""
    if shutil.which("pkg-config"):
        proc = subprocess.run(["pkg-config", "--cflags-only-I", "p11-kit-1"], capture_output=True, text=True)
        for flag in proc.stdout.split():
            if flag.startswith("-I") and (Path(flag[2:]) / "p11-kit" / "pkcs11.h").exists():
                return flag[2:]
    default = "/usr/include/p11-kit-1"
    if not (Path(default) / "p11-kit" / "pkcs11.h").exists():
        raise ShimUnavailable("p11-kit's PKCS#11 header is missing (Debian: apt-get install libp11-kit-dev)")
    return default


def build(dest_dir: str | os.PathLike[str] | None = None) -> Path:
    """Compile the shim (once per version of shim.c and compiler) and return
    the shared object's path, in ``dest_dir`` or ``tests/p11shim/build``."""
    cc = os.environ.get("CC") or shutil.which("cc")
    if not cc or not shutil.which(cc):
        raise ShimUnavailable("no C compiler (cc) to build the PKCS#11 test shim")
    include = _include_dir()
    command = [cc, *_CFLAGS, f"-I{include}"]
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(command).encode()).hexdigest()[:16]
    out_dir = Path(dest_dir) if dest_dir is not None else HERE / "build"
    out = out_dir / f"mtls-p11shim-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{out.name}.{os.getpid()}.tmp"
    proc = subprocess.run([*command, str(SOURCE), "-o", str(tmp), *_LIBS], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the PKCS#11 shim failed:\n{proc.stderr}")
    os.replace(tmp, out)  # atomic: parallel test runs never load half a file
    return out


def shim_env(
    real_module: str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    *,
    token_flags: Iterable[str] = (),
    max_tries: int | None = None,
    pinpad_pin: str | None = None,
    sign_delay_ms: int | None = None,
    sign_with: str | None = None,
    token_error: tuple[str, int] | None = None,
    identity: tuple[str, str, str, str] | None = None,
    log: bool = True,
) -> dict[str, str]:
    """Environment variables configuring the shim.  Its files live in
    ``state_dir``: ``shim.log`` (``MTLS_SHIM_LOG``), ``pin-failures``
    (``MTLS_SHIM_STATE``, with ``max_tries``) and ``pinpad-pin``
    (``MTLS_SHIM_PINPAD_PIN_FILE``, written 0600 with ``pinpad_pin``).
    ``sign_with`` names (CKA_LABEL) the private key on the same token that
    makes every signature, in place of the key the caller signs with.
    ``token_error`` (label, CKR code): C_GetTokenInfo of that token fails
    with that code (CKR_TOKEN_NOT_RECOGNIZED: a card the module cannot read).
    ``identity`` (library manufacturer, library description, token
    manufacturer, token model; "" keeps the real one): what the module and
    its tokens say they are (another kind of token than SoftHSM2's)."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    flags = list(token_flags)
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise ValueError(f"unknown shim token flags {sorted(unknown)}; known: {FLAGS}")
    env = {"MTLS_SHIM_MODULE": os.fspath(real_module)}
    if flags:
        env["MTLS_SHIM_TOKEN_FLAGS"] = ",".join(flags)
    if max_tries is not None:
        env["MTLS_SHIM_MAX_TRIES"] = str(max_tries)
        env["MTLS_SHIM_STATE"] = str(state / "pin-failures")
    if pinpad_pin is not None:
        pin_file = state / "pinpad-pin"
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pinpad_pin)
        env["MTLS_SHIM_PINPAD_PIN_FILE"] = str(pin_file)
    if sign_delay_ms is not None:
        env["MTLS_SHIM_SIGN_DELAY_MS"] = str(sign_delay_ms)
    if sign_with:
        env["MTLS_SHIM_SIGN_WITH"] = sign_with
    if identity is not None:
        env["MTLS_SHIM_IDENTITY"] = "|".join(identity)
    if token_error is not None:
        label, rv = token_error
        env["MTLS_SHIM_TOKEN_ERROR"] = f"{label}:{rv:X}"
    if log:
        env["MTLS_SHIM_LOG"] = str(state / "shim.log")
    return env


def read_log_pids(path: str | os.PathLike[str]) -> list[tuple[int, str, int, str]]:
    """The shim log as (process id, function name, return value, rest of the line)."""
    p = Path(path)
    if not p.exists():
        return []
    entries = []
    for line in p.read_text().splitlines():
        name, rv, pid, *rest = line.split(" ", 3)
        entries.append((int(pid.removeprefix("pid=")), name, int(rv.removeprefix("rv="), 16), rest[0] if rest else ""))
    return entries


def read_log(path: str | os.PathLike[str]) -> list[tuple[str, int, str]]:
    """The shim log as (function name, return value, rest of the line)."""
    return [(name, rv, rest) for _, name, rv, rest in read_log_pids(path)]


def count_by_process(path: str | os.PathLike[str], name: str) -> dict[int, int]:
    """How many calls of ``name`` each process made (process id -> count)."""
    counts: dict[int, int] = {}
    for pid, n, _, _ in read_log_pids(path):
        if n == name:
            counts[pid] = counts.get(pid, 0) + 1
    return counts


def count(path: str | os.PathLike[str], name: str) -> int:
    """How many calls of ``name`` the shim log shows."""
    return sum(1 for n, _, _ in read_log(path) if n == name)


def card_windows(entries: list[tuple[int, str, int, str]]) -> list[tuple[int, int, int]]:
    """The slow card's waits (``sign_delay_ms``) in a log read by
    :func:`read_log_pids`: (thread, index of card_busy, index of card_done),
    the thread as Python's ``threading.get_ident()`` names it."""
    open_: dict[tuple[int, str], int] = {}
    out = []
    for i, (pid, name, _, rest) in enumerate(entries):
        if name in ("card_busy", "card_done"):
            key = (pid, rest)
            if name == "card_busy":
                open_[key] = i
            else:
                out.append((int(rest.removeprefix("thread=")), open_.pop(key), i))
    return out


def signatures(path: str | os.PathLike[str]) -> int:
    """Signatures made (C_Sign or C_SignFinal with a buffer, not size queries)."""
    return sum(1 for n, _, rest in read_log(path) if n in ("C_Sign", "C_SignFinal") and "query" not in rest.split())
