"""The compatibility matrix's own logic (ci/matrix.py: which interpreters it
finds, which it picks for CI, how it counts and reports) and the Debian
detection in ci/setup.sh --detect (folders from OpenSSL, never hard-coded),
all on stand-ins: fake pyenv roots, fake interpreters, a fake ``openssl``."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .helpers import ROOT

MATRIX_PATH = ROOT / "ci" / "matrix.py"
if not MATRIX_PATH.exists():  # the matrix runs the tests from a copy without ci/
    pytest.skip("ci/matrix.py is not beside these tests", allow_module_level=True)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mtls_ci_matrix", MATRIX_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


matrix = _load()


def fake_python(path: Path, version: str, **facts: object) -> Path:
    """An executable that answers the matrix's probe like that interpreter."""
    info = {
        "implementation": "CPython", "version": version, "minor": [int(n) for n in version.split(".")[:2]],
        "debug": False, "trace_refs": False, "free_threaded": False, "openssl": "OpenSSL 3.5.9",
        "executable": str(path),
    }  # fmt: skip
    info.update(facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{json.dumps(info)}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def pyenv_root(tmp_path: Path) -> Path:
    root = tmp_path / "pyenv"
    v = root / "versions"
    fake_python(v / "3.9.18" / "bin" / "python3", "3.9.18")
    fake_python(v / "3.11.7" / "bin" / "python3", "3.11.7")
    fake_python(v / "3.12.1-debug" / "bin" / "python3", "3.12.1", debug=True, trace_refs=True)
    fake_python(v / "3.13.0" / "bin" / "python3", "3.13.0")
    fake_python(v / "3.13.0t" / "bin" / "python3.13t", "3.13.0", free_threaded=True)
    fake_python(v / "3.8.18" / "bin" / "python3", "3.8.18")
    fake_python(v / "2.7.18" / "bin" / "python", "2.7.18")
    fake_python(v / "pypy3.10-7.3.17" / "bin" / "python3", "3.10.14", implementation="PyPy")
    (v / "3.10.13" / "bin").mkdir(parents=True)  # a broken install: no executable
    (root / "version").write_text("3.11.7\n")
    return root


def test_pyenv_versions_found_and_skipped(pyenv_root: Path) -> None:
    found, skipped = matrix.pyenv_candidates(pyenv_root)
    assert [i.label for i in found] == ["3.9.18", "3.11.7", "3.12.1-debug", "3.13.0", "3.13.0t"]
    assert found[-1].executable.endswith("3.13.0t/bin/python3.13t")
    assert sorted(skipped) == sorted([
        "2.7.18 (outside 3.9-3.15)", "3.8.18 (outside 3.9-3.15)", "3.10.13 (no python executable)",
        "pypy3.10-7.3.17 (not CPython)",
    ])  # fmt: skip


def test_pyenv_root_from_environment_and_home(tmp_path: Path, pyenv_root: Path) -> None:
    assert matrix.pyenv_root({"PYENV_ROOT": str(pyenv_root), "PATH": ""}) == pyenv_root
    home = tmp_path / "home"
    assert matrix.pyenv_root({"HOME": str(home), "PATH": ""}) is None
    (home / ".pyenv" / "versions").mkdir(parents=True)
    assert matrix.pyenv_root({"HOME": str(home), "PATH": ""}) == home / ".pyenv"


def test_system_pythons(tmp_path: Path) -> None:
    for name in ("python3", "python3.11", "python3.11d", "python3.8", "python3.15", "python3.16", "python3.11-config"):
        fake_python(tmp_path / name, "3.11.2")
    found = matrix.system_candidates([tmp_path, tmp_path / "missing"])
    assert [i.label for i in found] == ["python3.11-system", "python3.11d-system", "python3.15-system"]


def _probed(pyenv_root: Path) -> list[object]:
    found, _ = matrix.pyenv_candidates(pyenv_root)
    for i in found:
        assert matrix.probe(i) is None
        i.default = i.label == "3.11.7"
    return found


def test_probe_and_build_names(pyenv_root: Path) -> None:
    by_label = {i.label: i for i in _probed(pyenv_root)}  # type: ignore[attr-defined]
    assert by_label["3.12.1-debug"].build == "debug+trace-refs"
    assert by_label["3.13.0t"].build == "free-threaded" and by_label["3.13.0t"].expect_refusal
    assert by_label["3.9.18"].build == "release" and not by_label["3.9.18"].expect_refusal
    assert matrix.missing_minors(by_label.values()) == ["3.10", "3.14", "3.15"]


def test_ci_selection_is_oldest_newest_and_default(pyenv_root: Path) -> None:
    found = _probed(pyenv_root)
    ci = matrix.select(found, None, ci=True)
    assert [i.label for i in ci] == ["3.9.18", "3.11.7", "3.13.0"]  # not the free-threaded 3.13.0t


def test_selection_by_version_label_and_path(pyenv_root: Path) -> None:
    found = _probed(pyenv_root)
    assert [i.label for i in matrix.select(found, ["3.13"], ci=False)] == ["3.13.0", "3.13.0t"]
    assert [i.label for i in matrix.select(found, ["3.9", "3.12.1-debug"], ci=False)] == ["3.9.18", "3.12.1-debug"]
    path = str(pyenv_root / "versions" / "3.11.7" / "bin" / "python3")
    assert [i.label for i in matrix.select(found, [path], ci=False)] == ["3.11.7"]
    assert matrix.select(found, ["3.7"], ci=False) == []


def test_list_says_what_runs_and_what_is_missing(pyenv_root: Path) -> None:
    env = {**os.environ, "PYENV_ROOT": str(pyenv_root)}
    env.pop("PYENV_VERSION", None)
    proc = subprocess.run(
        [sys.executable, str(MATRIX_PATH), "--list", "--no-system", "--pythons", "3.9,3.11"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "run  3.9.18" in out and "run  3.11.7" in out and "(default)" in out
    assert "skip 3.13.0t" in out and "free-threaded" in out
    assert "not installed: CPython 3.10 (skipped)" in out
    assert "ignored: pyenv pypy3.10-7.3.17 (not CPython)" in out


def test_backend_of_test_ids() -> None:
    assert matrix.backend_of("test_card_key_handshake[engine-RSA2048-TLSv1_2]") == "engine"
    assert matrix.backend_of("test_card_key_handshake[TLSv1_3-P256-provider]") == "provider"
    assert matrix.backend_of("test_x[provider]") == "provider"
    assert matrix.backend_of("test_load_card_key_reports_what_it_attached") == "other"
    assert matrix.backend_of("test_header_size_follows_the_build[trace-refs-3.12]") == "other"


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="t" name="test_card_key_handshake[engine-RSA2048-TLSv1_2]"/>
<testcase classname="t" name="test_card_key_handshake[engine-P256-TLSv1_3]"><failure message="x"/></testcase>
<testcase classname="t" name="test_card_key_handshake[provider-P256-TLSv1_3]"/>
<testcase classname="t" name="test_certificate_by_uri[provider]"><skipped message="y"/></testcase>
<testcase classname="t" name="test_refused_builds[pypy]"/>
<testcase classname="t" name="test_broken"><error message="z"/></testcase>
</testsuite></testsuites>
"""


def test_junit_counts_per_backend(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    counts, handshakes = matrix.parse_junit(path)
    assert str(counts["engine"]) == "1/1/0"
    assert str(counts["provider"]) == "1/0/1"
    assert str(counts["other"]) == "1/1/0"
    assert handshakes == {"engine": "1/2", "provider": "1/1"}


def test_summary_table_and_totals(pyenv_root: Path, tmp_path: Path) -> None:
    found = _probed(pyenv_root)
    ok = matrix.Result(found[1], status="passed", seconds=12.4, handshakes={"engine": "6/6", "provider": "6/6"})
    ok.counts["engine"].passed = 6
    broken = matrix.Result(found[0], status="build failed")
    refused = matrix.Result(found[-1], status="refused as designed")
    table = matrix.render_table([ok, broken, refused])
    lines = table.splitlines()
    assert lines[0].startswith("| Python ") and "engine p/f/s" in lines[0] and "provider p/f/s" in lines[0]
    assert set(lines[1]) <= {"|", "-"}
    assert "| 3.11.7 (default) |" in lines[2] and "| 6/6, 6/6 " in lines[2] and "| passed " in lines[2]
    assert "| build failed " in lines[3]
    assert "| free-threaded |" in lines[4] and "refused as designed" in lines[4]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert (ok.ok, broken.ok, refused.ok) == (True, False, True)
    assert (str(broken.totals()), str(refused.totals())) == ("0/1/0", "1/0/0")


def test_a_refused_interpreter_is_checked_for_its_refusal(tmp_path: Path) -> None:
    """The matrix's path for a free-threaded build, through a stand-in that
    reports Py_GIL_DISABLED: the real interpreter checks must refuse it at
    import, with the named error, and the matrix counts that as a pass."""
    stand_in = tmp_path / "python3.13t"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import sys, sysconfig\n"
        "_real = sysconfig.get_config_var\n"
        "sysconfig.get_config_var = lambda n: 1 if n == 'Py_GIL_DISABLED' else _real(n)\n"
        "code = sys.argv[sys.argv.index('-c') + 1]\n"
        "sys.argv = ['-c', *sys.argv[sys.argv.index('-c') + 2:]]\n"
        "exec(compile(code, '<matrix>', 'exec'), {'__name__': '__main__'})\n"
    )
    stand_in.chmod(0o755)
    interp = matrix.Interpreter(label="3.13.0t", executable=str(stand_in), source="given")
    assert matrix.probe(interp) is None and interp.free_threaded
    result = matrix.run_one(interp, tmp_path / "cache", matrix.QUICK_TESTS, [])
    assert result.status == "refused as designed", result.detail
    assert result.detail.startswith("InterpreterSslError: this is a free-threaded CPython")


# ---- ci/setup.sh --detect: Debian release and OpenSSL's folders --------------------


def _fake_openssl(bin_dir: Path, engines: Path | None, modules: Path | None, version: str) -> None:
    lines = ["#!/bin/sh", 'case "$2" in']
    if engines is not None:
        lines.append(f"  -e) echo 'ENGINESDIR: \"{engines}\"' ;;")
    if modules is not None:
        lines.append(f"  -m) echo 'MODULESDIR: \"{modules}\"' ;;")
    lines += [f"  '') echo '{version}' ;;", "  *) exit 1 ;;", "esac"]
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "openssl").write_text("\n".join(lines) + "\n")
    (bin_dir / "openssl").chmod(0o755)


def _detect(tmp_path: Path, debian: str, bin_dir: Path) -> dict[str, str]:
    version_file = tmp_path / "debian_version"
    version_file.write_text(debian + "\n")
    proc = subprocess.run(
        ["bash", str(ROOT / "ci" / "setup.sh"), "--detect"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "MTLS_DEBIAN_VERSION_FILE": str(version_file)},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines())


def test_detect_debian13_with_libp11_provider(tmp_path: Path) -> None:
    """Debian 13 layout in an unusual place: every folder comes from OpenSSL,
    and libp11's own provider (pkcs11prov.so, libp11 >= 0.4.14) is told apart
    from pkcs11-provider (pkcs11.so)."""
    engines, modules = tmp_path / "odd" / "engines-3", tmp_path / "odd" / "ossl-modules"
    for folder, name in ((engines, "pkcs11.so"), (modules, "pkcs11.so"), (modules, "pkcs11prov.so")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    _fake_openssl(tmp_path / "bin", engines, modules, "OpenSSL 3.5.9 29 Sep 2026")
    got = _detect(tmp_path, "13.8", tmp_path / "bin")
    assert got == {
        "debian-version": "13.8",
        "pkcs11-provider-suite": "main",
        "openssl": "OpenSSL 3.5.9 29 Sep 2026",
        "enginesdir": str(engines),
        "modulesdir": str(modules),
        "libp11-engine": str(engines / "pkcs11.so"),
        "pkcs11-provider": str(modules / "pkcs11.so"),
        "libp11-provider": str(modules / "pkcs11prov.so"),
    }


def test_detect_debian12_without_provider(tmp_path: Path) -> None:
    engines, modules = tmp_path / "e", tmp_path / "m"
    engines.mkdir()
    modules.mkdir()
    (engines / "pkcs11.so").write_text("")
    _fake_openssl(tmp_path / "bin", engines, modules, "OpenSSL 3.0.22 25 Aug 2026")
    got = _detect(tmp_path, "12.11", tmp_path / "bin")
    assert got["pkcs11-provider-suite"] == "bookworm-backports"
    assert got["libp11-engine"] == str(engines / "pkcs11.so")
    assert got["pkcs11-provider"] == got["libp11-provider"] == "none"


def test_detect_openssl_without_module_folder(tmp_path: Path) -> None:
    """OpenSSL 1.1.1 reports no MODULESDIR: nothing is guessed in its place."""
    engines = tmp_path / "engines-1.1"
    engines.mkdir()
    _fake_openssl(tmp_path / "bin", engines, None, "OpenSSL 1.1.1w 11 Sep 2023")
    got = _detect(tmp_path, "11.9", tmp_path / "bin")
    assert got["modulesdir"] == "none" and got["pkcs11-provider"] == "none"
    assert got["libp11-engine"] == "none"
    assert got["pkcs11-provider-suite"] == "none"


def test_ci_scripts_hard_code_no_library_folder() -> None:
    for script in ("setup.sh", "test.sh", "demo.sh", "matrix.py"):
        text = (ROOT / "ci" / script).read_text()
        for folder in ("x86_64-linux-gnu", "aarch64-linux-gnu", "/usr/lib/", "/usr/lib64", "engines-3", "ossl-modules"):
            assert folder not in text, f"ci/{script} hard-codes {folder}"


def test_source_snapshot_has_the_subpackages_and_no_build(tmp_path: Path) -> None:
    """What the matrix builds from: every module of the package, its
    subpackages included (mtls_engine.testing), and nothing compiled."""
    dest = tmp_path / "src"
    matrix.snapshot_source(dest)
    sources = [p for p in (ROOT / "mtls_engine").rglob("*.py") if "__pycache__" not in p.parts]
    wanted = {p.relative_to(ROOT).as_posix() for p in sources}
    got = {p.relative_to(dest).as_posix() for p in (dest / "mtls_engine").rglob("*") if p.is_file()}
    assert "mtls_engine/testing/__init__.py" in wanted
    assert got == wanted | {"mtls_engine/py.typed"}
