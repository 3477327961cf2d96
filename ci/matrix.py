#!/usr/bin/env python3
"""Compatibility matrix: every CPython 3.9-3.15 on this machine, both backends.

For each interpreter found (pyenv's versions, and the system's
/usr/bin/python3.N and debug python3.Nd), this builds mtls_engine *for that
interpreter* into a virtual environment of its own under the cache folder
(non-editable, from a snapshot of the source, so the abi3 extension built
for one interpreter can never be picked up by another), proves the tests
import that installed copy, runs the end-to-end tests against real SoftHSM2
tokens for the engine and the provider, and prints a summary table.

    python ci/matrix.py                      # every interpreter, full test set
    python ci/matrix.py --quick              # handshakes + interpreter checks only
    python ci/matrix.py --pythons 3.9,3.13   # by minor version, label or path
    python ci/matrix.py --ci --quick         # oldest + newest + default (what CI runs)
    python ci/matrix.py --list               # what would run, build nothing

Results: a table on stdout, JSON in <cache>/results.json, logs per
interpreter in <cache>/<label>/.  Exit status 1 when anything failed.
Free-threaded builds and other implementations are expected to be refused
at import with InterpreterSslError; that refusal is what is checked for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OLDEST, NEWEST = (3, 9), (3, 15)  # 3.14 and 3.15: Debian sid's (ci/newest.sh)
QUICK_TESTS = ("tests/test_handshake.py::test_card_key_handshake", "tests/test_interpreter.py")
FULL_TESTS = (
    "tests/test_handshake.py",
    "tests/test_interpreter.py",
    "tests/test_server.py",
    "tests/test_errors.py",
    "tests/test_present.py",
    "tests/test_teardown.py",
)
# pyenv names a CPython release "3.12.1", a free-threaded one "3.13.0t", a
# debug build "3.12.1-debug"; everything else (pypy3.10-7.3.17, miniconda3-…,
# graalpy-…) is another distribution or implementation.
PYENV_CPYTHON = re.compile(r"^(\d+)\.(\d+)\.\d+(?:(?:a|b|rc)\d+)?(t)?(-debug)?$")
SYSTEM_PYTHON = re.compile(r"^python3\.(\d+)(d?)$")

PROBE = r"""
import json, platform, ssl, sys, sysconfig
print(json.dumps({
    "implementation": platform.python_implementation(),
    "version": platform.python_version(),
    "minor": list(sys.version_info[:2]),
    "debug": hasattr(sys, "gettotalrefcount"),
    "trace_refs": hasattr(sys, "getobjects"),
    "free_threaded": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    "openssl": ssl.OPENSSL_VERSION,
    "executable": sys.executable,
}))
"""

# Imports only mtls_engine._errors and _lib from a source folder: the
# interpreter checks run before anything needs the extension or a dependency.
REFUSAL_PROBE = r"""
import sys, types
pkg = types.ModuleType("mtls_engine")
pkg.__path__ = [sys.argv[1]]
sys.modules["mtls_engine"] = pkg
try:
    import mtls_engine._lib
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc))
    sys.exit(0 if type(exc).__name__ == "InterpreterSslError" else 1)
print("imported without a refusal")
sys.exit(1)
"""

INSTALLED_PROBE = r"""
import json, ssl, mtls_engine
from mtls_engine import _backends, _binding
print(json.dumps({
    "file": mtls_engine.__file__,
    "binding": _binding.__file__,
    "openssl": ssl.OPENSSL_VERSION,
    "backends": {name: list(status()) for name, status in _backends.STATUS.items()},
}))
"""


@dataclass
class Interpreter:
    label: str
    executable: str
    source: str  # "pyenv" or "system" or "given"
    version: str = ""
    minor: tuple[int, int] = (0, 0)
    implementation: str = ""
    debug: bool = False
    trace_refs: bool = False
    free_threaded: bool = False
    openssl: str = ""
    default: bool = False

    @property
    def build(self) -> str:
        flags = [n for n, on in (("debug", self.debug), ("trace-refs", self.trace_refs),
                                 ("free-threaded", self.free_threaded)) if on]  # fmt: skip
        if self.implementation and self.implementation != "CPython":
            flags.insert(0, self.implementation)
        return "+".join(flags) or "release"

    @property
    def expect_refusal(self) -> bool:
        return self.implementation != "CPython" or self.free_threaded


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    def __str__(self) -> str:
        return f"{self.passed}/{self.failed}/{self.skipped}"


@dataclass
class Result:
    interpreter: Interpreter
    status: str = "not run"  # passed | failed | refused as designed | …
    detail: str = ""
    seconds: float = 0.0
    counts: dict[str, Counts] = field(default_factory=lambda: {k: Counts() for k in ("engine", "provider", "other")})
    handshakes: dict[str, str] = field(default_factory=dict)
    tested_copy: str = ""
    backends: dict[str, Any] = field(default_factory=dict)
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "refused as designed")

    def totals(self) -> Counts:
        t = Counts()
        for c in self.counts.values():
            t.passed += c.passed
            t.failed += c.failed
            t.skipped += c.skipped
        if not self.ok and t.failed == 0:
            t.failed = 1  # a build or set-up failure counts as one failure
        if self.status == "refused as designed":
            t.passed += 1
        return t


# ---- discovery -----------------------------------------------------------------


def pyenv_root(env: dict[str, str] | None = None) -> Path | None:
    """$PYENV_ROOT, else what `pyenv root` says, else ~/.pyenv if it exists."""
    env = dict(os.environ if env is None else env)
    if env.get("PYENV_ROOT"):
        return Path(env["PYENV_ROOT"])
    exe = shutil.which("pyenv", path=env.get("PATH"))
    if exe:
        proc = subprocess.run([exe, "root"], capture_output=True, text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            return Path(proc.stdout.strip())
    home = Path(env.get("HOME", str(Path.home()))) / ".pyenv"
    return home if (home / "versions").is_dir() else None


def pyenv_default(root: Path | None) -> str | None:
    """The version pyenv runs by default ($PYENV_VERSION, else <root>/version)."""
    if os.environ.get("PYENV_VERSION"):
        return os.environ["PYENV_VERSION"].split(":")[0]
    if root is not None:
        try:
            first = (root / "version").read_text().split()
        except OSError:
            first = []
        if first:
            return first[0]
    return None


def pyenv_candidates(root: Path) -> tuple[list[Interpreter], list[str]]:
    """CPython OLDEST-NEWEST builds under <root>/versions, and the names skipped."""
    found: list[Interpreter] = []
    skipped: list[str] = []
    versions = root / "versions"
    for d in sorted(versions.iterdir() if versions.is_dir() else [], key=lambda p: (_version_key(p.name), p.name)):
        m = PYENV_CPYTHON.match(d.name)
        if not m:
            skipped.append(f"{d.name} (not CPython)")
            continue
        minor = (int(m.group(1)), int(m.group(2)))
        if not OLDEST <= minor <= NEWEST:
            skipped.append(f"{d.name} (outside {OLDEST[0]}.{OLDEST[1]}-{NEWEST[0]}.{NEWEST[1]})")
            continue
        exe = _first_executable(d / "bin", ["python3", f"python3.{minor[1]}{m.group(3) or ''}", "python"])
        if exe is None:
            skipped.append(f"{d.name} (no python executable)")
            continue
        found.append(Interpreter(label=d.name, executable=str(exe), source="pyenv"))
    return found, skipped


def system_candidates(dirs: Iterable[Path] = (Path("/usr/bin"), Path("/usr/local/bin"))) -> list[Interpreter]:
    """python3.N and debug python3.Nd in the system's folders, OLDEST-NEWEST."""
    found: list[Interpreter] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir(), key=lambda p: (_version_key(p.name), p.name)):
            m = SYSTEM_PYTHON.match(p.name)
            if m and OLDEST <= (3, int(m.group(1))) <= NEWEST and os.access(p, os.X_OK):
                found.append(Interpreter(label=f"{p.name}-system", executable=str(p), source="system"))
    return found


def dedupe(interpreters: Iterable[Interpreter]) -> list[Interpreter]:
    seen: set[str] = set()
    out: list[Interpreter] = []
    for i in interpreters:
        key = os.path.realpath(i.executable)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def probe(interp: Interpreter) -> str | None:
    """Fill in what the interpreter says about itself; an error text or None."""
    try:
        proc = subprocess.run([interp.executable, "-I", "-c", PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["no output"])[-1]
    info = json.loads(proc.stdout)
    interp.implementation = info["implementation"]
    interp.version = info["version"]
    interp.minor = (info["minor"][0], info["minor"][1])
    interp.debug = info["debug"]
    interp.trace_refs = info["trace_refs"]
    interp.free_threaded = info["free_threaded"]
    interp.openssl = info["openssl"]
    return None


def missing_minors(found: Iterable[Interpreter]) -> list[str]:
    have = {i.minor for i in found}
    return [f"3.{m}" for m in range(OLDEST[1], NEWEST[1] + 1) if (3, m) not in have]


def select(found: Sequence[Interpreter], pythons: Sequence[str] | None, ci: bool) -> list[Interpreter]:
    """--pythons: each entry a minor version ("3.9"), a label ("3.11.7",
    "python3.11-system") or an executable path; --ci: the oldest and newest
    version present plus the default interpreter."""
    chosen = list(found)
    if pythons:
        chosen = [i for i in found if any(_matches(i, want) for want in pythons)]
    if ci and chosen:
        # Oldest and newest among plain release builds where there are any
        # (a free-threaded or debug build is an extra, not the representative).
        plain = [i for i in chosen if i.build == "release"] or chosen
        ranked = sorted(plain, key=lambda i: (i.minor, _version_key(i.version), i.source == "pyenv"))
        picks = [ranked[0], ranked[-1], *[i for i in chosen if i.default]]
        chosen = [i for i in chosen if any(i is p for p in picks)]
    return chosen


def _matches(interp: Interpreter, want: str) -> bool:
    want = want.strip()
    if not want:
        return False
    if "/" in want:
        return os.path.realpath(want) == os.path.realpath(interp.executable)
    if re.fullmatch(r"3\.\d+", want):
        return f"{interp.minor[0]}.{interp.minor[1]}" == want
    return want in (interp.label, interp.version)


def _first_executable(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        p = folder / n
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


# ---- results -----------------------------------------------------------------------


def backend_of(test_name: str) -> str:
    """engine / provider from a test id's parameters, else other."""
    m = re.search(r"\[(.*)\]$", test_name)
    parts = m.group(1).split("-") if m else []
    for b in ("engine", "provider"):
        if b in parts:
            return b
    return "other"


def parse_junit(path: Path) -> tuple[dict[str, Counts], dict[str, str]]:
    """Outcome counts per backend, and per backend how many of the
    test_card_key_handshake cases (RSA/EC by TLS 1.2/1.3) passed."""
    counts = {k: Counts() for k in ("engine", "provider", "other")}
    hs_total: dict[str, int] = {}
    hs_ok: dict[str, int] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        b = backend_of(name)
        counts[b].add(outcome)
        if name.startswith("test_card_key_handshake[") and b != "other":
            hs_total[b] = hs_total.get(b, 0) + 1
            hs_ok[b] = hs_ok.get(b, 0) + (outcome == "passed")
    return counts, {b: f"{hs_ok[b]}/{hs_total[b]}" for b in sorted(hs_total)}


def render_table(results: Sequence[Result]) -> str:
    head = ["Python", "build", "from", "OpenSSL (ssl module)", "engine p/f/s", "provider p/f/s", "other p/f/s",
            "handshakes engine, provider", "result", "time"]  # fmt: skip
    rows = [head]
    for r in results:
        i = r.interpreter
        rows.append([
            i.version + (" (default)" if i.default else ""), i.build, i.source, i.openssl,
            str(r.counts["engine"]), str(r.counts["provider"]), str(r.counts["other"]),
            ", ".join(r.handshakes.get(b, "-") for b in ("engine", "provider")),
            r.status, f"{r.seconds:.0f} s",
        ])  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---- building and testing one interpreter -----------------------------------------


def _run(cmd: Sequence[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 1800) -> int:  # fmt: skip
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            out.write(f"timed out after {timeout:.0f} s\n")
            return 124
    return proc.returncode


def snapshot_source(dest: Path) -> None:
    """What building the package needs, copied (no compiled extension)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    # The package with its subpackages (mtls_engine.testing), sources only.
    shutil.copytree(ROOT / "mtls_engine", dest / "mtls_engine",
                    ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or n == "py.typed"
                                                                    or os.path.isdir(os.path.join(d, n)))
                                             or n == "__pycache__"])  # fmt: skip


def snapshot_tests(dest: Path) -> None:
    """The tests and pytest's settings, in a folder with no mtls_engine in it,
    so only the copy installed in the venv can be imported."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__", "build", "*.so"))


def _env(venv: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["MTLS_MATRIX_VENV"] = str(venv)
    return env


def _venv_key(interp: Interpreter) -> str:
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    h.update(f"{os.path.realpath(interp.executable)} {interp.version} {interp.build}".encode())
    return h.hexdigest()


def run_one(interp: Interpreter, cache: Path, tests: Sequence[str], extra: Sequence[str]) -> Result:
    result = Result(interp)
    work = cache / interp.label
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text(f"{interp.label}: {interp.executable} ({interp.build})\n")
    result.log = str(log)
    start = time.monotonic()
    try:
        _run_one(result, work, log, tests, extra)
    finally:
        result.seconds = time.monotonic() - start
    return result


def _fail(result: Result, status: str, log: Path) -> None:
    result.status = status
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    result.detail = "\n".join(tail)


def _run_one(result: Result, work: Path, log: Path, tests: Sequence[str], extra: Sequence[str]) -> None:
    interp = result.interpreter
    src = work / "src"
    snapshot_source(src)
    if interp.expect_refusal:
        proc = subprocess.run([interp.executable, "-I", "-c", REFUSAL_PROBE, str(src / "mtls_engine")],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        result.detail = (proc.stdout + proc.stderr).strip()
        result.status = "refused as designed" if proc.returncode == 0 else "not refused"
        return
    venv = work / "venv"
    marker = venv / ".mtls-matrix-key"
    key = _venv_key(interp)
    py = str(venv / "bin" / "python")
    env = _env(venv)
    fresh = not (marker.exists() and marker.read_text() == key)
    if fresh:
        if venv.exists():
            shutil.rmtree(venv)
        if _run([interp.executable, "-m", "venv", str(venv)], log, env=_env(None)) != 0:
            return _fail(result, "venv failed", log)
        if _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=65", "wheel", "cffi>=1.15"],
                log, env=env) != 0:  # fmt: skip
            return _fail(result, "pip failed", log)
        # The package with its test dependencies, built for this interpreter.
        cmd = [py, "-m", "pip", "install", "-q", "--no-build-isolation", f"{src}[test]"]
    else:
        cmd = [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--force-reinstall", str(src)]
    if _run(cmd, log, cwd=work, env=env) != 0:
        return _fail(result, "build failed", log)
    marker.write_text(key)
    run_dir = work / "run"
    snapshot_tests(run_dir)
    proc = subprocess.run([py, "-c", INSTALLED_PROBE], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if proc.returncode != 0:
        with log.open("a") as out:
            out.write(proc.stdout + proc.stderr)
        return _fail(result, "import failed", log)
    installed = json.loads(proc.stdout)
    result.tested_copy = installed["binding"]
    result.backends = installed["backends"]
    site = str(venv.resolve()) + os.sep
    if not all(os.path.realpath(installed[k]).startswith(site) for k in ("file", "binding")):
        result.detail = f"imported {installed['file']}, not the copy installed in {venv}"
        result.status = "wrong copy"
        return
    junit = work / "junit.xml"
    if junit.exists():
        junit.unlink()
    cmd = [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}",
           "-o", "junit_family=xunit2", *tests, *extra]  # fmt: skip
    rc = _run(cmd, log, cwd=run_dir, env=env)
    if junit.exists():
        result.counts, result.handshakes = parse_junit(junit)
    if rc != 0:
        return _fail(result, "tests failed" if junit.exists() else f"pytest exit {rc}", log)
    result.status = "passed"


# ---- main ------------------------------------------------------------------------------


def discover(extra_dirs: bool = True) -> tuple[list[Interpreter], list[str]]:
    root = pyenv_root()
    found: list[Interpreter] = []
    notes: list[str] = []
    if root is not None:
        from_pyenv, skipped = pyenv_candidates(root)
        found += from_pyenv
        notes += [f"pyenv {s}" for s in skipped]
        default = pyenv_default(root)
        for i in found:
            i.default = i.label == default
    else:
        notes.append("pyenv: not found (no pyenv on PATH, no $PYENV_ROOT, no ~/.pyenv)")
    if extra_dirs:
        found += system_candidates()
    found = dedupe(found)
    usable: list[Interpreter] = []
    for i in found:
        err = probe(i)
        if err:
            notes.append(f"{i.label}: cannot run {i.executable} ({err})")
        else:
            usable.append(i)
    return usable, notes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the handshake tests and the interpreter checks")
    ap.add_argument("--pythons", help="comma-separated: minor versions (3.9), labels (3.11.7) or paths")
    ap.add_argument("--ci", action="store_true", help="only the oldest and newest version found, and the default")
    ap.add_argument("--no-system", action="store_true", help="only pyenv's interpreters, not /usr/bin/python3.N")
    ap.add_argument("--cache", default=str(ROOT / ".matrix"), help="where venvs, logs and results go")
    ap.add_argument("--list", action="store_true", help="show what would run; build nothing")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    found, notes = discover(extra_dirs=not args.no_system)
    pythons = args.pythons.split(",") if args.pythons else None
    if pythons:
        for want in pythons:
            if "/" in want and not any(_matches(i, want) for i in found):
                extra = Interpreter(label=Path(want).name + "-given", executable=want, source="given")
                err = probe(extra)
                notes.append(f"{want}: cannot run ({err})") if err else found.append(extra)
    chosen = select(found, pythons, args.ci)
    tests = QUICK_TESTS if args.quick else FULL_TESTS

    print(f"== matrix: CPython {OLDEST[0]}.{OLDEST[1]}-{NEWEST[0]}.{NEWEST[1]}, engine and provider; "
          f"tests: {' '.join(tests)}")  # fmt: skip
    for i in found:
        mark = "run " if any(i is c for c in chosen) else "skip"
        print(f"   {mark} {i.label:<22} {i.version:<8} {i.build:<14} {i.openssl}  {i.executable}"
              + ("  (default)" if i.default else ""))  # fmt: skip
    for m in missing_minors(found):
        print(f"   not installed: CPython {m} (skipped)")
    for n in notes:
        print(f"   ignored: {n}")
    if args.list:
        return 0
    if not chosen:
        span = f"{OLDEST[0]}.{OLDEST[1]}-{NEWEST[0]}.{NEWEST[1]}"
        print(f"== matrix: no CPython {span} interpreter selected; nothing to run")
        print("matrix: 0 passed, 0 failed")
        return 0

    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("# written by ci/matrix.py: nothing here is source\n*\n")
    results: list[Result] = []
    started = time.monotonic()
    for i in chosen:
        print(f"== {i.label}: {i.executable}", flush=True)
        r = run_one(i, cache, tests, args.pytest_args)
        results.append(r)
        t = r.totals()
        print(f"   {r.status} in {r.seconds:.0f} s: {t.passed} passed, {t.failed} failed, {t.skipped} skipped"
              + (f"; tested {r.tested_copy}" if r.tested_copy else ""), flush=True)  # fmt: skip
        if r.detail and (not r.ok or r.status == "refused as designed"):
            print("   " + r.detail.replace("\n", "\n   "))

    out = cache / "results.json"
    out.write_text(json.dumps({
        "command": " ".join(["python", "ci/matrix.py", *(argv if argv is not None else sys.argv[1:])]),
        "tests": list(tests),
        "missing": missing_minors(found),
        "results": [{**asdict(r), "counts": {k: asdict(v) for k, v in r.counts.items()}, "ok": r.ok}
                    for r in results],
    }, indent=2, default=str))  # fmt: skip
    print()
    print(render_table(results))
    print(f"\n(p/f/s = passed/failed/skipped tests; results in {out})")
    print(f"== matrix: {len(results)} interpreter(s) in {time.monotonic() - started:.0f} s")
    total = Counts()
    for r in results:
        t = r.totals()
        total.passed += t.passed
        total.failed += t.failed
        total.skipped += t.skipped
    print(f"matrix: {total.passed} passed, {total.failed} failed, {total.skipped} skipped")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
