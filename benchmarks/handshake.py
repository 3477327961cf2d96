"""How close a card-key handshake comes to the limit, side by side.

Full TLS handshakes (no resumption, no tickets) from a Python ``ssl`` client
to a server in other processes, one client process per key source: a file
key (plain ``ssl``), and a SoftHSM2 card key through libp11's engine and
through pkcs11-provider (``mtls_engine.client_context``), for RSA-2048 and
P-256, TLS 1.2 and 1.3, with 1, 2 and 4 concurrent clients (threads); with
one client also the file key in diagnostic processes (mtls_engine imported;
each backend loaded), to show where a card key's extra CPU goes.  Measured in
the same run, interleaved in batches and rounds, against:

- the token's raw signing rate (``signrate.c``: C_SignInit + C_Sign through
  the same module, same key, one session per thread) and the same signature
  made in software with a file key; inside the handshakes, ``p11time.c`` (a
  pass-through module) clocks the CPU the token's signing calls take: the
  token's own extra cost is that minus the software signature;
- ``openssl s_time -new`` with the same card key through pkcs11-provider
  (``python -m mtls_engine config`` and ``uri-pem``), against the same server.

Plus: PKCS#11 calls per handshake in steady state (pkcs11-spy; the run fails
if a handshake makes anything but one signature, or any object search,
login or session open), cold start (``import mtls_engine`` to the first
completed handshake, in fresh processes) and a slow card (tests/p11shim at
70 and 140 ms per signature): efficiency = handshake rate / card signing rate.

Set-up (2 CPUs or more): the servers alone on the last CPU, every client
(Python, s_time, signrate) on the first, this script on the servers' CPU.
The server is ``gnutls-serv``, one process per concurrent client (it does one
handshake at a time); it requires a client certificate and checks its
CertificateVerify signature in every handshake, but does not validate the
chain: OpenSSL 3.0's ``s_server -Verify`` costs as much per handshake as the
client and would be the limit (``--server openssl`` uses it anyway).  See
docs/benchmarks.md for the results and what they mean.

    python benchmarks/handshake.py [--quick] [--rounds N] [--server gnutls|openssl]
                                   [--output DIR] [--markdown FILE]
    python benchmarks/handshake.py --ratios [--callgrind] [--cycles N] [--quick] ...

``--ratios`` is the side-by-side run: one P-256 TLS 1.3 client process per
variant -- the file key (a process without mtls_engine), a bare ctypes
prototype (libp11's engine, the key set on the SSL_CTX, nothing else), the
engine and provider backends, and the file key in the provider's process --
doing 10-handshake batches in a new random order every cycle; per cycle the
file key's time over each variant's (wall and CPU), medians over the cycles
with bootstrap intervals; with ``--callgrind`` instructions per handshake;
then cold starts from interpreter start to the first handshake and the
imports of a card key's cold start.  Writes DIR/ratios.json and its block of
docs/benchmarks.md (about 1 minute, 4 more with --callgrind).

Writes DIR/handshake.json and DIR/handshake.png (matplotlib, optional) --
``handshake-quick.*`` with ``--quick`` -- (DIR: benchmarks/results) and the
Markdown tables into docs/benchmarks.md (with --quick: DIR/handshake-quick.md),
between its generated markers (notes below them are kept).  Exit status 1 when
the PKCS#11 call check fails or a measurement breaks.  Needs SoftHSM2, p11tool,
pkcs11-tool, gnutls-serv, openssl, a C compiler with libssl-dev and p11-kit's
header, and (for the call check) OpenSC's pkcs11-spy.  Run on demand, about 5
minutes; the test suite runs only ``--quick`` (tests/test_benchmarks_smoke.py).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import itertools
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

KEYS = ("p256", "rsa2048")
KEY_NAMES = {"p256": "P-256", "rsa2048": "RSA-2048"}
KEY_IDS = {"rsa2048": "01", "p256": "02"}
SIGN_ALG = {"p256": "ecdsa", "rsa2048": "rsa-pss"}
TLS_VERSIONS = ("1.2", "1.3")
CLIENTS = (1, 2, 4)
BACKENDS = ("engine", "provider")
SIGN_THREADS = (1, 2, 4)
DELAYS_MS = (70, 140)
TOKEN = "bench"

# Targets of issue 8.
RATE_TARGET = {"p256": 0.95, "rsa2048": 0.90}
CPU_TARGET = 0.05  # P-256: card CPU within 5 % of the file key's, beyond the token's own extra
ETA_TARGET = 0.95
COLD_TARGET_MS = 100.0
S_TIME_TARGET = 0.90
# The steady-state PKCS#11 check: per handshake exactly one signature, none of the others.
ONE_PER_HANDSHAKE = ("C_SignInit", "C_Sign+C_SignFinal")
NONE_PER_HANDSHAKE = ("C_FindObjectsInit", "C_Login", "C_OpenSession", "C_Initialize")

BEGIN = "<!-- BEGIN GENERATED by benchmarks/handshake.py: regenerate, do not edit by hand -->"
END = "<!-- END GENERATED -->"


class BenchError(RuntimeError):
    """A measurement that could not be made (a tool failed, a handshake broke)."""


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run or --quick (a few seconds, for CI)."""

    quick: bool
    rounds: int
    handshakes: dict[str, int]  # per cell, by key
    warmup: int
    sign_seconds: float
    s_time_cells: tuple[tuple[str, str], ...]  # (key, TLS version)
    s_time_sources: tuple[str, ...]
    cold_repeats: int
    cold_keys: tuple[str, ...]
    call_handshakes: int
    delays: tuple[int, ...]
    slow_keys: tuple[str, ...]
    slow_handshakes: dict[int, int]  # by concurrency
    diagnostics: bool  # the file@... sources (see sources_of)
    batches: int  # each cell's handshakes, in this many interleaved batches per source
    sign_alternations: int  # software / token signing runs, alternated
    s_time_python: int  # Python handshakes just before and just after each s_time run

    @classmethod
    def make(cls, quick: bool, rounds: int | None) -> Plan:
        if quick:
            return cls(
                quick=True,
                rounds=rounds or 1,
                handshakes={"p256": 16, "rsa2048": 10},
                warmup=3,
                sign_seconds=0.2,
                s_time_cells=(("p256", "1.3"),),
                s_time_sources=("card",),
                cold_repeats=1,
                cold_keys=("p256",),
                call_handshakes=10,
                delays=(70,),
                slow_keys=("p256",),
                slow_handshakes={1: 3, 4: 8},
                diagnostics=False,
                batches=2,
                sign_alternations=1,
                s_time_python=10,
            )
        return cls(
            quick=False,
            rounds=rounds or 5,
            handshakes={"p256": 200, "rsa2048": 120},
            warmup=20,
            sign_seconds=0.5,
            s_time_cells=tuple((k, v) for k in KEYS for v in TLS_VERSIONS),
            s_time_sources=("file", "card"),
            cold_repeats=5,
            cold_keys=KEYS,
            call_handshakes=20,
            delays=DELAYS_MS,
            slow_keys=KEYS,
            slow_handshakes={1: 15, 4: 32},
            diagnostics=True,
            batches=8,
            sign_alternations=4,
            s_time_python=60,
        )


# ---- small helpers ---------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def rotate(items: Sequence[Any], by: int) -> list[Any]:
    """``items`` started at position ``by``: each round puts another variant first."""
    if not items:
        return []
    by %= len(items)
    return [*items[by:], *items[:by]]


def proc_cpu(pid: int) -> float:
    """CPU seconds of a running single-threaded process: /proc/PID/schedstat
    (nanoseconds) where the kernel has it, else user + system time in clock
    ticks from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinner(cpus: set[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---- the client side, in a worker process (one per key source) -------------------------------


def _handshake(ctx: ssl.SSLContext, port: int) -> float:
    """One full handshake on a new connection, then close (as s_time -new does);
    returns its wall time (connect to handshake done)."""
    start = time.perf_counter()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Blocking, as s_time is; the kernel timeouts turn a stuck server into an error.
        timeout = struct.pack("ll", 10, 0)  # struct timeval: 10 s
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        sock.connect(("127.0.0.1", port))
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        tls.close()
    finally:
        sock.close()
    return time.perf_counter() - start


class TokenClock:
    """p11time's running totals in this process (see p11time.c): CPU
    nanoseconds inside the token's signing calls, and inside the other calls
    a backend makes around a signature, with their numbers of calls."""

    def __init__(self, path: str) -> None:
        import ctypes

        self._ll, self._l = ctypes.c_longlong, ctypes.c_long
        self._byref = ctypes.byref
        self._read = ctypes.CDLL(path).p11time_read

    def read(self) -> tuple[int, int, int, int]:
        values = self._ll(), self._l(), self._ll(), self._l()
        self._read(*map(self._byref, values))
        return tuple(int(v.value) for v in values)  # type: ignore[return-value]


def _drive(
    ctx: ssl.SSLContext, ports: list[int], clients: int, n: int, clock: TokenClock | None = None
) -> dict[str, Any]:
    """``n`` handshakes by ``clients`` threads (thread i to ``ports[i]``);
    rate, process CPU, latencies and (with ``clock``) the CPU spent inside
    the token."""
    counter = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def loop(mine: list[float], port: int) -> None:
        try:
            while next(counter) < n:
                mine.append(_handshake(ctx, port))
        except Exception as exc:  # reported to the orchestrator
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(lat, ports[i % len(ports)])) for i, lat in enumerate(latencies)]
    token0 = clock.read() if clock else (0, 0, 0, 0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    token = [b - a for a, b in zip(token0, clock.read() if clock else (0, 0, 0, 0))]
    if errors:
        raise BenchError(f"{len(errors)} handshake(s) failed, first: {errors[0]}")
    lat = [x for part in latencies for x in part]
    return {
        "n": len(lat),
        "wall": wall,
        "cpu": cpu,
        "rate": len(lat) / wall,
        "cpu_ms": cpu / len(lat) * 1000,
        "latencies_us": [round(x * 1e6) for x in lat],
        "token_ns": token[0],
        "token_calls": token[1],
        "other_p11_ns": token[2],
        "other_p11_calls": token[3],
    }


def _set_version(ctx: ssl.SSLContext, tls: str) -> None:
    version = ssl.TLSVersion.TLSv1_3 if tls == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = version


def worker_main(source: str) -> None:
    """Answer the orchestrator's JSON commands, one per line on stdin.
    ``source``: file (plain ssl, mtls_engine never imported), import
    (mtls_engine imported, file keys), engine or provider (card keys through
    that backend; file keys too, if given)."""
    contexts: dict[str, ssl.SSLContext] = {}
    clock = TokenClock(os.environ["P11TIME_LIB"]) if os.environ.get("P11TIME_LIB") else None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply: dict[str, Any] = {"ok": True}
            if cmd["cmd"] == "open":
                if source == "import":
                    import mtls_engine  # imported, nothing loaded: file@import
                for name, spec in cmd["keys"].items():
                    if "uri" not in spec:
                        ctx = ssl.create_default_context(cafile=cmd["ca"])
                        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                        ctx.load_cert_chain(spec["cert"], spec["key"])
                    elif source == "prototype":
                        ctx = prototype_context(spec["uri"], spec["cert"], cmd["ca"])
                    else:
                        import mtls_engine

                        ctx = mtls_engine.client_context(
                            key=spec["uri"],
                            cafile=cmd["ca"],
                            module=spec["module"],
                            pin=os.environ["MTLS_BENCH_PIN"],
                            backend=source,
                        )
                    contexts[name] = ctx
            elif cmd["cmd"] == "check":
                ctx = contexts[cmd["key"]]
                _set_version(ctx, cmd["tls"])
                with ctx.wrap_socket(
                    socket.create_connection(("127.0.0.1", cmd["ports"][0]), timeout=10), server_hostname="localhost"
                ) as tls:
                    tls.sendall(b"ping\n")
                    answer = tls.recv(64)  # the server's echo: it accepted the client's certificate
                    reply.update(
                        version=tls.version(),
                        cipher=(tls.cipher() or ("",))[0],
                        reused=tls.session_reused,
                        answered=bool(answer),
                    )
            elif cmd["cmd"] == "run":
                ctx = contexts[cmd["key"]]
                _set_version(ctx, cmd["tls"])
                if cmd["warmup"]:
                    _drive(ctx, cmd["ports"], cmd["clients"], cmd["warmup"])
                if cmd["n"]:
                    reply.update(_drive(ctx, cmd["ports"], cmd["clients"], cmd["n"], clock))
            elif cmd["cmd"] == "quit":
                print(json.dumps(reply), flush=True)
                return
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


class Worker:
    """A client process (``--worker SOURCE``) driven over its stdin/stdout."""

    def __init__(
        self,
        source: str,
        env: dict[str, str],
        cpus: set[int] | None,
        work: Path,
        tag: str = "",
        prefix: Sequence[str] = (),
    ) -> None:
        self.source = source
        self.errfile = work / f"worker-{source}{tag}.err"
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, str(Path(__file__).resolve()), "--worker", source],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
                cwd=ROOT,
                preexec_fn=pinner(cpus),
            )

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the {self.source} client process died:\n{tail(self.errfile)}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BenchError(f"{self.source} client, {cmd.get('cmd')} {cmd.get('key', '')}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
            except (BenchError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- set-up: a throwaway token, PKI, server -------------------------------------------------


@dataclass
class Setup:
    work: Path
    pin: str
    module: str  # SoftHSM2
    conf: Path  # SOFTHSM2_CONF
    ca: Path
    server_cert: Path
    server_key: Path
    files: dict[str, tuple[Path, Path]]  # key -> (certificate, key) of the file keys
    card_certs: dict[str, Path]
    uris: dict[str, str]
    backends: tuple[str, ...]  # card backends available here
    skipped: dict[str, str]  # what cannot be measured here, and why
    signrate: Path
    p11time: Path  # the timing pass-through module (p11time.c)
    uri_pems: dict[str, Path] = field(default_factory=dict)
    cnf: Path | None = None
    spy: str | None = None
    shim: Path | None = None
    cpus: dict[str, set[int] | None] = field(default_factory=dict)
    engine: str | None = None  # libp11's engine, for the prototype (--ratios)

    def timed(self) -> dict[str, str]:
        """A card process's module (``module``) and environment: p11time over SoftHSM2."""
        return {"module": str(self.p11time), "P11TIME_MODULE": self.module, "P11TIME_LIB": str(self.p11time)}

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process this benchmark starts: this run's
        token store; no OPENSSL_CONF; and a bytecode cache of its own in the
        run's folder (as an installed package has compiled modules, even
        where PYTHONDONTWRITEBYTECODE is set, without writing into the tree)."""
        drop = ("OPENSSL_CONF", "MTLS_ENGINE_MODULE", "PYTHONDONTWRITEBYTECODE")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        pythonpath = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(SOFTHSM2_CONF=str(self.conf), MTLS_BENCH_PIN=self.pin, PYTHONPATH=pythonpath,
                   PYTHONPYCACHEPREFIX=str(self.work / "pycache"), **extra)  # fmt: skip
        return env


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _build(work: Path, source: str, shared: bool) -> Path:
    """Compile benchmarks/``source`` (a program, or a shared object) into ``work``."""
    cc = os.environ.get("CC") or shutil.which("cc")
    if not cc:
        raise BenchError(f"no C compiler (cc) to build benchmarks/{source}")
    include = "/usr/include/p11-kit-1"
    if shutil.which("pkg-config"):
        flags = subprocess.run(["pkg-config", "--cflags-only-I", "p11-kit-1"], capture_output=True, text=True).stdout
        include = next((f[2:] for f in flags.split() if f.startswith("-I")), include)
    out = work / (Path(source).stem + (".so" if shared else ""))
    kind = ["-shared", "-fPIC", "-fvisibility=hidden"] if shared else []
    libs = ["-ldl"] if shared else ["-ldl", "-lcrypto"]
    command = [cc, "-O2", "-Wall", "-Werror", "-pthread", *kind, f"-I{include}", str(HERE / source), "-o", str(out)]
    proc = subprocess.run([*command, *libs], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"building {source} failed (needs libssl-dev and p11-kit's header):\n{proc.stderr}")
    return out


def make_setup(work: Path, cpus: dict[str, set[int] | None]) -> Setup:
    """A SoftHSM2 store in ``work`` with one token (RSA-2048 and P-256 keys
    generated on it, certificates stored with them), file keys of both kinds,
    a server key, all issued by one test CA; the openssl.cnf and URI PEM
    files for s_time; signrate built; the spy and shim modules found."""
    sys.path.insert(0, str(ROOT))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from mtls_engine._backends import STATUS
    from mtls_engine._softhsm import CA, KeyKind, TokenStore, library_candidates, missing_tools

    missing = missing_tools()
    if missing:
        raise BenchError(f"the SoftHSM2 token needs: {', '.join(missing)}")
    pin = "".join(secrets.choice("0123456789") for _ in range(8))
    store = TokenStore.create(work / "softhsm")
    os.environ["SOFTHSM2_CONF"] = str(store.conf)  # never the machine's own token store
    ca = CA.create("handshake benchmark CA")
    ca_file = work / "ca.pem"
    ca_file.write_bytes(ca.pem)
    server_cert, server_key = ca.issue_server_files(work, "localhost")
    token = store.init_token(TOKEN, pin=pin)
    kinds = {"p256": KeyKind.P256, "rsa2048": KeyKind.RSA2048}
    card_certs, uris, files = {}, {}, {}
    for name in KEYS:
        pub = token.generate_key(kinds[name], name, KEY_IDS[name])
        token.store_certificate(ca.issue(pub, f"card-holder {name}"), name, KEY_IDS[name], work)
        card_certs[name] = work / f"{TOKEN}-{name}-{KEY_IDS[name]}.pem"
        uris[name] = token.uri(object=name, type="private")
        key = ec.generate_private_key(ec.SECP256R1()) if name == "p256" else rsa.generate_private_key(65537, 2048)
        cert_path, key_path = work / f"file-{name}.pem", work / f"file-{name}.key"
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        pub_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        cert_path.write_bytes(ca.issue(pub_pem, f"file {name}").public_bytes(serialization.Encoding.PEM))
        files[name] = (cert_path, key_path)
    skipped: dict[str, str] = {}
    backends = []
    for backend in BACKENDS:
        ok, why = STATUS[backend]()
        if ok:
            backends.append(backend)
        else:
            skipped[backend] = why
    setup = Setup(
        work,
        pin,
        store.module,
        store.conf,
        ca_file,
        server_cert,
        server_key,
        files,
        card_certs,
        uris,
        tuple(backends),
        skipped,
        _build(work, "signrate.c", shared=False),
        _build(work, "p11time.c", shared=True),
        cpus=cpus,
    )
    if "engine" in setup.backends:
        from mtls_engine._backends import engine_path

        setup.engine = engine_path()

    if "provider" in setup.backends:
        # s_time's card key: the openssl.cnf and URI PEM files mtls_engine writes for stock clients.
        pin_file = work / "pin"
        _write_private(pin_file, pin.encode())
        setup.cnf = work / "openssl.cnf"
        _cli(
            setup,
            "config",
            "--module",
            setup.module,
            "--backend",
            "provider",
            "--pin-source",
            f"file:{pin_file}",
            "-o",
            str(setup.cnf),
        )
        for name in KEYS:
            setup.uri_pems[name] = work / f"card-{name}.uri.pem"
            _cli(setup, "uri-pem", uris[name], "-o", str(setup.uri_pems[name]))
    else:
        skipped["s_time card"] = "pkcs11-provider is not available"
    for candidate in library_candidates("pkcs11-spy.so") + library_candidates("pkcs11/pkcs11-spy.so"):
        if os.path.exists(candidate):
            setup.spy = candidate
            break
    else:
        skipped["calls"] = "pkcs11-spy.so (Debian: opensc-pkcs11) is not installed"
    try:
        from tests import p11shim

        setup.shim = p11shim.build(work / "shim")
    except Exception as exc:  # ShimUnavailable, or a failed build
        skipped["slow card"] = f"the PKCS#11 shim cannot be built: {exc}"
    return setup


def _cli(setup: Setup, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mtls_engine", *args], capture_output=True, text=True, env=setup.env(), cwd=ROOT
    )
    if proc.returncode != 0:
        raise BenchError(f"python -m mtls_engine {args[0]} failed: {proc.stderr.strip()}")


class Server:
    """The TLS server: one process per concurrent client (gnutls-serv and
    s_server each do one handshake at a time, waiting for the client's
    flights: a single process would serialise concurrent clients, and a
    slow card's signatures), all on the server's CPU.  Client thread i talks
    to ``ports[i]``.  Requires a client certificate, sends no session
    tickets, keeps no session cache."""

    def __init__(self, kind: str, setup: Setup, count: int) -> None:
        self.kind = kind
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        try:
            for i in range(count):
                self._start(setup, setup.work / f"server-{i}.log")
        except BaseException:
            self.close()
            raise

    def _start(self, setup: Setup, log: Path) -> None:
        for _attempt in range(3):
            port = free_port()
            if self.kind == "gnutls":
                # CertificateVerify is checked in every handshake; --verify-client-cert would add
                # chain validation (~0.7 ms per handshake here) and make the server the limit.
                self.command = [
                    "gnutls-serv",
                    "--port",
                    str(port),
                    "--x509certfile",
                    str(setup.server_cert),
                    "--x509keyfile",
                    str(setup.server_key),
                    "--x509cafile",
                    str(setup.ca),
                    "--require-client-cert",
                    "--noticket",
                    "--nodb",
                    "--echo",
                    "--quiet",
                ]
            else:
                self.command = [
                    "openssl",
                    "s_server",
                    "-accept",
                    f"127.0.0.1:{port}",
                    "-cert",
                    str(setup.server_cert),
                    "-key",
                    str(setup.server_key),
                    "-CAfile",
                    str(setup.ca),
                    "-Verify",
                    "2",
                    "-verify_quiet",
                    "-no_ticket",
                    "-num_tickets",
                    "0",
                    "-no_cache",
                    "-rev",
                    "-quiet",
                ]
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=setup.env(),
                    preexec_fn=pinner(setup.cpus["server"]),
                )
            if self._ready(proc, port):
                self.procs.append(proc)
                self.ports.append(port)
                return
            _stop(proc)
        raise BenchError(f"the {self.kind} server did not start:\n{tail(log)}")

    @staticmethod
    def _ready(proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def port(self) -> int:
        return self.ports[0]

    def cpu(self) -> float:
        return sum(proc_cpu(p.pid) for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the limits: raw signing, openssl s_time -----------------------------------------------


def signrate(
    setup: Setup,
    mode: str,
    key: str,
    threads: int,
    seconds: float,
    module: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Signatures per second and CPU per signature: ``p11`` through the module
    (SoftHSM2, or ``module``), ``soft`` with the file key."""
    if mode == "p11":
        args = ["p11", module or setup.module, TOKEN, key, SIGN_ALG[key], str(threads), str(seconds)]
    else:
        args = ["soft", str(setup.files[key][1]), SIGN_ALG[key], str(threads), str(seconds)]
    proc = subprocess.run(
        [str(setup.signrate), *args],
        capture_output=True,
        text=True,
        env=env or setup.env(),
        preexec_fn=pinner(setup.cpus["client"]),
        timeout=120,
    )
    if proc.returncode != 0:
        raise BenchError(f"signrate {' '.join(args[:1] + args[2:])} failed: {proc.stderr.strip()}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    n = max(1, int(out["signatures"]))
    return {
        "rate": n / out["wall"],
        "cpu_us": out["cpu"] / n * 1e6,
        "signatures": n,
        "wall": out["wall"],
        "cpu": out["cpu"],
    }


def s_time(setup: Setup, server: Server, key: str, tls: str, card: bool, seconds: int) -> dict[str, Any]:
    """``openssl s_time -new`` with the file key or the card key (pkcs11-provider
    via the openssl.cnf and URI PEM file).  s_time prints a '*' per
    connection: the rate and CPU per handshake come from sampling that stream
    and the process's CPU time while it runs (its own summary counts whole
    seconds)."""
    assert setup.cnf is not None or not card
    env = setup.env()
    if card:
        env["OPENSSL_CONF"] = str(setup.cnf)
        cert, keyfile = setup.card_certs[key], setup.uri_pems[key]
    else:
        cert, keyfile = setup.files[key]
    cmd = [
        "openssl",
        "s_time",
        "-connect",
        f"127.0.0.1:{server.port}",
        "-new",
        "-time",
        str(seconds),
        "-cert",
        str(cert),
        "-key",
        str(keyfile),
        "-CAfile",
        str(setup.ca),
        "-tls1_3" if tls == "1.3" else "-tls1_2",
    ]
    errfile = setup.work / "s_time.err"
    with open(errfile, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, env=env, preexec_fn=pinner(setup.cpus["client"])
        )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    text, stars, samples = b"", 0, []
    while True:
        try:
            chunk: bytes | None = os.read(fd, 1 << 16)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            break
        if chunk:
            now = time.perf_counter()
            n = chunk.count(b"*")
            text += chunk.replace(b"*", b"")
            if n:
                stars += n
                try:
                    samples.append((now, stars, proc_cpu(proc.pid)))
                except OSError:
                    pass
        time.sleep(0.005)
    proc.stdout.close()
    code = proc.wait(30)
    if code != 0 or b"connections in" not in text or len(samples) < 3:
        raise BenchError(
            f"openssl s_time ({'card' if card else 'file'} {key}, TLS {tls}) failed (exit {code}):\n"
            f"{text.decode(errors='replace')[-500:]}{tail(errfile)}"
        )
    (t0, n0, c0), (t1, n1, c1) = samples[0], samples[-1]
    return {"n": n1 - n0, "wall": t1 - t0, "rate": (n1 - n0) / (t1 - t0), "cpu_ms": (c1 - c0) / (n1 - n0) * 1000}


# ---- phase 1: rounds of handshakes and limits, interleaved ------------------------------------------


def sources_of(setup: Setup, plan: Plan) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """What is measured: source -> (client process, its context's name for a
    key, concurrencies).  Besides file, engine and provider, three
    diagnostic sources with the file key and one client show where a card
    key's extra CPU goes: file@import (mtls_engine imported, nothing
    loaded), file@engine and file@provider (in that backend's process, the
    card key loaded but not used)."""
    sources = {"file": ("file", "{}", CLIENTS), **{b: (b, "{}", CLIENTS) for b in setup.backends}}
    if plan.diagnostics:
        sources["file@import"] = ("import", "{}", (1,))
        sources.update({f"file@{b}": (b, "file:{}", (1,)) for b in setup.backends})
    return sources


def measure_rounds(setup: Setup, server: Server, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Rounds of: raw signing rates, then for every key, TLS version and
    concurrency each key source in turn (the order rotated from cell to
    cell and round to round), and s_time beside the one-client cells."""
    sources = sources_of(setup, plan)
    files = {k: {"cert": str(setup.files[k][0]), "key": str(setup.files[k][1])} for k in KEYS}
    workers: dict[str, Worker] = {}
    checks = []
    cells: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    signing: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    stime: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    try:
        for name in sorted({worker for worker, _, _ in sources.values()}):
            if name in ("file", "import"):
                keys, env = files, setup.env()
            else:
                # The card through p11time, which clocks the CPU spent inside the token.
                timed = setup.timed()
                module = timed.pop("module")
                keys = {k: {"uri": setup.uris[k], "module": module} for k in KEYS}
                keys.update({f"file:{k}": spec for k, spec in files.items()})
                env = setup.env(**timed)
            workers[name] = w = Worker(name, env, setup.cpus["client"], setup.work)
            w.call(cmd="open", ca=str(setup.ca), keys=keys)
        for source, (name, ctx_name, _) in sources.items():
            for key in KEYS:
                for tls in TLS_VERSIONS:
                    c = workers[name].call(cmd="check", key=ctx_name.format(key), tls=tls, ports=server.ports)
                    if c["version"] != f"TLSv{tls}" or c["reused"] or not c["answered"]:
                        raise BenchError(f"{source} {key} TLS {tls}: unexpected handshake {c}")
                    checks.append({"source": source, "key": key, "tls": tls, **c})

        def run(source: str, key: str, tls: str, clients: int, n: int, warmup: int = 0) -> dict[str, Any]:
            name, ctx_name, _ = sources[source]
            s0 = server.cpu()
            res = workers[name].call(cmd="run", key=ctx_name.format(key), tls=tls, clients=clients, n=n,
                                     warmup=warmup, ports=server.ports)  # fmt: skip
            res["server_cpu"] = server.cpu() - s0
            return res

        for r in range(plan.rounds):
            log(f"round {r + 1}/{plan.rounds}")
            for key in rotate(KEYS, r):
                # The token against software, alternating in short runs: their difference is small.
                for _ in range(plan.sign_alternations):
                    for mode in rotate(["soft", "p11"], r):
                        part = signrate(setup, mode, key, 1, plan.sign_seconds / plan.sign_alternations)
                        signing.setdefault((key, mode, 1), []).append({**part, "round": r})
                for threads in SIGN_THREADS[1:]:
                    signing.setdefault((key, "p11", threads), []).append(
                        {**signrate(setup, "p11", key, threads, plan.sign_seconds), "round": r}
                    )
            position = r
            for key in KEYS:
                for tls in TLS_VERSIONS:
                    for clients in CLIENTS:
                        position += 1
                        cell_sources = [s for s, v in sources.items() if clients in v[2]]
                        for source in cell_sources:
                            run(source, key, tls, clients, 0, plan.warmup)
                        # Fine interleaving: every source runs a batch in turn, so that the
                        # machine's drift (a shared machine) hits them all alike.
                        batch = max(clients, plan.handshakes[key] // plan.batches // clients * clients)
                        parts: dict[str, list[dict[str, Any]]] = {s: [] for s in cell_sources}
                        for b in range(plan.batches):
                            for source in rotate(cell_sources, position + b):
                                parts[source].append(run(source, key, tls, clients, batch))
                        for source, runs in parts.items():
                            cells.setdefault((key, tls, clients, source), []).append(_combine(runs))
                    if (key, tls) in plan.s_time_cells and shutil.which("openssl"):
                        for variant in rotate(plan.s_time_sources, r):
                            if variant == "card" and setup.cnf is None:
                                continue
                            # A sandwich: the Python client (1 client) just before and just after.
                            py = "provider" if variant == "card" else "file"
                            before = run(py, key, tls, 1, plan.s_time_python)
                            s0 = server.cpu()
                            res = s_time(setup, server, key, tls, variant == "card", 1)
                            res["server_util"] = (server.cpu() - s0) / res["wall"]
                            after = run(py, key, tls, 1, plan.s_time_python)
                            py_run = _combine([before, after])
                            res.update(python_rate=py_run["rate"], python_cpu_ms=py_run["cpu_ms"])
                            stime.setdefault((key, tls, variant), []).append(res)
    finally:
        for w in workers.values():
            w.close()
    return {"cells": cells, "signing": signing, "s_time": stime, "checks": checks}


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Batches of one source in one cell, as one measurement."""
    n = sum(r["n"] for r in runs)
    wall, cpu = sum(r["wall"] for r in runs), sum(r["cpu"] for r in runs)
    return {"n": n, "wall": wall, "cpu": cpu, "rate": n / wall, "cpu_ms": cpu / n * 1000,
            "server_util": sum(r["server_cpu"] for r in runs) / wall,
            "token_ms": sum(r["token_ns"] for r in runs) / n / 1e6,
            "token_calls": sum(r["token_calls"] for r in runs) / n,
            "other_p11_ms": sum(r["other_p11_ns"] for r in runs) / n / 1e6,
            "other_p11_calls": sum(r["other_p11_calls"] for r in runs) / n,
            "latencies_us": [x for r in runs for x in r["latencies_us"]]}  # fmt: skip


# ---- phase 2: PKCS#11 calls per handshake (pkcs11-spy) ---------------------------------------


_SPY_CALL = re.compile(rb"^\d+: (C_\w+)\s*$", re.MULTILINE)


class SpyLog:
    """Counts the calls in a pkcs11-spy log as it grows.  The log holds the
    PIN in clear: it lives in the run's temporary folder and is deleted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.total: Counter[str] = Counter()

    def read(self) -> Counter[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        self.total.update(m.decode() for m in _SPY_CALL.findall(data[:end]))
        return Counter(self.total)


# The card of the call-count phase takes this long per signature (tests/p11shim
# between pkcs11-spy and SoftHSM2), so that concurrent handshakes really sign at
# the same time and the warm-up grows libp11's session pool to the number of
# clients, as a real card's latency does (with SoftHSM2's 0.1 ms signatures
# on one CPU, the 3rd or 4th pooled session would be opened at some random later
# moment).  The counts do not depend on it.
CALLS_SIGN_DELAY_MS = 10


def call_counts(setup: Setup, server: Server, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Per backend, in a process whose module is pkcs11-spy (over the shim,
    over SoftHSM2): after a warm-up at 4 clients, ``call_handshakes``
    handshakes per key, TLS version and concurrency (1 and 4), and the
    PKCS#11 calls they made; the warm-up's calls are reported too."""
    if setup.spy is None:
        return {"checked": False, "ok": None, "why": setup.skipped.get("calls"), "rows": []}
    rows, setup_calls, warmup_calls = [], {}, []
    n = plan.call_handshakes
    below = {"PKCS11SPY": setup.module}
    if setup.shim is not None:
        shim = p11shim_env(setup, setup.work / "shim-calls", CALLS_SIGN_DELAY_MS)
        below = {"PKCS11SPY": str(setup.shim), **shim}
    for backend in setup.backends:
        log(f"PKCS#11 calls, {backend}")
        path = setup.work / f"spy-{backend}.log"
        spy = SpyLog(path)
        env = setup.env(PKCS11SPY_OUTPUT=str(path), **below)
        w = Worker(backend, env, setup.cpus["client"], setup.work, "-spy")
        try:
            w.call(cmd="open", ca=str(setup.ca), keys={k: {"uri": setup.uris[k], "module": setup.spy} for k in KEYS})
            setup_calls[backend] = dict(spy.read())
            for key in KEYS:
                for tls in TLS_VERSIONS:
                    before = spy.read()
                    w.call(cmd="run", key=key, tls=tls, clients=4, n=8, warmup=0, ports=server.ports)
                    w.call(cmd="run", key=key, tls=tls, clients=1, n=2, warmup=0, ports=server.ports)
                    after = spy.read()
                    opened = after["C_OpenSession"] - before["C_OpenSession"]
                    closed = after["C_CloseSession"] - before["C_CloseSession"]
                    warmup_calls.append(
                        {
                            "backend": backend,
                            "key": key,
                            "tls": tls,
                            "handshakes": 10,
                            "C_OpenSession": opened,
                            "C_CloseSession": closed,
                            "C_Login": after["C_Login"] - before["C_Login"],
                        }
                    )
                    for clients in (1, 4):
                        before = spy.read()
                        w.call(cmd="run", key=key, tls=tls, clients=clients, n=n, warmup=0, ports=server.ports)
                        after = spy.read()
                        calls = {name: after[name] - before[name] for name in after if after[name] != before[name]}
                        rows.append(_call_row(backend, key, tls, clients, n, calls))
        finally:
            w.close()
            path.unlink(missing_ok=True)  # it holds the PIN in clear
    return {
        "checked": True,
        "ok": all(r["ok"] for r in rows),
        "card_sign_delay_ms": CALLS_SIGN_DELAY_MS if setup.shim is not None else 0,
        "rows": rows,
        "warmup": warmup_calls,
        "setup_calls": setup_calls,
    }


def p11shim_env(setup: Setup, state: Path, delay_ms: int) -> dict[str, str]:
    """The environment that makes tests/p11shim a card taking ``delay_ms`` per signature."""
    from tests import p11shim

    return p11shim.shim_env(setup.module, state, sign_delay_ms=delay_ms, log=False)


def _call_row(backend: str, key: str, tls: str, clients: int, n: int, calls: dict[str, int]) -> dict[str, Any]:
    per = {name: count / n for name, count in sorted(calls.items())}
    per["C_Sign+C_SignFinal"] = (calls.get("C_Sign", 0) + calls.get("C_SignFinal", 0)) / n
    problems = [
        f"{name} {per.get(name, 0):g} per handshake (expected 1)" for name in ONE_PER_HANDSHAKE if per.get(name, 0) != 1
    ]
    problems += [f"{name} {per[name]:g} per handshake (expected 0)" for name in NONE_PER_HANDSHAKE if per.get(name)]
    return {
        "backend": backend,
        "key": key,
        "tls": tls,
        "clients": clients,
        "handshakes": n,
        "per_handshake": per,
        "ok": not problems,
        "problems": problems,
    }


# ---- phase 3: cold start ---------------------------------------------------------------------

# A fresh interpreter: the clock starts after the imports every TLS client
# makes anyway (ssl, socket) and stops when the first handshake is done.
# mtls_engine's internals are timed by wrapping them (a few microseconds).
COLD_SCRIPT = r"""
import os, socket, ssl, time
t0 = time.perf_counter()
source = os.environ["T_SOURCE"]
parts = {}
if source == "file":
    t1 = t1b = time.perf_counter()
    ctx = ssl.create_default_context(cafile=os.environ["T_CA"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.environ["T_CERT"], os.environ["T_KEY"])
else:
    import mtls_engine
    t1 = time.perf_counter()
    from mtls_engine import _api, _backends, _p11

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[label] = parts.get(label, 0.0) + time.perf_counter() - start
        return wrapper

    for label, owner, name in (
        ("module load + C_Initialize", _p11.Module, "load"), ("token lookup", _p11.Module, "find_token"),
        ("login", _p11.Module, "login"), ("key lookup", _p11.Module, "find_private_key"),
        ("certificate lookup", _api, "certificate_candidates"), ("backend start + key load", _backends,
        "load_private_key"), ("certificate check", _api, "pick_leaf"), ("mechanism check", _api, "can_sign_pss"),
    ):
        attr = vars(owner).get(name)
        if isinstance(attr, classmethod):
            setattr(owner, name, classmethod(timed(label, attr.__func__)))
        elif attr is not None:
            setattr(owner, name, timed(label, attr))
    t1b = time.perf_counter()
    ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"],
                                     module=os.environ["T_MODULE"], pin=os.environ["MTLS_BENCH_PIN"], backend=source)
t2 = time.perf_counter()
tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(os.environ["T_PORT"]))), server_hostname="localhost")
t3 = time.perf_counter()
tls.sendall(b"ping\n")
answered = bool(tls.recv(64))
tls.close()
import json
print(json.dumps({"import_ms": (t1 - t0) * 1000, "load_ms": (t2 - t1b) * 1000, "handshake_ms": (t3 - t2) * 1000,
                  "total_ms": (t3 - t0 - (t1b - t1)) * 1000, "answered": answered,
                  "parts_ms": {k: v * 1000 for k, v in parts.items()}}))
"""


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)\s*$")


def import_profile(setup: Setup, repeats: int) -> dict[str, Any]:
    """Where ``import mtls_engine`` spends its time (``python -X importtime``,
    after ``import ssl, socket``): self time summed by top-level package, and
    the largest modules; medians of ``repeats`` fresh processes."""
    groups: dict[str, list[float]] = {}
    modules: dict[str, list[float]] = {}
    totals = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import ssl, socket; import mtls_engine"],
            capture_output=True,
            text=True,
            env=setup.env(),
            cwd=ROOT,
            preexec_fn=pinner(setup.cpus["client"]),
        )
        parsed = [m for m in map(_IMPORT_LINE.match, proc.stderr.splitlines()) if m]
        # Post-order: mtls_engine's subtree is every line after the previous top-level import.
        end = max(i for i, m in enumerate(parsed) if m[4] == "mtls_engine" and len(m[3]) == 1)
        start = max((i for i, m in enumerate(parsed[:end]) if len(m[3]) == 1), default=-1) + 1
        totals.append(int(parsed[end][2]) / 1000)
        per_group: Counter[str] = Counter()
        for m in parsed[start : end + 1]:
            name, self_ms = m[4], int(m[1]) / 1000
            top = name.split(".")[0]
            group = top if top in ("cryptography", "mtls_engine", "cffi", "_cffi_backend") else "standard library"
            per_group["cffi" if group == "_cffi_backend" else group] += self_ms
            modules.setdefault(name, []).append(self_ms)
        for group, ms in per_group.items():
            groups.setdefault(group, []).append(ms)
    top = sorted(((median(v), k) for k, v in modules.items()), reverse=True)[:10]
    return {
        "total_ms": median(totals),
        "by_package_ms": {k: median(v) for k, v in sorted(groups.items())},
        "largest_ms": {name: ms for ms, name in top},
    }


def cold_start(setup: Setup, server: Server, plan: Plan, log: Callable[[str], None]) -> list[dict[str, Any]]:
    log("cold start")
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in range(-1, plan.cold_repeats):  # round -1 primes the bytecode cache and is not counted
        for source in rotate(("file", *setup.backends), r):
            for key in plan.cold_keys:
                env = setup.env(
                    T_SOURCE=source,
                    T_CA=str(setup.ca),
                    T_PORT=str(server.port),
                    T_URI=setup.uris[key],
                    T_MODULE=setup.module,
                    T_CERT=str(setup.files[key][0]),
                    T_KEY=str(setup.files[key][1]),
                )
                proc = subprocess.run(
                    [sys.executable, "-c", COLD_SCRIPT],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=ROOT,
                    preexec_fn=pinner(setup.cpus["client"]),
                    timeout=60,
                )
                if proc.returncode != 0:
                    raise BenchError(f"cold start ({source}, {key}) failed:\n{proc.stderr[-2000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                if not run["answered"]:
                    raise BenchError(f"cold start ({source}, {key}): the server did not answer")
                if r >= 0:
                    runs.setdefault((source, key), []).append(run)
    rows = []
    for (source, key), rs in runs.items():
        names = sorted({p for run in rs for p in run["parts_ms"]})
        parts = {p: median(run["parts_ms"].get(p, 0.0) for run in rs) for p in names}
        row = {
            "source": source,
            "key": key,
            "runs": len(rs),
            **{k: median(run[k] for run in rs) for k in ("import_ms", "load_ms", "handshake_ms", "total_ms")},
            "parts_ms": parts,
        }
        row["min_total_ms"] = min(run["total_ms"] for run in rs)
        row["other_load_ms"] = max(0.0, row["load_ms"] - sum(parts.values())) if parts else None
        rows.append(row)
    return rows


# ---- phase 4: a slow card ------------------------------------------------------------------------


def slow_card(setup: Setup, server: Server, plan: Plan, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Through tests/p11shim, which sleeps before each signature (no lock:
    concurrent signatures overlap): efficiency = handshake rate / card signing
    rate, the signing rate measured through the same shim with as many
    threads as clients.  With one client a handshake cannot sign and do the
    rest at once, so efficiency is at most t_sign / (t_sign + the rest):
    ``eta_bound`` takes the rest to be a file-key handshake (one client,
    measured just before)."""
    if setup.shim is None:
        return []
    rows = []
    for delay in plan.delays:
        log(f"slow card, {delay} ms per signature")
        env = setup.env(**p11shim_env(setup, setup.work / f"shim-{delay}", delay))
        sign = {
            (key, c): signrate(setup, "p11", key, c, max(plan.sign_seconds, 8 * delay / 1000), str(setup.shim), env)
            for key in plan.slow_keys
            for c in plan.slow_handshakes
        }
        for backend in setup.backends:
            w = Worker(backend, env, setup.cpus["client"], setup.work, f"-slow{delay}")
            try:
                w.call(
                    cmd="open",
                    ca=str(setup.ca),
                    keys={
                        **{k: {"uri": setup.uris[k], "module": str(setup.shim)} for k in plan.slow_keys},
                        **{f"file:{k}": {"cert": str(setup.files[k][0]), "key": str(setup.files[k][1])} for k in KEYS},
                    },
                )
                for key in plan.slow_keys:
                    # The rest of a handshake, apart from the card's signature: a file-key handshake,
                    # one at a time (the slow card's clients mostly wait, so they hardly compete).
                    ref = w.call(cmd="run", key=f"file:{key}", tls="1.3", clients=1, n=20, warmup=5,
                                 ports=server.ports)  # fmt: skip
                    for clients, n in plan.slow_handshakes.items():
                        res = w.call(
                            cmd="run", key=key, tls="1.3", clients=clients, n=n, warmup=clients, ports=server.ports
                        )
                        card = sign[(key, clients)]["rate"]
                        t_sign = clients / card  # one signature's time, as each client sees it
                        t_rest = 1 / ref["rate"]
                        rows.append(
                            {
                                "backend": backend,
                                "key": key,
                                "delay_ms": delay,
                                "clients": clients,
                                "handshakes": n,
                                "rate": res["rate"],
                                "sign_rate": card,
                                "eta": res["rate"] / card,
                                "eta_bound": t_sign / (t_sign + t_rest),
                                "file_ms": t_rest * 1000,
                                "p50_ms": percentile(res["latencies_us"], 0.5) / 1000,
                            }
                        )
            finally:
                w.close()
    return rows


# ---- analysis ------------------------------------------------------------------------------------


def analyse(raw: dict[str, Any], setup: Setup) -> dict[str, Any]:
    # Signing runs of one kind in one round (alternated in parts) as one measurement.
    per_round: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for (key, mode, threads), parts in raw["signing"].items():
        rounds = sorted({p["round"] for p in parts})
        for r in rounds:
            mine = [p for p in parts if p["round"] == r]
            n, wall, cpu = (sum(p[k] for p in mine) for k in ("signatures", "wall", "cpu"))
            per_round.setdefault((key, mode, threads), []).append({"rate": n / wall, "cpu_us": cpu / n * 1e6})
    raw = {**raw, "signing": per_round}
    rounds = len(next(iter(per_round.values())))
    signing = []
    for (key, mode, threads), runs in sorted(raw["signing"].items()):
        signing.append(
            {
                "key": key,
                "mode": mode,
                "threads": threads,
                "rate": median(r["rate"] for r in runs),
                "cpu_us": median(r["cpu_us"] for r in runs),
                "rounds": [round(r["rate"], 1) for r in runs],
            }
        )
    # Software signing (the file key, EVP_DigestSign) and the token's signing in a tight loop, round by round.
    soft_ms = {key: [run["cpu_us"] / 1000 for run in raw["signing"][(key, "soft", 1)]] for key in KEYS}
    loop_extra = {key: [run["cpu_us"] / 1000 - s for run, s in zip(raw["signing"][(key, "p11", 1)], soft_ms[key])]
                  for key in KEYS}  # fmt: skip

    handshakes = []
    for (key, tls, clients, source), runs in sorted(raw["cells"].items()):
        pooled = [x for r in runs for x in r["latencies_us"]]
        handshakes.append(
            {
                "key": key,
                "tls": tls,
                "clients": clients,
                "source": source,
                "rate": median(r["rate"] for r in runs),
                "cpu_ms": median(r["cpu_ms"] for r in runs),
                "token_ms": median(r["token_ms"] for r in runs),
                "p50_ms": percentile(pooled, 0.5) / 1000,
                "p99_ms": percentile(pooled, 0.99) / 1000,
                "server_util": median(r["server_util"] for r in runs),
                "handshakes": len(pooled),
                "rounds": [
                    {
                        "rate": round(r["rate"], 1),
                        "cpu_ms": round(r["cpu_ms"], 4),
                        "token_ms": round(r["token_ms"], 4),
                        "server_util": round(r["server_util"], 3),
                    }
                    for r in runs
                ],
            }
        )

    # The token's own extra cost per handshake, round by round: the CPU its signing calls took inside the
    # handshakes (p11time) minus the same signature in software.  file@...: no token, no extra.
    def token_extra(key: str, runs: list[dict[str, Any]]) -> list[float]:
        return [run["token_ms"] - s if run["token_calls"] else 0.0 for run, s in zip(runs, soft_ms[key])]

    ratios = []
    for (key, tls, clients, source), runs in sorted(raw["cells"].items()):
        if source == "file":
            continue
        base = raw["cells"][(key, tls, clients, "file")]
        extra = [c["cpu_ms"] - f["cpu_ms"] for c, f in zip(runs, base)]
        token = token_extra(key, runs)
        loop = loop_extra[key] if source in BACKENDS else [0.0] * len(runs)
        ratios.append(
            {
                "key": key,
                "tls": tls,
                "clients": clients,
                "backend": source,
                "rate_ratio": median(c["rate"] / f["rate"] for c, f in zip(runs, base)),
                # The rate had the token signed as fast as software: each handshake's time less that extra.
                "rate_ratio_beyond_token": median(
                    1 / f["rate"] / (1 / c["rate"] - t / 1000) for c, f, t in zip(runs, base, token)
                ),
                "cpu_extra_ms": median(extra),
                "token_ms": median(run["token_ms"] for run in runs),
                "token_extra_ms": median(token),
                "token_extra_loop_ms": median(loop),
                "other_p11_ms": median(run["other_p11_ms"] for run in runs),
                "cpu_beyond_token": median((e - t) / f["cpu_ms"] for e, t, f in zip(extra, token, base)),
                "cpu_beyond_token_loop": median((e - t) / f["cpu_ms"] for e, t, f in zip(extra, loop, base)),
                "rounds": [round(c["rate"] / f["rate"], 3) for c, f in zip(runs, base)],
            }
        )

    decomposition = []
    cells = raw["cells"]
    for key in KEYS:
        for tls in TLS_VERSIONS:
            if (key, tls, 1, "file@import") not in cells:
                continue

            def cpu(source: str, key: str = key, tls: str = tls) -> list[float]:
                return [run["cpu_ms"] for run in cells[(key, tls, 1, source)]]

            row: dict[str, Any] = {
                "key": key,
                "tls": tls,
                "file_ms": median(cpu("file")),
                "import_ms": median(a - b for a, b in zip(cpu("file@import"), cpu("file"))),
            }
            for b in setup.backends:
                token = token_extra(key, cells[(key, tls, 1, b)])
                row[b] = {
                    "loaded_ms": median(a - c for a, c in zip(cpu(f"file@{b}"), cpu("file@import"))),
                    "signature_ms": median(a - c for a, c in zip(cpu(b), cpu(f"file@{b}"))),
                    "token_extra_ms": median(token),
                    "beyond_token_ms": median(a - c - t for a, c, t in zip(cpu(b), cpu(f"file@{b}"), token)),
                    "total_ms": median(a - c for a, c in zip(cpu(b), cpu("file"))),
                }
            decomposition.append(row)

    stime = []
    for (key, tls, variant), runs in sorted(raw["s_time"].items()):
        stime.append(
            {
                "key": key,
                "tls": tls,
                "source": variant,
                "rate": median(r["rate"] for r in runs),
                "cpu_ms": median(r["cpu_ms"] for r in runs),
                "server_util": median(r["server_util"] for r in runs),
                "python_source": "provider" if variant == "card" else "file",
                "python_rate": median(r["python_rate"] for r in runs),
                "python_cpu_ms": median(r["python_cpu_ms"] for r in runs),
                "python_ratio": median(r["python_rate"] / r["rate"] for r in runs),
                "python_cpu_ratio": median(r["python_cpu_ms"] / r["cpu_ms"] for r in runs),
                "rounds": [round(r["python_rate"] / r["rate"], 3) for r in runs],
            }
        )
    return {
        "signing": signing,
        "soft_sign_ms": {k: median(v) for k, v in soft_ms.items()},
        "token_extra_loop_ms": {k: median(v) for k, v in loop_extra.items()},
        "handshakes": handshakes,
        "ratios": ratios,
        "s_time": stime,
        "decomposition": decomposition,
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: float | None, met: bool | None, detail: str) -> None:
        out.append({"name": name, "target": target, "value": value, "met": met, "detail": detail})

    ratios = result["ratios"]
    for backend in BACKENDS:
        for key in KEYS:
            rows = [r for r in ratios if r["backend"] == backend and r["key"] == key]
            if not rows:
                continue
            worst = min(rows, key=lambda r: r["rate_ratio"])
            add(
                f"{KEY_NAMES[key]} rate, {backend}",
                f">= {RATE_TARGET[key]:.2f} x file key",
                worst["rate_ratio"],
                worst["rate_ratio"] >= RATE_TARGET[key],
                f"worst cell: TLS {worst['tls']}, {worst['clients']} "
                f"client(s); all cells: {', '.join(_cell(r, 'rate_ratio', '{:.3f}') for r in rows)}",
            )
            if key == "p256":
                worst = max(rows, key=lambda r: r["cpu_beyond_token"])
                add(
                    f"P-256 client CPU, {backend}",
                    f"<= {CPU_TARGET:.0%} beyond the token's extra",
                    worst["cpu_beyond_token"],
                    worst["cpu_beyond_token"] <= CPU_TARGET,
                    f"worst cell: TLS {worst['tls']}, {worst['clients']} client(s); all cells: "
                    f"{', '.join(_cell(r, 'cpu_beyond_token', '{:+.1%}') for r in rows)}",
                )
    calls = result["calls"]
    if calls["checked"]:
        bad = [
            f"{r['backend']} {r['key']} TLS {r['tls']} c={r['clients']}: {'; '.join(r['problems'])}"
            for r in calls["rows"]
            if not r["ok"]
        ]
        add(
            "steady state PKCS#11 calls",
            "1 signature, 0 find/login/open per handshake",
            None,
            calls["ok"],
            "; ".join(bad) or f"{len(calls['rows'])} cells checked",
        )
    else:
        add(
            "steady state PKCS#11 calls",
            "1 signature, 0 find/login/open per handshake",
            None,
            None,
            f"not checked: {calls.get('why')}",
        )
    for backend in BACKENDS:
        rows = [r for r in result["slow_card"] if r["backend"] == backend and r["clients"] == 1]
        if rows:
            worst = min(rows, key=lambda r: r["eta"])
            add(
                f"slow card efficiency, {backend}",
                f">= {ETA_TARGET} at 1 client",
                worst["eta"],
                worst["eta"] >= ETA_TARGET,
                ", ".join(f"{KEY_NAMES[r['key']]} {r['delay_ms']} ms: {r['eta']:.3f}" for r in rows),
            )
        rows = [r for r in result["cold_start"] if r["source"] == backend]
        if rows:
            worst = max(rows, key=lambda r: r["total_ms"])
            add(
                f"cold start, {backend}",
                f"<= {COLD_TARGET_MS:.0f} ms",
                worst["total_ms"],
                worst["total_ms"] <= COLD_TARGET_MS,
                ", ".join(f"{KEY_NAMES[r['key']]}: {r['total_ms']:.0f} ms (import {r['import_ms']:.0f})" for r in rows),
            )
    rows = [r for r in result["s_time"] if r["source"] == "card" and r["python_ratio"] is not None]
    if rows:
        worst = min(rows, key=lambda r: r["python_ratio"])
        add(
            "Python vs openssl s_time, card key (provider)",
            f">= {S_TIME_TARGET} x",
            worst["python_ratio"],
            worst["python_ratio"] >= S_TIME_TARGET,
            ", ".join(f"{KEY_NAMES[r['key']]} TLS {r['tls']}: {r['python_ratio']:.3f}" for r in rows),
        )
    return out


def _cell(row: dict[str, Any], field_name: str, fmt: str) -> str:
    return f"{KEY_NAMES[row['key']]} {row['tls']} c{row['clients']} {fmt.format(row[field_name])}"


# ---- output: Markdown, PNG -----------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["setup"]
    hs = {(r["key"], r["tls"], r["clients"], r["source"]): r for r in result["handshakes"]}
    ratios = {(r["key"], r["tls"], r["clients"], r["backend"]): r for r in result["ratios"]}
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in result["ratios"])]
    others = backends
    lines = [
        f"Run {result['started']} ({'quick' if result['quick'] else 'full'}, {s['rounds']} round(s), "
        f"{result['duration_s']:.0f} s): Python {m['python']}, {m['openssl']}, SoftHSM2 {m['softhsm2']}, "
        f"libp11 {m['libp11']}, pkcs11-provider {m['pkcs11_provider']}, {m['cpus']} CPUs. Server: "
        f"{s['server_processes']} x `{s['server']}` on CPU {s['server_cpu']}; clients on CPU {s['client_cpu']}. "
        "Medians of rounds; a ratio or difference is taken within each round, then the median.",
        "",
        "### Handshakes per second (full handshakes; x the file key's rate)",
        "",
        "In brackets: x the file key's rate in the same round; then the same had the token signed as fast as "
        "software (each handshake's time less the token's own extra signing cost, see the CPU table).",
        "",
        "| key | TLS | clients | file | " + " | ".join(others) + " | server CPU busy |",
        "|---|---|---:|---:|" + "---:|" * len(others) + "---:|",
    ]
    rows = [(key, tls, c) for key in KEYS for tls in TLS_VERSIONS for c in CLIENTS if (key, tls, c, "file") in hs]
    for key, tls, c in rows:
        f = hs[(key, tls, c, "file")]
        cells = [hs.get((key, tls, c, b)) for b in others]
        rates = [
            f"{h['rate']:.0f} (x{ratios[(key, tls, c, b)]['rate_ratio']:.3f}; "
            f"x{ratios[(key, tls, c, b)]['rate_ratio_beyond_token']:.3f})"
            if h
            else "-"
            for h, b in zip(cells, others)
        ]
        util = max(h["server_util"] for h in [f, *cells] if h)
        lines.append(f"| {KEY_NAMES[key]} | {tls} | {c} | {f['rate']:.0f} | {' | '.join(rates)} | <= {util:.0%} |")
    lines += [
        "",
        "### Client CPU per handshake (process time, ms)",
        "",
        "In brackets: the extra over the file key in the same round; the token's own extra signing cost in those "
        "handshakes (the CPU inside its C_SignInit/C_Sign/C_SignUpdate/C_SignFinal, clocked by "
        "`benchmarks/p11time.c`, minus the same signature in software); and what is left of the extra beyond the "
        "token's, as a share of the file key's CPU (the target: within 5 %).",
        "",
        "| key | TLS | clients | file | " + " | ".join(others) + " |",
        "|---|---|---:|---:|" + "---:|" * len(others),
    ]
    for key, tls, c in rows:
        cols = []
        for b in others:
            h, r = hs.get((key, tls, c, b)), ratios.get((key, tls, c, b))
            ok = h is not None and r is not None
            cols.append(
                f"{h['cpu_ms']:.3f} ({r['cpu_extra_ms']:+.3f}; token {r['token_extra_ms']:+.3f}; "
                f"{r['cpu_beyond_token']:+.1%})"
                if ok
                else "-"
            )
        lines.append(
            f"| {KEY_NAMES[key]} | {tls} | {c} | {hs[(key, tls, c, 'file')]['cpu_ms']:.3f} | {' | '.join(cols)} |"
        )
    if result["decomposition"]:
        lines += [
            "",
            "### Where a card key's extra CPU goes (1 client, ms per handshake)",
            "",
            "Steps measured side by side: the file key in a plain process; with `mtls_engine` imported (nothing "
            "loaded); in the backend's process with the card key loaded but not used; then the card key itself, "
            "whose extra is the token's own (the CPU inside its signing calls in these handshakes, minus software "
            "signing) and the rest (the backend's signing path).",
            "",
            "| key | TLS | file | + import | "
            + " | ".join(f"{b}: + loaded | + card signature (token + rest) | = total" for b in backends)
            + " |",
            "|---|---|---:|---:|" + "---:|---:|---:|" * len(backends),
        ]
        for d in result["decomposition"]:
            cols = []
            for b in backends:
                x = d[b]
                cols.append(
                    f"{x['loaded_ms']:+.3f} | {x['signature_ms']:+.3f} ({x['token_extra_ms']:.3f} + "
                    f"{x['beyond_token_ms']:.3f}) | {x['total_ms']:+.3f}"
                )
            lines.append(
                f"| {KEY_NAMES[d['key']]} | {d['tls']} | {d['file_ms']:.3f} | {d['import_ms']:+.3f} | "
                + " | ".join(cols)
                + " |"
            )
    lines += [
        "",
        "### Latency per handshake, p50 / p99 (ms, connect to handshake done)",
        "",
        "| key | TLS | clients | file | " + " | ".join(others) + " |",
        "|---|---|---:|---:|" + "---:|" * len(others),
    ]
    for key, tls, c in rows:
        lats = [
            f"{h['p50_ms']:.2f} / {h['p99_ms']:.2f}" if h else "-"
            for h in (hs.get((key, tls, c, b)) for b in ("file", *others))
        ]
        lines.append(f"| {KEY_NAMES[key]} | {tls} | {c} | {' | '.join(lats)} |")
    sign = {(r["key"], r["mode"], r["threads"]): r for r in result["signing"]}
    lines += [
        "",
        "### The limits",
        "",
        "Raw signing (`benchmarks/signrate.c`, one session per thread, on the clients' CPU): the token through "
        "C_SignInit + C_Sign in a tight loop, and software (the file key, EVP_DigestSign as libssl signs). "
        "Inside a handshake the token's code and data are cold: its signing calls then take longer "
        "(last columns, p11time, median over the one-client cells).",
        "",
        "| key | token, 1 thread | 2 threads | 4 threads | token CPU µs/signature | software µs/signature "
        "| in a handshake: " + " | ".join(f"{b} µs" for b in backends) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(backends),
    ]
    insitu = {
        (h["key"], h["source"]): median(x["token_ms"] * 1000 for x in result["handshakes"]
                                        if (x["key"], x["clients"], x["source"]) == (h["key"], 1, h["source"]))
        for h in result["handshakes"]
        if h["source"] in backends
    }  # fmt: skip
    for key in KEYS:
        if (key, "p11", 1) not in sign:
            continue
        lines.append(
            f"| {KEY_NAMES[key]} | "
            + " | ".join(f"{sign[(key, 'p11', t)]['rate']:.0f}/s" for t in SIGN_THREADS)
            + f" | {sign[(key, 'p11', 1)]['cpu_us']:.0f} | {sign[(key, 'soft', 1)]['cpu_us']:.0f} | "
            + " | ".join(f"{insitu[(key, b)]:.0f}" for b in backends)
            + " |"
        )
    if result["s_time"]:
        lines += [
            "",
            "`openssl s_time -new` (one connection at a time) against the same server, beside the Python client "
            "with 1 client: the card key through pkcs11-provider (openssl.cnf and URI PEM file from "
            "`python -m mtls_engine config` / `uri-pem`), the file key for reference.",
            "",
            "| key | TLS | key source | s_time hs/s | s_time CPU ms/hs | Python hs/s | Python / s_time (rate) | "
            "Python / s_time (CPU) |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in result["s_time"]:
            src = "card (provider)" if r["source"] == "card" else "file"
            lines.append(
                f"| {KEY_NAMES[r['key']]} | {r['tls']} | {src} | {r['rate']:.0f} | {r['cpu_ms']:.3f} | "
                f"{_fmt(r['python_rate'])} | {_fmt(r['python_ratio'], '.3f')} | "
                f"{_fmt(r['python_cpu_ratio'], '.3f')} |"
            )
    calls = result["calls"]
    lines += ["", "### PKCS#11 calls per handshake in steady state (pkcs11-spy)", ""]
    if calls["checked"]:
        lines += [
            "| backend | key | TLS | clients | handshakes | C_SignInit | C_Sign + C_SignFinal | C_FindObjectsInit | "
            "C_Login | C_OpenSession | other calls per handshake | ok |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        shown = {"C_SignInit", "C_Sign", "C_SignFinal", "C_Sign+C_SignFinal", *NONE_PER_HANDSHAKE}
        for r in calls["rows"]:
            p = r["per_handshake"]
            other = ", ".join(f"{k} {v:g}" for k, v in p.items() if k not in shown) or "none"
            lines.append(
                f"| {r['backend']} | {KEY_NAMES[r['key']]} | {r['tls']} | {r['clients']} | {r['handshakes']} "
                f"| {p.get('C_SignInit', 0):g} | {p['C_Sign+C_SignFinal']:g} | "
                f"{p.get('C_FindObjectsInit', 0):g} | {p.get('C_Login', 0):g} | "
                f"{p.get('C_OpenSession', 0):g} | {other} | {'yes' if r['ok'] else '**NO**'} |"
            )
    else:
        lines.append(f"Not checked: {calls.get('why')}.")
    if result["cold_start"]:
        lines += [
            "",
            f"### Cold start (fresh process; after `import ssl, socket`; median of {result['cold_start'][0]['runs']})",
            "",
            "| key source | key | import mtls_engine | load (client_context) | first handshake | total | fastest run | "
            "inside the load (ms) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in result["cold_start"]:
            inside = ", ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items())
            if r["other_load_ms"] is not None:
                inside += f", other {r['other_load_ms']:.1f}"
            src = "file (plain ssl)" if r["source"] == "file" else r["source"]
            lines.append(
                f"| {src} | {KEY_NAMES[r['key']]} | {r['import_ms']:.1f} ms | {r['load_ms']:.1f} ms | "
                f"{r['handshake_ms']:.1f} ms | **{r['total_ms']:.1f} ms** | {r['min_total_ms']:.1f} ms | "
                f"{inside or '-'} |"
            )
        prof = result.get("import_profile")
        if prof:
            groups = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(prof["by_package_ms"].items(), key=lambda i: -i[1]))
            largest = ", ".join(f"{k} {v:.1f}" for k, v in prof["largest_ms"].items())
            lines += [
                "",
                f"Where `import mtls_engine` goes (`python -X importtime`, {prof['total_ms']:.0f} ms in all "
                f"under instrumentation; self time by package): {groups}. Largest modules (ms): {largest}.",
            ]
    if result["slow_card"]:
        lines += [
            "",
            "### Slow card (tests/p11shim sleeps before each signature; TLS 1.3)",
            "",
            "Efficiency η = handshakes per second / the card's signatures per second through the same shim with "
            "as many threads as clients. A client signs, then does the rest of its handshake: η cannot pass "
            "*bound* = t_sign / (t_sign + t_rest), t_rest being a file-key handshake's time (one at a time, "
            "measured just before; the slow card's clients mostly wait, so they hardly compete for the CPU).",
            "",
            "| backend | key | card delay | clients | handshakes/s | card signatures/s | η | bound | η / bound | "
            "p50 ms | file key, ms per handshake |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["slow_card"]:
            lines.append(
                f"| {r['backend']} | {KEY_NAMES[r['key']]} | {r['delay_ms']} ms | {r['clients']} | "
                f"{r['rate']:.2f} | {r['sign_rate']:.2f} | {r['eta']:.3f} | {r['eta_bound']:.3f} | "
                f"{r['eta'] / r['eta_bound']:.3f} | {r['p50_ms']:.1f} | {r['file_ms']:.2f} |"
            )
    lines += ["", "### Targets", "", "| target | goal | result | met | detail |", "|---|---|---:|---|---|"]
    for t in result["targets"]:
        value = t["value"]
        if value is None:
            shown_value = "-"
        elif "rate" in t["name"] or "efficiency" in t["name"] or "s_time" in t["name"]:
            shown_value = f"{value:.3f}"
        elif "CPU" in t["name"]:
            shown_value = f"{value:+.1%}"
        else:
            shown_value = f"{value:.0f} ms"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['name']} | {t['target']} | {shown_value} | {met} | {t['detail']} |")
    if result.get("chart"):
        lines += ["", f"Chart: `{result['chart']}`."]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, tables: str) -> None:
    """Replace the generated block of ``path`` (keeping everything else, such
    as the notes below it), or create the file with a title and a notes
    heading."""
    block = f"{BEGIN}\n{tables}{END}\n"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            after = rest.split(END, 1)[1].lstrip("\n")
            path.write_text(head + block + ("\n" + after if after else ""))
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Handshake benchmark\n\nWritten by `python benchmarks/handshake.py` (see its docstring for the "
        "set-up).\n\n" + block + "\n## Notes\n"
    )


def chart(result: dict[str, Any], path: Path) -> bool:
    """A PNG: handshakes per second and client CPU per handshake for every
    cell, s_time beside the one-client rows.  False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    hs = {(r["key"], r["tls"], r["clients"], r["source"]): r for r in result["handshakes"]}
    sources = [s for s in ("file", *BACKENDS) if any(k[3] == s for k in hs)]
    groups = [(k, t) for k in KEYS for t in TLS_VERSIONS]
    fig, axes = plt.subplots(len(CLIENTS), 2, figsize=(13, 3.2 * len(CLIENTS)), squeeze=False)
    colors = {
        "file": "#6c757d",
        "engine": "#1f77b4",
        "provider": "#ff7f0e",
        "file@provider": "#ffbb78",
        "s_time file": "#adb5bd",
        "s_time card": "#d62728",
    }
    for row, clients in enumerate(CLIENTS):
        bars = list(sources) + (["s_time file", "s_time card"] if clients == 1 and result["s_time"] else [])
        width = 0.8 / len(bars)
        for col, metric in enumerate(("rate", "cpu_ms")):
            ax = axes[row][col]
            for i, bar in enumerate(bars):
                values = []
                for key, tls in groups:
                    if bar.startswith("s_time"):
                        st = [r for r in result["s_time"] if (r["key"], r["tls"], r["source"]) == (key, tls, bar[7:])]
                        values.append(st[0][metric] if st else 0)
                    else:
                        values.append(hs[(key, tls, clients, bar)][metric] if (key, tls, clients, bar) in hs else 0)
                ax.bar([g + i * width for g in range(len(groups))], values, width, label=bar, color=colors[bar])
            ax.set_xticks([g + width * (len(bars) - 1) / 2 for g in range(len(groups))])
            ax.set_xticklabels([f"{KEY_NAMES[k]} TLS {t}" for k, t in groups])
            ax.set_ylabel("handshakes/s" if metric == "rate" else "client CPU ms/handshake")
            ax.set_title(f"{clients} client(s): {'rate' if metric == 'rate' else 'CPU per handshake'}")
            ax.grid(axis="y", alpha=0.3)
        axes[row][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Full handshakes, file key vs card key (SoftHSM2), median of {result['setup']['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "softhsm2": dpkg_version("softhsm2"),
        "libp11": dpkg_version("libengine-pkcs11-openssl"),
        "pkcs11_provider": dpkg_version("pkcs11-provider"),
        "gnutls": dpkg_version("gnutls-bin"),
    }


def run(args: argparse.Namespace) -> int:
    plan = Plan.make(args.quick, args.rounds)
    suffix = "-quick" if plan.quick else ""
    out_dir = Path(args.output).resolve()
    md_path = (
        Path(args.markdown)
        if args.markdown
        else (out_dir / "handshake-quick.md" if plan.quick else ROOT / "docs" / "benchmarks.md")
    )
    server_kind = args.server or ("gnutls" if shutil.which("gnutls-serv") else "openssl")
    if shutil.which("gnutls-serv" if server_kind == "gnutls" else "openssl") is None:
        raise BenchError(f"the {server_kind} server is not installed (Debian: gnutls-bin or openssl)")
    available = sorted(os.sched_getaffinity(0))
    cpus: dict[str, set[int] | None] = {"client": None, "server": None}
    if len(available) >= 2:
        cpus = {"client": {available[0]}, "server": {available[-1]}}
        os.sched_setaffinity(0, cpus["server"])  # this script mostly waits; keep it off the clients' CPU

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": 1,
        "quick": plan.quick,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="mtls-bench-") as tmp:
        log("set-up: token, keys, certificates, server")
        setup = make_setup(Path(tmp), cpus)
        server = Server(server_kind, setup, max(CLIENTS))
        try:
            result["setup"] = {
                "server": " ".join(Path(c).name if c.startswith("/") else c for c in server.command),
                "server_processes": len(server.procs),
                "server_kind": server_kind,
                "server_cpu": _cpu(cpus["server"]),
                "client_cpu": _cpu(cpus["client"]),
                "rounds": plan.rounds,
                "handshakes_per_cell": plan.handshakes,
                "warmup": plan.warmup,
                "backends": list(setup.backends),
                "skipped": setup.skipped,
            }
            raw = measure_rounds(setup, server, plan, log)
            result["checks"] = raw["checks"]
            result.update(analyse(raw, setup))
            result["calls"] = call_counts(setup, server, plan, log)
            result["cold_start"] = cold_start(setup, server, plan, log)
            result["import_profile"] = import_profile(setup, plan.cold_repeats)
            result["slow_card"] = slow_card(setup, server, plan, log)
        finally:
            server.close()
    result["targets"] = targets(result)
    result["duration_s"] = time.monotonic() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"handshake{suffix}.png"
    if chart(result, png):
        result["chart"] = os.path.relpath(png, md_path.parent.resolve())
    else:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
    json_path = out_dir / f"handshake{suffix}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    tables = markdown(result)
    write_markdown(md_path, tables)
    print(tables)
    print(f"written: {json_path}, {md_path}" + (f", {png}" if result.get("chart") else ""), file=sys.stderr)
    if result["calls"]["checked"] and not result["calls"]["ok"]:
        for row in result["calls"]["rows"]:
            if not row["ok"]:
                print(
                    f"PKCS#11 CALL CHECK FAILED: {row['backend']} {row['key']} TLS {row['tls']} "
                    f"{row['clients']} client(s): {'; '.join(row['problems'])}",
                    file=sys.stderr,
                )
        return 1
    return 0


# ---- the ratio run (--ratios): small interleaved batches, per-cycle ratios --------------------

RATIOS_BEGIN = "<!-- BEGIN GENERATED by benchmarks/handshake.py --ratios: regenerate, do not edit by hand -->"
RATIOS_END = "<!-- END GENERATED RATIOS -->"

# Variants of one P-256 TLS 1.3 client, each in a process of its own (``file@provider``: the
# file key in the provider's process, with a card key loaded there too).
RATIO_VARIANTS = ("file", "prototype", "engine", "provider", "file@provider")
RATIO_LABELS = {
    "file": "file key (a process without mtls_engine)",
    "prototype": "bare ctypes prototype (libp11 engine, key set on the SSL_CTX, no checks, no hooks)",
    "engine": "mtls_engine, engine backend",
    "provider": "mtls_engine, provider backend",
    "file@provider": "file key in the provider backend's process",
}


def prototype_context(uri: str, cert: str, ca: str) -> ssl.SSLContext:
    """The reference: a card key through libp11's engine set on the
    ``SSL_CTX`` with ctypes, with nothing else (no checks, no hooks, no
    validation of the pointer: CPython's layout is taken on trust)."""
    import _ssl
    import ctypes

    # dlsym through _ssl's handle also searches its libssl and libcrypto.
    c = ctypes.CDLL(_ssl.__file__)
    vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for name, res, args in (
        ("ENGINE_by_id", vp, [cp]),
        ("ENGINE_ctrl_cmd_string", i, [vp, cp, cp, i]),
        ("ENGINE_init", i, [vp]),
        ("ENGINE_load_private_key", vp, [vp, cp, vp, vp]),
        ("SSL_CTX_use_certificate_chain_file", i, [vp, cp]),
        ("SSL_CTX_use_PrivateKey", i, [vp, vp]),
    ):
        fn = getattr(c, name)
        fn.restype, fn.argtypes = res, args
    e = c.ENGINE_by_id(b"dynamic")
    commands = (
        (b"SO_PATH", os.environ["T_ENGINE"].encode()), (b"ID", b"pkcs11"), (b"LIST_ADD", b"1"), (b"LOAD", None),
        (b"MODULE_PATH", os.environ["T_MODULE"].encode()), (b"PIN", os.environ["MTLS_BENCH_PIN"].encode()),
    )  # fmt: skip
    for cmd, arg in commands:
        if not e or not c.ENGINE_ctrl_cmd_string(e, cmd, arg, 0):
            raise RuntimeError(f"prototype: ENGINE_ctrl_cmd_string {cmd.decode()} failed")
    pkey = c.ENGINE_init(e) and c.ENGINE_load_private_key(e, uri.encode(), None, None)
    if not pkey:
        raise RuntimeError("prototype: the engine did not load the key")
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not c.SSL_CTX_use_certificate_chain_file(ssl_ctx, cert.encode()) or not c.SSL_CTX_use_PrivateKey(ssl_ctx, pkey):
        raise RuntimeError("prototype: OpenSSL refused the certificate or the key")
    return ctx


def _ratio_worker(setup: Setup, variant: str, key: str, prefix: Sequence[str] = (), tag: str = "") -> Worker:
    """A client process for ``variant``, its contexts open."""
    source = {"file@provider": "provider"}.get(variant, variant)
    env = setup.env(T_ENGINE=setup.engine or "", T_MODULE=setup.module)
    worker = Worker(source, env, setup.cpus["client"], setup.work, tag=tag or f"-{variant}", prefix=prefix)
    cert, pem_key = setup.files[key]
    keys: dict[str, Any] = {"file": {"cert": str(cert), "key": str(pem_key)}} if variant.startswith("file") else {}
    if variant != "file":
        keys["card"] = {"uri": setup.uris[key], "module": setup.module, "cert": str(setup.card_certs[key])}
    worker.call(cmd="open", keys=keys, ca=str(setup.ca))
    return worker


def _ratio_key(variant: str) -> str:
    return "file" if variant.startswith("file") else "card"


def bootstrap_median(values: Sequence[float], rng: random.Random, draws: int = 2000) -> tuple[float, float]:
    """A 95 % interval of the median of ``values`` (bootstrap percentiles)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def ratio_cycles(setup: Setup, server: Server, cycles: int, batch: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Every cycle: each variant does ``batch`` handshakes, in a new random
    order; per cycle, the file key's time over the variant's (wall and
    client CPU: below 1 is slower); medians over cycles, with bootstrap
    intervals."""
    key, tls = "p256", "1.3"
    variants = [v for v in RATIO_VARIANTS if v not in ("engine", "prototype") or setup.engine]
    variants = [v for v in variants if v not in ("provider", "file@provider") or "provider" in setup.backends]
    workers = {v: _ratio_worker(setup, v, key) for v in variants}
    rng = random.Random(1)
    try:
        for v, w in workers.items():
            w.call(cmd="check", key=_ratio_key(v), tls=tls, ports=server.ports)
            w.call(cmd="run", key=_ratio_key(v), tls=tls, ports=server.ports, clients=1, warmup=3 * batch, n=0)
        raw: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for cycle in range(cycles):
            order = list(variants)
            rng.shuffle(order)
            for v in order:
                r = workers[v].call(cmd="run", key=_ratio_key(v), tls=tls, ports=server.ports, clients=1, warmup=0,
                                    n=batch)  # fmt: skip
                raw[v].append({"wall": r["wall"], "cpu": r["cpu"]})
            if cycle % 25 == 24:
                log(f"ratios: {cycle + 1} of {cycles} cycles")
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for v in variants:
        wall = [f["wall"] / x["wall"] for f, x in zip(raw["file"], raw[v])]
        cpu = [f["cpu"] / x["cpu"] for f, x in zip(raw["file"], raw[v]) if x["cpu"] > 0]
        rows.append({
            "variant": v,
            "label": RATIO_LABELS[v],
            "wall_ratio": median(wall), "wall_ci": bootstrap_median(wall, rng),
            "cpu_ratio": median(cpu), "cpu_ci": bootstrap_median(cpu, rng),
            "rate": batch / median(x["wall"] for x in raw[v]),
            "cpu_ms": median(x["cpu"] for x in raw[v]) / batch * 1000,
            # How noisy: the spread of the per-cycle ratios (interquartile range).
            "wall_iqr": percentile(wall, 0.75) - percentile(wall, 0.25),
        })  # fmt: skip
    return {"key": key, "tls": tls, "cycles": cycles, "batch": batch, "rows": rows}


def callgrind_counts(
    setup: Setup, server: Server, counts: tuple[int, int], log: Callable[[str], None]
) -> dict[str, Any]:
    """Instructions per handshake (valgrind --tool=callgrind) for every
    variant: two runs of the same client process, ``counts`` handshakes
    each after the same warm-up; the difference over the difference."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed"}
    key, tls = "p256", "1.3"
    rows = []
    for v in RATIO_VARIANTS:
        if (v in ("engine", "prototype") and not setup.engine) or (
            v in ("provider", "file@provider") and "provider" not in setup.backends
        ):
            continue
        totals = []
        for n in counts:
            out = setup.work / f"callgrind-{v}-{n}.out"
            prefix = ["valgrind", "--tool=callgrind", "--cache-sim=no", "--branch-sim=no", "--dump-instr=no",
                      f"--callgrind-out-file={out}"]  # fmt: skip
            w = _ratio_worker(setup, v, key, prefix=prefix, tag=f"-callgrind-{v}-{n}")
            try:
                w.call(cmd="run", key=_ratio_key(v), tls=tls, ports=server.ports, clients=1, warmup=5, n=n)
            finally:
                w.close()
            text = out.read_text(errors="replace")
            found = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
            if not found:
                raise BenchError(f"callgrind wrote no total for {v}")
            totals.append(int(found[1]))
        per = (totals[1] - totals[0]) / (counts[1] - counts[0])
        rows.append({"variant": v, "label": RATIO_LABELS[v], "instructions": per})
        log(f"callgrind: {v} {per / 1e6:.2f} M instructions per handshake")
    file_i = next((r["instructions"] for r in rows if r["variant"] == "file"), None)
    for r in rows:
        r["vs_file"] = r["instructions"] / file_i - 1 if file_i else None
    return {"key": key, "tls": tls, "handshakes": list(counts), "rows": rows}


# A fresh interpreter, from its start (the parent's clock, just before it is
# started; time.perf_counter is CLOCK_MONOTONIC, the same in both processes)
# to the first completed handshake.
COLD_FULL_SCRIPT = r"""
import os, socket, ssl, sys, time
source = os.environ["T_SOURCE"]
if source == "file":
    ctx = ssl.create_default_context(cafile=os.environ["T_CA"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(os.environ["T_CERT"], os.environ["T_KEY"])
elif source == "prototype":
    exec(os.environ["T_PROTOTYPE"])  # prototype_context's source: nothing else of this script is imported
    ctx = prototype_context(os.environ["T_URI"], os.environ["T_CARD_CERT"], os.environ["T_CA"])
else:
    import mtls_engine
    ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"],
                                     module=os.environ["T_MODULE"], pin=os.environ["MTLS_BENCH_PIN"], backend=source)
tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(os.environ["T_PORT"]))), server_hostname="localhost")
done = time.perf_counter()
tls.close()
print(done)
"""


def cold_full(setup: Setup, server: Server, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Interpreter start to the first completed handshake, fresh processes
    in random order; per repeat the ratio to the file key's, then medians."""
    log("cold start (interpreter start to first handshake)")
    key = "p256"
    sources = ["file", *(["prototype"] if setup.engine else []), *setup.backends]
    rng = random.Random(2)
    runs: dict[str, list[float]] = {s: [] for s in sources}
    cpu: dict[str, list[float]] = {s: [] for s in sources}  # the process's CPU time, less sensitive to load
    for r in range(-1, repeats):  # round -1 primes the bytecode caches and is not counted
        order = list(sources)
        rng.shuffle(order)
        for source in order:
            env = setup.env(T_SOURCE=source, T_CA=str(setup.ca), T_PORT=str(server.port), T_URI=setup.uris[key],
                            T_MODULE=setup.module, T_CERT=str(setup.files[key][0]), T_KEY=str(setup.files[key][1]),
                            T_CARD_CERT=str(setup.card_certs[key]), T_ENGINE=setup.engine or "",
                            T_PROTOTYPE=inspect.getsource(prototype_context))  # fmt: skip
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", COLD_FULL_SCRIPT], capture_output=True, text=True, env=env,
                                  cwd=ROOT, preexec_fn=pinner(setup.cpus["client"]), timeout=60)  # fmt: skip
            if proc.returncode != 0:
                raise BenchError(f"cold start ({source}) failed:\n{proc.stderr[-2000:]}")
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r >= 0:
                runs[source].append((float(proc.stdout.split()[-1]) - start) * 1000)
                cpu[source].append((cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) * 1000)
    rows = []
    for source in sources:
        ratios = [x / f for x, f in zip(runs[source], runs["file"])]
        cpu_ratios = [x / f for x, f in zip(cpu[source], cpu["file"])]
        rows.append({"source": source, "ms": median(runs[source]), "min_ms": min(runs[source]),
                     "vs_file": median(ratios), "vs_file_ci": bootstrap_median(ratios, rng),
                     "cpu_ms": median(cpu[source]), "cpu_vs_file": median(cpu_ratios),
                     "cpu_vs_file_ci": bootstrap_median(cpu_ratios, rng)})  # fmt: skip
    return {"key": key, "repeats": repeats, "rows": rows}


def import_breakdown(setup: Setup, server: Server, backend: str, repeats: int) -> dict[str, Any]:
    """What a card key's cold start imports beyond ``import ssl, socket``
    (``python -X importtime`` on the cold-start script): self time by
    module, medians of ``repeats`` fresh processes."""
    key = "p256"
    per_module: dict[str, list[float]] = {}
    totals = []
    for _ in range(repeats):
        env = setup.env(T_SOURCE=backend, T_CA=str(setup.ca), T_PORT=str(server.port), T_URI=setup.uris[key],
                        T_MODULE=setup.module)  # fmt: skip
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ssl, socket\n" + COLD_FULL_SCRIPT],
                              capture_output=True, text=True, env=env, cwd=ROOT,
                              preexec_fn=pinner(setup.cpus["client"]), timeout=60)  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"import breakdown ({backend}) failed:\n{proc.stderr[-2000:]}")
        parsed = [m for m in map(_IMPORT_LINE.match, proc.stderr.splitlines()) if m]
        # Everything after the script's own "import ssl, socket" (the last top-level socket line).
        start = max(i for i, m in enumerate(parsed) if m[4] in ("ssl", "socket") and len(m[3]) == 1) + 1
        seen: Counter[str] = Counter()
        for m in parsed[start:]:
            seen[m[4]] += int(m[1]) / 1000
        totals.append(sum(seen.values()))
        for name, ms in seen.items():
            per_module.setdefault(name, []).append(ms)
    by_group: Counter[str] = Counter()
    for name, values in per_module.items():
        top = name.split(".")[0]
        group = name if top == "mtls_engine" else ("cryptography" if top == "cryptography" else "standard library")
        by_group[group] += median(values) * len(values) / repeats
    largest = sorted(((median(v), k) for k, v in per_module.items()), reverse=True)[:12]
    return {
        "backend": backend,
        "total_ms": median(totals),
        "modules": len(per_module),
        "by_group_ms": dict(by_group.most_common()),
        "largest_ms": {k: ms for ms, k in largest},
        "cryptography_imported": any(k.split(".")[0] == "cryptography" for k in per_module),
    }


def ratios_markdown(result: dict[str, Any]) -> str:
    out = []
    r = result["ratios"]
    m = result["machine"]
    out.append(
        f"Run {result['started']} ({'quick' if result['quick'] else 'full'}, {result['duration_s']:.0f} s): "
        f"Python {m['python']}, {m['openssl']}, {m['cpus']} CPUs, load average at the start "
        f"{result['loadavg']}. P-256 client key, TLS {r['tls']}, full handshakes against "
        f"`{result['server']}` in another process; {r['cycles']} cycles of {r['batch']}-handshake batches per "
        "variant, in a new random order each cycle; per cycle the file key's time over the variant's "
        "(below 1: slower), then the median over cycles, with a 95 % bootstrap interval.\n"
    )
    out.append("| variant | rate vs file key (wall) [95 %] | client CPU vs file key [95 %] | handshakes/s | "
               "client CPU ms | spread of wall ratios (IQR) | instructions / handshake |")  # fmt: skip
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    instructions = {row["variant"]: row for row in result.get("callgrind", {}).get("rows", [])}
    for row in r["rows"]:
        ins = instructions.get(row["variant"])
        ins_text = (
            "-"
            if ins is None
            else f"{ins['instructions'] / 1e6:.2f} M"
            + (f" ({ins['vs_file'] * 100:+.1f} %)" if ins["vs_file"] and row["variant"] != "file" else "")
        )
        out.append(
            f"| {row['label']} | {row['wall_ratio']:.3f} [{row['wall_ci'][0]:.3f}, {row['wall_ci'][1]:.3f}] | "
            f"{row['cpu_ratio']:.3f} [{row['cpu_ci'][0]:.3f}, {row['cpu_ci'][1]:.3f}] | {row['rate']:.0f} | "
            f"{row['cpu_ms']:.3f} | {row['wall_iqr']:.3f} | {ins_text} |"
        )
    cg = result.get("callgrind", {})
    if cg.get("skipped"):
        out.append(f"\nInstruction counts: not measured ({cg['skipped']}).")
    elif cg:
        out.append(f"\nInstructions per handshake: `valgrind --tool=callgrind`, the client process only, "
                   f"({cg['handshakes'][1]} - {cg['handshakes'][0]}) handshakes after 5 of warm-up "
                   "(the difference of two runs over the difference of their handshakes).")  # fmt: skip
    c = result["cold"]
    out.append(f"\n### Cold start (interpreter start to the first completed handshake; median of {c['repeats']})\n")
    out.append("| key source | wall ms | fastest | wall x file key [95 %] | process CPU ms | CPU x file key [95 %] |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for row in c["rows"]:
        lo, hi = row["vs_file_ci"]
        clo, chi = row["cpu_vs_file_ci"]
        out.append(f"| {RATIO_LABELS.get(row['source'], row['source'])} | {row['ms']:.1f} | {row['min_ms']:.1f} | "
                   f"{row['vs_file']:.2f} [{lo:.2f}, {hi:.2f}] | {row['cpu_ms']:.1f} | "
                   f"{row['cpu_vs_file']:.2f} [{clo:.2f}, {chi:.2f}] |")  # fmt: skip
    for imp in result["imports"]:
        groups = ", ".join(f"{k} {v:.1f}" for k, v in imp["by_group_ms"].items() if v >= 0.3)
        largest = ", ".join(f"{k} {v:.1f}" for k, v in imp["largest_ms"].items())
        out.append(
            f"\nImports of a card key's cold start ({imp['backend']}), beyond `import ssl, socket` "
            f"(`python -X importtime`, self time, median of runs): {imp['total_ms']:.1f} ms in "
            f"{imp['modules']} modules; cryptography imported: {'yes' if imp['cryptography_imported'] else 'no'}. "
            f"By module group (ms): {groups}. Largest (ms): {largest}."
        )
    return "\n".join(out) + "\n"


def write_ratios_markdown(path: Path, tables: str) -> None:
    block = f"{RATIOS_BEGIN}\n{tables}{RATIOS_END}\n"
    text = path.read_text() if path.exists() else "# Handshake benchmark\n"
    if RATIOS_BEGIN in text and RATIOS_END in text:
        head, rest = text.split(RATIOS_BEGIN, 1)
        text = head + block + rest.split(RATIOS_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n## Side by side with the prototype (`--ratios`)\n\n" + block
    path.write_text(text)


def run_ratios(args: argparse.Namespace) -> int:
    """The --ratios run: see ratio_cycles, callgrind_counts, cold_full."""
    quick = args.quick
    cycles = args.cycles or (4 if quick else 150)
    out_dir = Path(args.output).resolve()
    md_path = (
        Path(args.markdown)
        if args.markdown
        else (out_dir / "ratios-quick.md" if quick else ROOT / "docs" / "benchmarks.md")
    )
    server_kind = args.server or ("gnutls" if shutil.which("gnutls-serv") else "openssl")
    available = sorted(os.sched_getaffinity(0))
    cpus: dict[str, set[int] | None] = {"client": None, "server": None}
    if len(available) >= 2:
        cpus = {"client": {available[0]}, "server": {available[-1]}}
        os.sched_setaffinity(0, cpus["server"])
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "schema": 1,
        "quick": quick,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="mtls-ratios-") as tmp:
        log("set-up: token, keys, certificates, server")
        setup = make_setup(Path(tmp), cpus)
        server = Server(server_kind, setup, 1)
        try:
            result["server"] = " ".join(Path(c).name if c.startswith("/") else c for c in server.command[:2])
            result["ratios"] = ratio_cycles(setup, server, cycles, args.batch, log)
            if args.callgrind:
                counts = (
                    (5, 5 + args.callgrind_handshakes) if args.callgrind_handshakes else (5, 10) if quick else (10, 40)
                )
                result["callgrind"] = callgrind_counts(setup, server, counts, log)
            result["cold"] = cold_full(setup, server, args.cold_repeats or (2 if quick else 15), log)
            result["imports"] = [import_breakdown(setup, server, b, 1 if quick else 7) for b in setup.backends[:1]]
        finally:
            server.close()
    result["duration_s"] = time.monotonic() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"ratios{'-quick' if quick else ''}.json").write_text(json.dumps(result, indent=2) + "\n")
    tables = ratios_markdown(result)
    write_ratios_markdown(md_path, tables)
    print(tables)
    return 0


def _cpu(cpus: set[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "any (not pinned)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, tiny samples (CI smoke test)")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved measurements (default 5; quick 1)")
    parser.add_argument("--server", choices=("gnutls", "openssl"), help="gnutls-serv (default) or openssl s_server")
    parser.add_argument("--output", default=str(HERE / "results"), help="folder for the JSON and PNG files")
    parser.add_argument("--markdown", help="Markdown file to update (default docs/benchmarks.md)")
    parser.add_argument(
        "--ratios",
        action="store_true",
        help="the side-by-side run: file key, bare prototype, engine, provider in small interleaved "
        "batches, cold start from interpreter start, import breakdown",
    )
    parser.add_argument("--cycles", type=int, help="--ratios: cycles of batches (default 150; quick 4)")
    parser.add_argument("--batch", type=int, default=10, help="--ratios: handshakes per batch (default 10)")
    parser.add_argument("--cold-repeats", type=int, help="--ratios: cold starts per key source (default 15)")
    parser.add_argument("--callgrind-handshakes", type=int, help="--ratios: handshakes counted by callgrind (30)")
    parser.add_argument("--callgrind", action="store_true", help="--ratios: instructions per handshake (valgrind)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    try:
        return run_ratios(args) if args.ratios else run(args)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
