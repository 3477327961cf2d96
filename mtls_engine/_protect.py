"""Keeping a card-holding process out of core dumps and debuggers.

A process that logs in to a card has held PIN copies (wiped, see ``_pin``)
and keeps its PIN source for the life of the process; a core dump, or
another program of the same user attaching with ptrace, could read them.
"""

from __future__ import annotations

import os
import sys

from ._errors import ConfigError, ProcessProtectionError

PROTECT_ENV = "MTLS_ENGINE_PROTECT_PROCESS"
_PR_SET_DUMPABLE = 4


def protect_process() -> None:
    """Make this process write no core dump (``RLIMIT_CORE`` 0) and, on Linux,
    non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``: no core, no ptrace by
    same-user programs, /proc/PID files owned by root).  Forked children
    inherit both; a program it executes inherits only the core limit.
    Raises ProcessProtectionError when the system refuses."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        raise ProcessProtectionError(f"cannot set this process's core file size limit to 0: {exc}") from None
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise ProcessProtectionError(
                f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(err)}; this process can still be dumped"
            )


def protect_if_asked() -> None:
    """:func:`protect_process` when ``MTLS_ENGINE_PROTECT_PROCESS=1``, before
    a card key is loaded (``0`` or unset: nothing)."""
    value = os.environ.get(PROTECT_ENV, "")
    if value in ("", "0"):
        return
    if value != "1":
        raise ConfigError(f"{PROTECT_ENV} must be 1 (protect this process) or 0, not {value!r}")
    protect_process()
