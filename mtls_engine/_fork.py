"""What a forked child needs before it can use a card key.

PKCS#11 says a child must initialise a module again before using it, and a
module that does (or a backend that does it for the module: pkcs11-provider
calls C_Finalize and C_Initialize in the child) logs every session out.
mtls_engine therefore runs, in every child made by ``os.fork()`` (and so by
``multiprocessing`` with the fork start method, and by pre-fork servers):

1. fresh locks: a lock another thread held at the fork stays held for ever
   in the child, where that thread does not exist;
2. the steps registered with :func:`in_child`, in registration order: wake
   pkcs11-provider so its re-initialisation happens now, then log in again
   with the PIN source that logged in before (through the same lockout guard:
   a PIN the token rejected is never offered again).

A step that fails is logged (logger ``mtls_engine``) and leaves the card key
unusable in that child, with a clear error at the next handshake; it never
raises into ``os.fork()``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

from ._log import log

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar


class ForkSafeLock:
    """A lock (reentrant if asked) that is new and free in a forked child."""

    _all: ClassVar[weakref.WeakSet[ForkSafeLock]] = weakref.WeakSet()

    def __init__(self, reentrant: bool = False) -> None:
        self._reentrant = reentrant
        self._lock: Any = None
        self._renew()
        ForkSafeLock._all.add(self)

    def _renew(self) -> None:
        self._lock = threading.RLock() if self._reentrant else threading.Lock()

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


_steps: list[tuple[str, Callable[[], None]]] = []


def in_child(what: str, step: Callable[[], None]) -> None:
    """Run ``step`` in every forked child, after the locks are renewed and
    after the steps registered before it."""
    _steps.append((what, step))


def _after_fork_in_child() -> None:
    for lock in list(ForkSafeLock._all):
        lock._renew()
    for what, step in _steps:
        try:
            step()
        except Exception as exc:  # never raise into os.fork()
            log.warning("after fork (pid %d): %s failed: %s", os.getpid(), what, exc)


os.register_at_fork(after_in_child=_after_fork_in_child)
