"""Soak: tens of thousands of card-key handshakes in one process, and card
contexts dropped and recreated in a loop; resident memory, open file
descriptors and open PKCS#11 sessions must stay flat.

A fresh SoftHSM2 token in a temporary folder holds a P-256 (or RSA-2048)
client key.  The server is ``openssl s_server`` in its own process (its
memory is not measured), requiring a client certificate.  For each backend
(libp11's engine, pkcs11-provider) a fresh interpreter runs:

1. ``--handshakes`` full handshakes (no resumption) with one card context,
   after ``--warmup`` handshakes; every ``--every`` handshakes it samples RSS
   (after ``gc.collect()`` and ``malloc_trim``), open descriptors and the
   PKCS#11 sessions open (C_OpenSession minus C_CloseSession, counted by the
   pass-through module tests/p11shim, which the run loads in front of
   SoftHSM2; SoftHSM2 itself does not report its session count);
2. ``--recreate`` rounds of: a new ``client_context`` for the same card key,
   one handshake, the context dropped; sampled the same way.

The drift reported is the least-squares slope over the samples after the
warm-up and one settling interval (bytes per handshake, per context) and
the change from first to last of those samples.  ``--leak`` is the control: it keeps one extra ``EVP_PKEY``
(the card certificate's public key, parsed again) per handshake, the leak a
forgotten ``EVP_PKEY_free`` would be; the test (tests/test_soak.py) checks
that its slope breaks the bound a clean run stays under.

    python benchmarks/soak.py [--handshakes 20000] [--recreate 2000] [--backend engine|provider|both]
                              [--key p256|rsa2048] [--leak] [--output DIR] [--json]

Writes DIR/soak.json (DIR: benchmarks/results) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKENDS = ("engine", "provider")
PIN = "52815934"  # the throwaway token's, made and deleted by this run


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


class SessionCounter:
    """PKCS#11 sessions open, from the shim's call log (read incrementally);
    -1 without a log."""

    def __init__(self, log: str | None) -> None:
        self._log = log
        self._offset = 0
        self._open = 0

    def count(self) -> int:
        if not self._log:
            return -1
        with open(self._log, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            name, _, rest = line.partition(b" ")
            if not rest.startswith(b"rv=0x00000000"):
                continue
            if name == b"C_OpenSession":
                self._open += 1
            elif name == b"C_CloseSession":
                self._open -= 1
        return self._open


# -- the measured child ----------------------------------------------------------

CHILD = """
import ctypes, gc, json, os, socket
import mtls_engine
from mtls_engine._lib import ffi, lib
from benchmarks.soak import SessionCounter, open_fds, rss_bytes

cfg = json.loads(os.environ["SOAK_CONFIG"])
libc = ctypes.CDLL(None)
trim = getattr(libc, "malloc_trim", None)


def make():
    return mtls_engine.client_context(key=cfg["uri"], cafile=cfg["ca"], module=cfg["module"],
                                      pin=mtls_engine.pin_source("env:SOAK_PIN"), backend=cfg["backend"])


def handshake(ctx):
    with socket.create_connection(("127.0.0.1", cfg["port"]), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            pass


ctx = make()
sessions = SessionCounter(cfg["shim_log"])
spki = bytes.fromhex(cfg["spki"])
leaked = []


def sample(n):
    gc.collect()
    if trim is not None:
        trim(0)
    return {"n": n, "rss": rss_bytes(), "fds": open_fds(), "sessions": sessions.count()}


def leak_one():
    buf = ffi.new("unsigned char[]", spki)
    p = ffi.new("const unsigned char **", buf)
    pkey = lib.d2i_PUBKEY(ffi.NULL, p, len(spki))
    assert pkey != ffi.NULL
    leaked.append(pkey)  # never freed: the control's leak


out = {"backend": cfg["backend"], "handshakes": [], "recreate": []}
for i in range(cfg["warmup"]):
    handshake(ctx)
out["handshakes"].append(sample(0))
for i in range(1, cfg["handshakes"] + 1):
    handshake(ctx)
    if cfg["leak"]:
        leak_one()
    if i % cfg["every"] == 0:
        out["handshakes"].append(sample(i))
del ctx
for i in range(min(cfg["recreate"], cfg["warmup"])):
    c = make()
    handshake(c)
    del c
out["recreate"].append(sample(0))
every = max(1, cfg["every"] // 10)
for i in range(1, cfg["recreate"] + 1):
    c = make()
    handshake(c)
    del c
    if i % every == 0:
        out["recreate"].append(sample(i))
print(json.dumps(out))
"""


def _summary(samples: list[dict[str, int]]) -> dict[str, Any]:
    """Drift over the samples after the first interval: the first interval
    after a warm-up still steps up once (measured: +0.5 MiB in the first 100
    recreated contexts, then nothing over the next 1,900), the allocator
    settling after the first gc.collect + malloc_trim; a leak grows in
    every interval."""
    if not samples:
        return {}
    if len(samples) >= 3:
        samples = samples[1:]
    xs = [float(s["n"]) for s in samples]
    return {
        "count": samples[-1]["n"],
        "from": samples[0]["n"],
        "rss_first": samples[0]["rss"],
        "rss_last": samples[-1]["rss"],
        "rss_drift": samples[-1]["rss"] - samples[0]["rss"],
        "rss_slope": slope(xs, [float(s["rss"]) for s in samples]),
        "fds_drift": samples[-1]["fds"] - samples[0]["fds"],
        "fds_max_drift": max(s["fds"] for s in samples) - samples[0]["fds"],
        "sessions_first": samples[0]["sessions"],
        "sessions_max": max(s["sessions"] for s in samples),
        "sessions_last": samples[-1]["sessions"],
    }


class Setup:
    """The throwaway token, PKI and s_server for one run."""

    def __init__(self, work: Path, key: str, use_shim: bool) -> None:
        from cryptography.hazmat.primitives import serialization

        from mtls_engine._softhsm import CA, KeyKind, TokenStore, missing_tools, softhsm_module

        missing = missing_tools() + ([] if shutil.which("openssl") else ["openssl"])
        if missing:
            raise SystemExit(f"soak: missing tools: {', '.join(missing)}")
        self.work = work
        store = TokenStore.create(work / "softhsm")
        self.env = store.env
        os.environ["SOFTHSM2_CONF"] = str(store.conf)  # never the machine's own token store
        ca = CA.create("soak CA")
        self.ca_file = work / "ca.pem"
        self.ca_file.write_bytes(ca.pem)
        self.server_cert, self.server_key = ca.issue_server_files(work, "localhost")
        token = store.init_token("soak", pin=PIN)
        kind = {"p256": KeyKind.P256, "rsa2048": KeyKind.RSA2048}[key]
        pub = token.generate_key(kind, key, "01")
        cert = ca.issue(pub, f"soak {key}")
        token.store_certificate(cert, key, "01", work)
        self.spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.uri = token.uri(object=key, type="private")
        module = softhsm_module()
        assert module is not None
        self.module = module
        self.shim_log: str | None = None
        if use_shim:
            from tests import p11shim

            try:
                self.module = str(p11shim.build(work / "shim"))
            except (p11shim.ShimUnavailable, RuntimeError) as exc:
                print(f"soak: no session count ({exc})", file=sys.stderr)
            else:
                self.env.update(p11shim.shim_env(module, work / "shim"))
                self.shim_log = self.env["MTLS_SHIM_LOG"]
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start_server(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-cert", str(self.server_cert),
             "-key", str(self.server_key), "-Verify", "1", "-CAfile", str(self.ca_file), "-quiet",
             "-no_ticket", "-no_cache"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("soak: openssl s_server did not start")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(10)

    def run(self, backend: str, args: argparse.Namespace) -> dict[str, Any]:
        cfg = {"uri": self.uri, "ca": str(self.ca_file), "module": self.module, "backend": backend,
               "port": self.port, "spki": self.spki.hex(), "warmup": args.warmup,
               "handshakes": args.handshakes, "every": args.every, "recreate": args.recreate,
               "leak": args.leak, "shim_log": self.shim_log}  # fmt: skip
        env = {**os.environ, **self.env, "SOAK_CONFIG": json.dumps(cfg), "SOAK_PIN": PIN,
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        started = time.monotonic()
        if self.shim_log:
            Path(self.shim_log).unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD)], capture_output=True, text=True,
                              env=env, cwd=str(ROOT), timeout=args.timeout)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"soak ({backend}) failed with status {proc.returncode}:\n{proc.stderr[-3000:]}")
        raw = json.loads(proc.stdout.splitlines()[-1])
        return {"backend": backend, "seconds": round(time.monotonic() - started, 1),
                "handshakes": _summary(raw["handshakes"]), "recreate": _summary(raw["recreate"]),
                "samples": raw}  # fmt: skip


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | phase | count | RSS first → last (MiB) | drift (KiB) | slope (B/each) | fds drift "
        "| sessions (first/max/last) |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        for phase in ("handshakes", "recreate"):
            s = r[phase]
            if not s:
                continue
            rss = f"{s['rss_first'] / 2**20:.1f} → {s['rss_last'] / 2**20:.1f}"
            lines.append(
                f"| {r['backend']} | {phase} | {s['count']} | {rss} "
                f"| {s['rss_drift'] / 1024:.0f} | {s['rss_slope']:.1f} | {s['fds_drift']} "
                f"| {s['sessions_first']}/{s['sessions_max']}/{s['sessions_last']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--every", type=int, default=1000, help="sample every N handshakes")
    parser.add_argument("--recreate", type=int, default=2000, help="contexts made, used once and dropped")
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument("--key", choices=("p256", "rsa2048"), default="p256")
    parser.add_argument("--leak", action="store_true", help="control: leak one EVP_PKEY per handshake")
    parser.add_argument("--no-shim", action="store_true", help="SoftHSM2 directly (no session count)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--json", action="store_true", help="print the results as JSON, not a table")
    args = parser.parse_args(argv)
    if min(args.handshakes, args.every, args.warmup) < 1 or args.recreate < 0:
        parser.error("--handshakes, --every and --warmup must be positive, --recreate not negative")

    from mtls_engine._backends import STATUS

    backends = BACKENDS if args.backend == "both" else (args.backend,)
    results = []
    with tempfile.TemporaryDirectory(prefix="mtls-soak-") as tmp:
        setup = Setup(Path(tmp), args.key, not args.no_shim)
        setup.start_server()
        try:
            for backend in backends:
                ok, why = STATUS[backend]()
                if not ok:
                    print(f"soak: {backend} skipped: {why}", file=sys.stderr)
                    continue
                results.append(setup.run(backend, args))
        finally:
            setup.stop_server()
    report = {"key": args.key, "leak": args.leak, "warmup": args.warmup, "results": results}
    args.output.mkdir(parents=True, exist_ok=True)
    name = "soak-leak.json" if args.leak else "soak.json"
    (args.output / name).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(results))
        print(f"(written to {args.output / name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
