"""mtls_engine's logger ("mtls_engine"), with ``logging`` imported at its
first use: loading a card key logs nothing when all goes well, and
``logging`` (with ``traceback``, ``string``, ...) is a tenth of what it
used to import."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging

    log: logging.Logger
else:

    class _Logger:
        __slots__ = ()

        def __getattr__(self, name):
            import logging

            return getattr(logging.getLogger("mtls_engine"), name)

    log = _Logger()

__all__ = ["log"]
