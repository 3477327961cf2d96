"""`python -m mtls_engine check`."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the subcommand to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser("check", help="(not yet built)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
