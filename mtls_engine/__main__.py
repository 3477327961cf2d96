"""``python -m mtls_engine`` and the ``mtls-engine`` command: the command
line (mtls_engine._cli)."""

import sys


def run() -> int:
    from . import _import_refusal

    if _import_refusal is not None:
        # This interpreter's ssl cannot be used (refused at import): one line
        # saying why and what to do, not a traceback.
        print(f"mtls_engine: error: {_import_refusal}", file=sys.stderr)
        return 1
    from ._cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
