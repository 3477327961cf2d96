"""Helpers shared by the command-line tools."""

from __future__ import annotations

import argparse
import os
import sys

from ._api import MODULE_ENV
from ._errors import ConfigError, ModuleLoadError
from ._pin import PinArg, pin_source
from ._uri import parse


def write_output(path: str | None, data: bytes, mode: int) -> None:
    """Write to ``path`` (``-`` or None: standard output), creating the file
    with ``mode``; an existing file is replaced."""
    if path in (None, "-"):
        sys.stdout.write(data.decode())
        sys.stdout.flush()
        return
    assert path is not None
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConfigError(f"cannot write {path!r}: {exc.strerror}") from None


def module_arg(module: str | None, key: str | None = None) -> str:
    """--module, else $MTLS_ENGINE_MODULE, else the p11-kit-registered module
    holding the token ``key`` names (any token when None), as an absolute path."""
    module = module or os.environ.get(MODULE_ENV)
    if not module:
        from ._registry import choose

        module = choose(parse(key or "pkcs11:", what="key"))[0].path
    if not os.path.isfile(module):
        raise ModuleLoadError(f"the PKCS#11 module {module!r} does not exist; pass the path of your card's module")
    # Stock clients run from any folder: the file must name it absolutely.
    return os.path.abspath(module)


def add_card_arguments(p: argparse.ArgumentParser, *, backend: bool = True) -> None:
    """The options every command that uses a card shares."""
    p.add_argument(
        "--module",
        help=f"the card's PKCS#11 module (default: the URI's module-path, ${MODULE_ENV}, or the module "
        "registered with p11-kit that holds the token)",
    )
    p.add_argument(
        "--pin-source",
        metavar="env:VAR|file:PATH",
        help="where the PIN comes from (default: the URI's pin-source, else a prompt on the terminal); "
        "never the PIN itself",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="log in even when the token reports its PIN is on the final try",
    )
    if backend:
        p.add_argument("--backend", choices=("auto", "engine", "provider"), default="auto")


def cli_pin(spec: str | None, *uris: str | None) -> PinArg:
    """The PIN for a command: --pin-source, else the URI's own pin-source
    (None here), else a prompt on the terminal (which refuses with no
    terminal).  Never a default PIN."""
    if spec is not None:
        return pin_source(spec)
    for text in uris:
        if text and text[:7].lower() == "pkcs11:":
            u = parse(text)
            if u.pin_source is not None or u.has_pin_value:
                return None
    return pin_source("prompt")  # its PIN copies are mtls_engine's own, and wiped
