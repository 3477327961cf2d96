"""Long runs: memory, descriptors and PKCS#11 sessions stay flat
(benchmarks/soak.py, a shortened run), and the bound they are held to is one
a real leak breaks (the script's --leak control keeps one EVP_PKEY per
handshake).  The full run (20,000 handshakes per backend) is on demand:
``python benchmarks/soak.py``; its figures are in docs/reliability.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mtls_engine._backends import STATUS

from .conftest import available_backends, need, need_backend
from .helpers import ROOT

# Bytes of resident memory per handshake (and per context made, used and
# dropped) that a run may grow by, as a least-squares slope over its
# samples.  Measured clean over 20,000 handshakes and 2,000 contexts
# (engine / provider): 0.3 / 1.6 B per handshake, 0 / 3 B per context; a
# leaked P-256 EVP_PKEY costs about 2,200 B per handshake.
HANDSHAKE_BOUND = 256
CONTEXT_BOUND = 512


def _soak(tmp_path: Path, *args: str) -> Any:
    need(shutil.which("openssl") is not None, "the soak's server is openssl s_server")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--json", "--output", str(tmp_path),
                           *args], capture_output=True, text=True, timeout=600, cwd=str(ROOT))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _flat(phase: dict[str, Any], bound: int) -> None:
    assert phase["rss_slope"] < bound, phase
    assert phase["fds_drift"] == 0 and phase["fds_max_drift"] <= 1, phase
    assert phase["sessions_first"] >= 1, phase  # the session count was measured
    assert phase["sessions_first"] == phase["sessions_max"] == phase["sessions_last"], phase


def test_handshakes_and_recreated_contexts_do_not_leak(tmp_path: Path) -> None:
    report = _soak(tmp_path, "--handshakes", "1000", "--warmup", "300", "--every", "100", "--recreate", "200")
    ran = {r["backend"] for r in report["results"]}
    for backend in available_backends():
        need(backend in ran, STATUS[backend]()[1])
    for result in report["results"]:
        assert result["handshakes"]["count"] == 1000 and result["recreate"]["count"] == 200
        _flat(result["handshakes"], HANDSHAKE_BOUND)
        _flat(result["recreate"], CONTEXT_BOUND)
    assert json.loads((tmp_path / "soak.json").read_text())["results"] == report["results"]


@pytest.mark.parametrize("backend", ["engine"])
def test_the_bound_catches_one_leaked_evp_pkey_per_handshake(tmp_path: Path, backend: str) -> None:
    need_backend(backend)
    report = _soak(tmp_path, "--leak", "--backend", backend, "--handshakes", "600", "--warmup", "200",
                   "--every", "100", "--recreate", "0")  # fmt: skip
    (result,) = report["results"]
    phase = result["handshakes"]
    assert phase["rss_slope"] > 4 * HANDSHAKE_BOUND, phase
    with pytest.raises(AssertionError):
        _flat(phase, HANDSHAKE_BOUND)
