"""The README's first command: the demo makes its own SoftHSM2 token and
completes a real handshake with it through every installed backend."""

from __future__ import annotations

from pathlib import Path

from mtls_engine import _softhsm
from mtls_engine._backends import BACKENDS

from .conftest import BACKEND_STATUS, need
from .helpers import run_python


def test_demo_handshakes_through_each_backend(tmp_path: Path) -> None:
    missing = _softhsm.missing_tools()
    need(not missing, f"the demo needs: {', '.join(missing)}")
    code = f"import sys; from mtls_engine._demo import main; sys.exit(main(['--dir', {str(tmp_path / 'demo')!r}]))"
    proc = run_python(code, {"PYTHONIOENCODING": "utf-8"})  # the demo uses a token store of its own
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "making a SoftHSM2 demo token" in out
    for backend in BACKENDS:
        ok, why = BACKEND_STATUS[backend]()
        if ok:
            assert f"[{backend}] handshake completed (TLSv1.3); the card signed it inside OpenSSL" in out
            assert f"[{backend}] server replied: hello, commonName=Demo Card-Holder" in out
        else:
            assert f"[{backend}] skipped: {why}" in out
    assert (tmp_path / "demo" / "softhsm" / "softhsm2.conf").exists()
    # then the diagnostic, on the demo token, passes every step it runs
    assert "$ python -m mtls_engine check --module " in out
    assert "✓ test signature" in out and "✓ login" in out
    assert out.rstrip().endswith("all checks passed")
    assert _softhsm.DEMO_PIN not in out.replace("0x00000000", "")
