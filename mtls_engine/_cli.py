"""``python -m mtls_engine``: command-line tools.

check    find out, step by step, whether a card key can do mutual TLS
list     show slots, tokens, mechanisms and objects of a PKCS#11 module
connect  an HTTPS GET with the card key (--trace shows the handshake)
serve    an HTTPS server that checks client cards and says why it refuses
config   write an openssl.cnf that makes stock clients use a card key
uri-pem  write a PKCS#11 PROVIDER URI key file for a pkcs11: URI
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from . import _backends, _check, _connect, _listing, _serve
from ._api import MODULE_ENV
from ._cliutil import module_arg, write_output
from ._config import openssl_cnf
from ._errors import ConfigError, Error, PinOnCommandLine, PinWarning
from ._uri import has_pin_value_attribute
from ._uripem import read_uri_pem, uri_pem

__all__ = ["main"]


def cmd_config(args: argparse.Namespace) -> int:
    module = module_arg(args.module, args.key)
    engine_ok, engine_so = _backends.engine_status()
    provider_ok, provider_so = _backends.provider_status()
    backend = args.backend
    if backend is None:
        backend = "both" if engine_ok and provider_ok else "engine" if engine_ok else "provider"
    if backend in ("engine", "both") and not engine_ok:
        raise ConfigError(f"cannot write the engine section: {engine_so}")
    if backend in ("provider", "both") and not provider_ok:
        raise ConfigError(f"cannot write the provider section: {provider_so}")
    text = openssl_cnf(
        module,
        backend,
        engine_so=engine_so if engine_ok else None,
        provider_so=provider_so if provider_ok else None,
        pin_source=args.pin_source,
    )
    write_output(args.output, text.encode(), 0o644)
    if args.output not in (None, "-"):
        print(f"wrote {args.output} ({backend}) for {module}; use it with OPENSSL_CONF={args.output}", file=sys.stderr)
    return 0


def cmd_uri_pem(args: argparse.Namespace) -> int:
    data = uri_pem(args.uri)
    uri = read_uri_pem(data)  # as written: type=private may have been added
    write_output(args.output, data, 0o600)
    if args.output not in (None, "-"):
        print(
            f"wrote {args.output} for {uri}; with pkcs11-provider loaded (OPENSSL_CONF from "
            "'python -m mtls_engine config') use it wherever a PEM private key file goes",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtls_engine", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _check.register(sub)
    _listing.register(sub)
    _connect.register(sub)
    _serve.register(sub)

    p = sub.add_parser("config", help="write an openssl.cnf that makes stock clients use a card key")
    p.add_argument(
        "--module",
        help=f"the card's PKCS#11 module (default: ${MODULE_ENV}, else the module registered with p11-kit "
        "that holds the token --key names)",
    )
    p.add_argument(
        "--key",
        metavar="URI",
        help="without --module: the key (or token) whose registered module to write (default: the only token)",
    )
    p.add_argument(
        "--backend",
        choices=("engine", "provider", "both"),
        help="which sections to write (default: both where both are installed)",
    )
    p.add_argument(
        "--pin-source",
        metavar="file:PATH",
        help="a file holding the PIN, for pkcs11-provider (the PIN itself is never written)",
    )
    p.add_argument("-o", "--output", help="the file to write (default: standard output)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("uri-pem", help="write a PKCS#11 PROVIDER URI PEM key file for a pkcs11: URI")
    p.add_argument("uri", help="the key's pkcs11: URI, e.g. 'pkcs11:token=card1;object=clientkey;type=private'")
    p.add_argument("-o", "--output", help="the file to write (default: standard output)")
    p.set_defaults(func=cmd_uri_pem)
    return parser


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


def _log_to_stderr() -> None:
    """mtls_engine's log records (warnings such as a TLS 1.2 cap) on stderr,
    in the CLI's own format; once per process."""
    log = logging.getLogger("mtls_engine")
    if not any(getattr(h, "_mtls_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LowerLevelFormatter("mtls_engine: %(level)s: %(message)s"))
        handler._mtls_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.WARNING)


def refuse_pins_in_arguments(args: argparse.Namespace) -> None:
    """Raise PinOnCommandLine when a pkcs11: URI argument carries pin-value:
    a process's arguments are readable by every user (ps, /proc)."""
    for dest, value in sorted(vars(args).items()):
        if isinstance(value, str) and has_pin_value_attribute(value):
            option = "the URI argument" if dest == "uri" else f"--{dest.replace('_', '-')}"
            raise PinOnCommandLine(
                f"{option} carries a pin-value, and a PIN on the command line can be read by every user of "
                "this machine (ps, /proc); nothing was done. Remove pin-value and give the PIN with "
                "--pin-source env:VAR|file:PATH (or let the command ask on the terminal)"
            )


# Exit status when the reader of standard output went away (``check --json
# | head -1``): what a shell reports for a command killed by SIGPIPE.
BROKEN_PIPE_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.  A reader that goes away before the
    output is written ends the command quietly (no traceback)."""
    try:
        status = _main(argv)
        # Flushed here, not at exit: CPython 3.14's larger buffer (128 KiB)
        # holds a whole `check --json` until the interpreter's own flush,
        # which would report the closed pipe as "Exception ignored".
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's own
    flush at exit does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: Sequence[str] | None) -> int:
    quiet_foreign_logs()
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        refuse_pins_in_arguments(args)
    except PinOnCommandLine as exc:
        print(f"mtls_engine: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # A PinWarning (a forced final try) is said once, in the CLI's format.
        warnings.simplefilter("always", PinWarning)
        previous, warnings.showwarning = warnings.showwarning, _show_warning
        try:
            status: int = args.func(args)
        except Error as exc:
            print(f"mtls_engine: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            warnings.showwarning = previous
    return status


# Log settings of libraries a PKCS#11 module may bring along, which write to
# the process's stderr on their own: the TPM2 software stack prints every
# TPM error, even a wrong PIN, as "WARNING:esys:..." / "ERROR:esys:..."
# lines.  The commands say what failed in their own words; a user who wants
# those lines sets TSS2_LOG (e.g. all+warning).  (tpm2-pkcs11 1.9 prints its
# own errors, e.g. "ERROR: Error unsealing wrapping key", whatever its
# TPM2_PKCS11_LOG_LEVEL says: those still reach stderr, never stdout.)
FOREIGN_LOG_SETTINGS = {"TSS2_LOG": "all+none"}


def quiet_foreign_logs() -> None:
    """Set FOREIGN_LOG_SETTINGS that the user did not set (before any module
    loads: the libraries read them once)."""
    for name, value in FOREIGN_LOG_SETTINGS.items():
        os.environ.setdefault(name, value)


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"mtls_engine: warning: {message}", file=sys.stderr)
