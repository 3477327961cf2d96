"""``check`` with the module found through p11-kit's registry against
``check --module``: wall time of the whole command, median of N runs.

Usage: python benchmarks/discovery.py [--runs N] [--machine-registry]

By default the registry is a test one (SoftHSM2 alone, or with the extra
modules this machine has: p11-kit-trust, tpm2-pkcs11 failing with no TPM,
OpenSC); --machine-registry uses the machine's own registry instead (the
SoftHSM2 token lives in a temporary folder either way)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtls_engine import _softhsm, testing  # noqa: E402
from mtls_engine._softhsm import KeyKind  # noqa: E402
from tests.registry import Registry  # noqa: E402


def timed(cmds: list[list[str]], env: dict[str, str], runs: int) -> list[float]:
    """Median wall time of each command; runs interleaved, so a change of
    the machine's load hits them alike."""
    times: list[list[float]] = [[] for _ in cmds]
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            times[i].append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(f"{cmd}: {proc.stdout}{proc.stderr}")
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--machine-registry", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, testing.TokenFolder.create(Path(tmp) / "t", activate=False) as folder:
        card = folder.add_card("bench", [KeyKind.P256])
        check = [sys.executable, "-m", "mtls_engine", "check", "--key", card.key_uri(), "--pin-source",
                 card.pin_source]  # fmt: skip
        setups: list[tuple[str, dict[str, str]]] = []
        if args.machine_registry:
            env = {k: v for k, v in os.environ.items() if k != "MTLS_ENGINE_MODULE"}
            env.update(folder.env, PYTHONPATH=str(ROOT))
            setups.append(("machine registry", env))
        else:
            one = Registry(Path(tmp) / "one")
            one.register("softhsm2", folder.module)
            setups.append(("registry: SoftHSM2 only", one.env(folder.env)))
            more = Registry(Path(tmp) / "more")
            more.register("softhsm2", folder.module)
            for name in ("p11-kit-trust.so", "libtpm2_pkcs11.so", "opensc-pkcs11.so"):
                path = next((c for c in _softhsm.library_candidates(f"pkcs11/{name}") if os.path.exists(c)), None)
                if path:
                    more.register(name.split(".")[0], path)
            others = ", ".join(p.stem for p in sorted(more.modules.iterdir()) if p.stem != "softhsm2")
            setups.append((f"registry: SoftHSM2 + {others}", more.env(folder.env)))
        for label, env in setups:
            base, found = timed([[*check, "--module", folder.module], check], env, args.runs)
            print(f"{label}: check --module {base * 1000:.0f} ms, check (discovery) {found * 1000:.0f} ms, "
                  f"x{found / base:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
