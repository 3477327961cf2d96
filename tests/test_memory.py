"""Memory errors that only a memory checker sees: run under valgrind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtls_engine._p11 import Module

from .conftest import Pki, need
from .p11kit import P11KitServer, client_module, server_missing

MECHANISMS = """
import sys
from mtls_engine._p11 import Module
m = Module.load(sys.argv[1])
print(len(m.mechanisms(m.slots()[0][0])))
"""


@pytest.mark.slow
def test_mechanism_list_through_p11kit_client_stays_in_its_buffer(pki: Pki, tmp_path: Path) -> None:
    """p11-kit-client 0.24 drops the mechanisms its protocol cannot carry
    and, doing so, reads one element past the array it fills (fixed
    upstream): mtls_engine's array has room for it.  valgrind watches every
    read (PYTHONMALLOC=malloc: each cffi array is a malloc block of its own)."""
    need(shutil.which("valgrind") is not None, "valgrind checks the reads (Debian: apt-get install valgrind)")
    missing = server_missing()
    need(missing is None, f"p11-kit server: {missing}")
    module = client_module()
    assert module is not None
    softhsm = Module.load(pki.module)
    direct = len(softhsm.mechanisms(softhsm.slots()[0][0]))  # SoftHSM2 lists the same in every slot
    server = P11KitServer(tmp_path / "p11-kit.sock", pki.module, pki.card2.uri(), pki.store.env)
    with server:
        proc = subprocess.run(
            ["valgrind", "-q", "--undef-value-errors=no", "--error-exitcode=99", sys.executable, "-c", MECHANISMS,
             module],
            env={**os.environ, "P11_KIT_SERVER_ADDRESS": server.address, "PYTHONMALLOC": "malloc"},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Not vacuous: p11-kit-client did drop mechanisms (its purge ran).
    assert 0 < int(proc.stdout.strip()) < direct
