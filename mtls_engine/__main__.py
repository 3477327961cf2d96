"""``python -m mtls_engine``: the command line (mtls_engine._cli)."""

import sys

from . import _import_refusal

if _import_refusal is not None:
    # This interpreter's ssl cannot be used (refused at import): one line
    # saying why and what to do, not a traceback.
    print(f"mtls_engine: error: {_import_refusal}", file=sys.stderr)
    sys.exit(1)

from ._cli import main

sys.exit(main())
