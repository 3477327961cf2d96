"""The interpreter checks that run when mtls_engine is imported.

Each refusal path is exercised here even where no such interpreter exists
on the machine: the build-flag decisions with stand-in facts and with the
running interpreter's ``sys``/``sysconfig``/``platform`` patched, and the
OpenSSL checks with small shared objects compiled here that stand in for an
``_ssl`` module linked to another OpenSSL or carrying OpenSSL statically.
The same file runs in every interpreter of the compatibility matrix
(ci/matrix.py), which also proves the installed copy is the one tested.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

import mtls_engine
from mtls_engine import _lib
from mtls_engine._context import ssl_ctx_pointer
from mtls_engine._lib import InterpreterFacts, check_interpreter, check_same_openssl, expected_object_header, lib
from mtls_engine._softhsm import KeyKind

from .conftest import Pki, need
from .helpers import ROOT, run_module, run_python


def facts(**changes: object) -> InterpreterFacts:
    """A 64-bit CPython 3.11 release build, with ``changes`` applied."""
    base: dict[str, object] = dict(
        implementation="CPython", version=(3, 11), object_header=16, pointer_size=8,
        debug=False, trace_refs=False, free_threaded=False,
    )  # fmt: skip
    base.update(changes)
    return InterpreterFacts(**base)  # type: ignore[arg-type]


# ---- the running interpreter ---------------------------------------------------


def test_this_interpreter_is_accepted_with_its_own_header_size() -> None:
    here = InterpreterFacts.of_this_process()
    assert here.implementation == "CPython"
    assert here.version == sys.version_info[:2]
    assert here.object_header == object.__basicsize__
    assert check_interpreter() == here.object_header == _lib.OBJECT_HEADER_SIZE
    assert ssl_ctx_pointer(ssl.create_default_context()) is not None


def test_the_tested_copy_is_the_installed_one() -> None:
    """In the matrix, every interpreter tests its own build installed into its
    own virtual environment, never the source tree's (an abi3 extension built
    for one interpreter would load into another)."""
    from mtls_engine import _binding

    package = Path(mtls_engine.__file__).resolve().parent
    assert Path(_binding.__file__).resolve().parent == package
    print(f"mtls_engine from {package}; binding {Path(_binding.__file__).name}")
    venv = os.environ.get("MTLS_MATRIX_VENV")
    if venv:
        assert str(package).startswith(str(Path(venv).resolve()) + os.sep), (package, venv)


# ---- build flags: debug, trace-refs, free-threaded, not CPython -------------------


@pytest.mark.parametrize(
    ("changes", "header"),
    [
        ({}, 16),
        ({"version": (3, 9)}, 16),
        ({"version": (3, 13)}, 16),
        ({"debug": True}, 16),  # Py_DEBUG alone: same header since 3.8
        ({"trace_refs": True, "object_header": 32, "version": (3, 12)}, 32),  # + _ob_next, _ob_prev
        ({"trace_refs": True, "debug": True, "object_header": 32, "version": (3, 9)}, 32),
        ({"trace_refs": True, "version": (3, 13)}, 16),  # 3.13: the trace lives outside the header
        ({"pointer_size": 4, "object_header": 8}, 8),  # 32-bit
    ],
    ids=["release", "3.9", "3.13", "debug", "trace-refs-3.12", "debug-trace-refs-3.9", "trace-refs-3.13", "32-bit"],
)
def test_header_size_follows_the_build(changes: dict[str, object], header: int) -> None:
    f = facts(**changes)
    assert expected_object_header(f) == header
    assert check_interpreter(f) == header


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"trace_refs": True, "version": (3, 12)},
            r"object header is 16 bytes, but a CPython 3\.12 \(trace-refs build\) should have 32: the place of "
            r"the SSL_CTX .* cannot be predicted, so mtls_engine refuses to read it\. Use a standard release",
        ),
        ({"object_header": 24}, r"object header is 24 bytes, but a CPython 3\.11 \(release build\) should have 16"),
        (
            {"free_threaded": True, "version": (3, 13), "object_header": 32},
            r"free-threaded CPython \(CPython 3\.13 \(free-threaded build\), built with Py_GIL_DISABLED\).*refuses "
            r"to touch the SSL_CTX\. Run it with the regular build of the same version \(for example python3\.13 "
            r"instead of python3\.13t\)",
        ),
        ({"implementation": "PyPy"}, r"mtls_engine needs CPython.*PyPy's ssl module.*Run this program with CPython"),
    ],
    ids=["trace-refs-header-missing", "unknown-header", "free-threaded", "pypy"],
)
def test_refused_builds(changes: dict[str, object], message: str) -> None:
    with pytest.raises(mtls_engine.InterpreterSslError, match=message):
        check_interpreter(facts(**changes))


def test_trace_refs_is_detected_from_sys(monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.getobjects exists only in Py_TRACE_REFS builds.  Claimed on this
    release build, the header no longer matches the flags up to 3.12 (so
    the import would refuse); 3.13 changed nothing in the header."""
    monkeypatch.setattr(sys, "getobjects", lambda *a: [], raising=False)
    here = InterpreterFacts.of_this_process()
    assert here.trace_refs
    if sys.version_info < (3, 13):
        with pytest.raises(mtls_engine.InterpreterSslError, match="trace-refs build"):
            check_interpreter()
    else:
        assert check_interpreter() == 16


def test_debug_build_is_detected_from_sys_and_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "gettotalrefcount", lambda: 0, raising=False)
    here = InterpreterFacts.of_this_process()
    assert here.debug and "debug" in here.describe()
    assert check_interpreter() == object.__basicsize__


def test_free_threaded_build_is_detected_from_sysconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: 1 if name == "Py_GIL_DISABLED" else real(name))
    assert InterpreterFacts.of_this_process().free_threaded
    with pytest.raises(mtls_engine.InterpreterSslError, match="free-threaded"):
        check_interpreter()


def test_free_threaded_build_is_detected_from_abiflags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "abiflags", "t", raising=False)
    assert InterpreterFacts.of_this_process().free_threaded


def test_other_implementation_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "python_implementation", lambda: "PyPy")
    with pytest.raises(mtls_engine.InterpreterSslError, match="needs CPython"):
        check_interpreter()


def test_a_trace_refs_header_assumed_on_this_build_is_refused_not_used() -> None:
    """What the pointer validation does if a header size were ever wrong:
    the SSL_CTX candidate 32 bytes in (a trace-refs or free-threaded header)
    is not this context's, and it is refused before anything is written."""
    ctx = ssl.create_default_context()
    options = ctx.options
    for wrong in (32, 24, 8):
        if wrong == object.__basicsize__:
            continue
        with pytest.raises(mtls_engine.InterpreterSslError, match="cannot find the OpenSSL SSL_CTX"):
            ssl_ctx_pointer(ctx, header_size=wrong)
    assert ctx.options == options


# The refusals happen at import, before the extension is loaded.
_IMPORT = """
import sys
{prepare}
try:
    import mtls_engine
except Exception as exc:
    print(type(exc).__module__, type(exc).__name__)
    print(exc)
    print("binding loaded:", "mtls_engine._binding" in sys.modules)
else:
    print("imported")
"""

_PREPARE = {
    "free-threaded": (
        "import sysconfig\n_real = sysconfig.get_config_var\n"
        "sysconfig.get_config_var = lambda n: 1 if n == 'Py_GIL_DISABLED' else _real(n)"
    ),
    "pypy": "import platform\nplatform.python_implementation = lambda: 'PyPy'",
    "trace-refs": "sys.getobjects = lambda *a: []",
}


# OpenSSL built into the interpreter (python-build-standalone): the
# process maps no shared libssl/libcrypto.  The stand-in hides them
# from the one place the check reads.
_BUILT_IN = (
    "import builtins, io\n_open = builtins.open\n"
    "def _without_openssl(file, *a, **k):\n"
    "    f = _open(file, *a, **k)\n"
    "    if file != '/proc/self/maps':\n"
    "        return f\n"
    "    with f:\n"
    "        lines = f.read().splitlines(True)\n"
    "    return io.StringIO(''.join(ln for ln in lines if '/libssl' not in ln and '/libcrypto' not in ln))\n"
    "builtins.open = _without_openssl"
)


@pytest.mark.parametrize("case", sorted(_PREPARE))
def test_import_refuses_before_loading_the_extension(case: str) -> None:
    if case == "trace-refs" and sys.version_info >= (3, 13):
        pytest.skip("3.13 trace-refs builds keep the normal header: nothing to refuse")
    proc = run_python(_IMPORT.format(prepare=_PREPARE[case]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "mtls_engine._errors InterpreterSslError", proc.stdout
    assert lines[-1] == "binding loaded: False"


# ---- which OpenSSL: another library, or one linked statically into _ssl -----------

_FAKE_OPENSSL = r"""
void *SSL_CTX_new(const void *method) { (void)method; return 0; }
unsigned long OpenSSL_version_num(void) { return 0x30000000UL; }
"""

_SSL_LINKED_TO_FAKE = r"""
void *SSL_CTX_new(const void *method);
void *mtls_test_uses(void) { return (void *)&SSL_CTX_new; }
"""

_SSL_STATIC_HIDDEN = r"""
__attribute__((visibility("hidden"))) void *SSL_CTX_new(const void *m) { (void)m; return 0; }
__attribute__((visibility("hidden"))) unsigned long OpenSSL_version_num(void) { return 0x30000000UL; }
void *mtls_test_uses(void) { return (void *)&SSL_CTX_new; }
"""


class StandIns:
    """Shared objects standing in for ``_ssl`` modules, loaded (RTLD_LOCAL,
    as Python loads extension modules) so the check can look into them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._keep: list[ctypes.CDLL] = []

    def build(self, name: str, source: str, *link: str) -> str:
        cc = shutil.which("cc") or shutil.which("gcc")
        need(cc is not None, "a C compiler (Debian: gcc) builds the stand-in _ssl modules")
        assert cc is not None
        src = self.folder / (name + ".c")
        src.write_text(source)
        out = self.folder / name
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src), *link], check=True)
        self._keep.append(ctypes.CDLL(str(out)))
        return str(out)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIns]:
    yield StandIns(tmp_path_factory.mktemp("fake-ssl"))


@pytest.fixture(scope="module")
def ssl_with_other_openssl(stand_ins: StandIns) -> str:
    """An _ssl linked to another libssl (same version number as ours)."""
    stand_ins.build("libssl.so.99", _FAKE_OPENSSL, "-Wl,-soname,libssl.so.99")
    folder = str(stand_ins.folder)
    return stand_ins.build(
        "_ssl_other.so", _SSL_LINKED_TO_FAKE, f"-L{folder}", "-l:libssl.so.99", f"-Wl,-rpath,{folder}",
        "-Wl,--no-as-needed",
    )  # fmt: skip


def test_the_real_ssl_module_shares_our_openssl() -> None:
    check_same_openssl()  # what the import did, again


def test_ssl_module_linked_to_another_openssl(ssl_with_other_openssl: str) -> None:
    with pytest.raises(mtls_engine.InterpreterSslError) as e:
        check_same_openssl(ssl_with_other_openssl, version=lib.OpenSSL_version_num())
    msg = str(e.value)
    assert f"the ssl module ({ssl_with_other_openssl}) uses another OpenSSL than mtls_engine" in msg
    assert f"SSL_CTX_new comes from {Path(ssl_with_other_openssl).parent}/libssl.so.99" in msg
    assert "but mtls_engine is linked to " in msg and "libssl.so" in msg.rsplit("linked to ", 1)[1]
    assert "rebuild mtls_engine with the Python that runs it" in msg


def test_ssl_module_with_static_openssl_exported(stand_ins: StandIns) -> None:
    """OpenSSL linked into _ssl with its symbols visible: found in _ssl itself."""
    path = stand_ins.build("_ssl_static.so", _FAKE_OPENSSL)
    with pytest.raises(mtls_engine.InterpreterSslError) as e:
        check_same_openssl(path, version=lib.OpenSSL_version_num())
    assert str(e.value).startswith(
        f"the ssl module ({path}) has its own copy of OpenSSL linked in statically (SSL_CTX_new is in {path})"
    )
    assert "links libssl/libcrypto as shared libraries" in str(e.value)


def test_ssl_module_with_static_openssl_hidden(stand_ins: StandIns) -> None:
    path = stand_ins.build("_ssl_static_hidden.so", _SSL_STATIC_HIDDEN)
    with pytest.raises(mtls_engine.InterpreterSslError, match=r"does not use a shared OpenSSL: SSL_CTX_new is not "):
        check_same_openssl(path, version=lib.OpenSSL_version_num())


_MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234  /opt/python/bin/python3.12
7f0000000000-7f0000001000 r-xp 00000000 fe:01 2345  /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f0000001000-7f0000002000 r--p 00001000 fe:01 2345  /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f0000002000-7f0000003000 r-xp 00000000 fe:01 3456  /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000003000-7f0000004000 rw-p 00000000 00:00 0
7f0000004000-7f0000005000 r-xp 00000000 fe:01 4567  /usr/lib/x86_64-linux-gnu/libc.so.6
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0  [stack]
"""


def test_mapped_openssl_libraries_are_read_from_the_maps() -> None:
    assert _lib.mapped_openssl_libraries(_MAPS) == [
        "/usr/lib/x86_64-linux-gnu/libcrypto.so.3", "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    ]  # fmt: skip
    no_openssl = "".join(ln + "\n" for ln in _MAPS.splitlines() if "/libssl" not in ln and "/libcrypto" not in ln)
    assert _lib.mapped_openssl_libraries(no_openssl) == []


def test_this_process_maps_the_openssl_the_extension_uses() -> None:
    mapped = _lib.mapped_openssl_libraries()
    if mapped is None:
        pytest.skip("no /proc/self/maps on this system")
    mine = _lib.text(lib.mtls_library_of(lib.mtls_own_symbol(b"SSL_CTX_new")))
    assert any(os.path.samefile(mine, m) for m in mapped), (mine, mapped)
    _lib.check_openssl_is_shared()  # what the import did, again


def test_openssl_built_into_the_interpreter_is_refused_naming_uv() -> None:
    """A Python whose process maps no shared OpenSSL (python-build-standalone,
    as uv installs it): the refusal says why and what works instead."""
    with pytest.raises(mtls_engine.InterpreterSslError) as e:
        _lib.check_openssl_is_shared([], ssl_module="built into the interpreter")
    msg = str(e.value)
    assert msg.startswith(
        "this Python has OpenSSL built in: its ssl module (built into the interpreter) loads no shared "
        "libssl/libcrypto, as in the Pythons uv installs (python-build-standalone), so the SSL_CTX"
    ), msg
    for advice in ("/usr/bin/python3", "pyenv", "uv venv --python /usr/bin/python3", "UV_PYTHON_PREFERENCE=only-system",
                   "OPENSSL_CONF from 'python -m mtls_engine config --backend provider --pin-source file:PATH'",
                   "'python -m mtls_engine uri-pem'", "ctx.load_cert_chain(cert, key_file, password='')"):  # fmt: skip
        assert advice in msg, advice
    _lib.check_openssl_is_shared(["/usr/lib/x86_64-linux-gnu/libssl.so.3"])  # a shared one: accepted


def test_a_real_module_with_static_openssl() -> None:
    """cryptography's wheels link their own OpenSSL into _rust statically:
    a real module of the kind the check must refuse."""
    from cryptography.hazmat.bindings import _rust

    path = getattr(_rust, "__file__", None)
    if path is None or not os.path.exists(path):
        pytest.skip("cryptography's _rust module is built into this interpreter")
    with pytest.raises(mtls_engine.InterpreterSslError, match="statically"):
        check_same_openssl(path)


def test_import_refuses_another_openssl(ssl_with_other_openssl: str) -> None:
    """The same check wired into the import: an _ssl whose OpenSSL is not
    the extension's stops ``import mtls_engine``."""
    fake = ssl_with_other_openssl
    prepare = f"import ctypes, _ssl\n_keep = ctypes.CDLL({fake!r})\n_ssl.__file__ = {fake!r}"
    proc = run_python(_IMPORT.format(prepare=prepare))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "mtls_engine._errors InterpreterSslError", proc.stdout
    assert "uses another OpenSSL than mtls_engine" in lines[1]


# ---- python -m mtls_engine on a refused interpreter ----------------------------------


def _stand_in_site(folder: Path, prepare: str) -> Path:
    """A folder whose sitecustomize.py sets a stand-in up before ``-m`` runs."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(prepare + "\n")
    return folder


def _import_error(prepare: str) -> str:
    """The message ``import mtls_engine`` raises with this stand-in."""
    proc = run_python(_IMPORT.format(prepare=prepare))
    lines = proc.stdout.splitlines()
    assert lines[0] == "mtls_engine._errors InterpreterSslError", proc.stdout + proc.stderr
    return lines[1]


_COMMAND_CASES = {
    "pypy": (_PREPARE["pypy"], "needs CPython"),
    "free-threaded": (_PREPARE["free-threaded"], "Run it with the regular build of the same version"),
}


@pytest.mark.parametrize("case", sorted(_COMMAND_CASES))
@pytest.mark.parametrize("args", [["check"], ["list", "--json"], ["--help"], []], ids=["check", "list", "help", "none"])
def test_command_on_a_refused_interpreter_says_why_in_one_line(case: str, args: list[str], tmp_path: Path) -> None:
    """``python -m mtls_engine <anything>``: the import's refusal as one line
    ``mtls_engine: error: <why and what to do>``, exit status 1, no traceback."""
    prepare, words = _COMMAND_CASES[case]
    proc = run_module("mtls_engine", *args, site=_stand_in_site(tmp_path / "site", prepare))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"mtls_engine: error: {_import_error(prepare)}"]
    assert words in proc.stderr


@pytest.mark.parametrize("case", sorted(_COMMAND_CASES))
def test_console_script_on_a_refused_interpreter_says_why_in_one_line(case: str, tmp_path: Path) -> None:
    """The ``mtls-engine`` command (the wrapper pip writes for the
    project.scripts entry ``mtls_engine.__main__:run``) refuses the same way."""
    prepare, words = _COMMAND_CASES[case]
    site = _stand_in_site(tmp_path / "site", prepare)
    script = tmp_path / "bin" / "mtls-engine"
    script.parent.mkdir()
    script.write_text(
        "import sys\nfrom mtls_engine.__main__ import run\nif __name__ == '__main__':\n"
        "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit(run())\n"
    )
    entry = _script_entries()["mtls-engine"]
    assert entry == "mtls_engine.__main__:run"  # what the wrapper above imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), "check"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"mtls_engine: error: {_import_error(prepare)}"]
    assert words in proc.stderr


def _script_entries() -> dict[str, str]:
    """project.scripts of pyproject.toml (read by hand: tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return {
        k.strip(): v.strip().strip('"') for k, v in (line.split("=", 1) for line in section.splitlines() if "=" in line)
    }


def test_command_with_another_openssl_says_why_in_one_line(ssl_with_other_openssl: str, tmp_path: Path) -> None:
    """The OpenSSL check (after the extension is loaded) refuses the same way."""
    fake = ssl_with_other_openssl
    prepare = f"import ctypes, _ssl\n_keep = ctypes.CDLL({fake!r})\n_ssl.__file__ = {fake!r}"
    proc = run_module("mtls_engine", "check", site=_stand_in_site(tmp_path / "site", prepare))
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line == f"mtls_engine: error: {_import_error(prepare)}"
    assert "uses another OpenSSL than mtls_engine" in line and "rebuild mtls_engine with the Python" in line


def test_applications_run_with_dash_m_still_get_the_error(tmp_path: Path) -> None:
    """Only mtls_engine's own command turns the refusal into a message: an
    application's package run with ``-m`` (imported, like mtls_engine, while
    runpy locates it) and an application module both get the exception."""
    site = _stand_in_site(tmp_path / "site", _PREPARE["pypy"])
    (site / "userapp").mkdir()
    (site / "userapp" / "__init__.py").write_text("import mtls_engine\n")
    (site / "userapp" / "__main__.py").write_text("print('not reached')\n")
    (site / "usermod.py").write_text("import mtls_engine\nprint('not reached')\n")
    for module in ("userapp", "usermod"):
        proc = run_module(module, site=site)
        assert proc.returncode == 1, proc.stderr
        assert "not reached" not in proc.stdout
        assert "Traceback" in proc.stderr
        last = proc.stderr.splitlines()[-1]
        assert last.startswith("mtls_engine._errors.InterpreterSslError: mtls_engine needs CPython"), last


# ---- a Python with OpenSSL built in (uv's python-build-standalone) ------------------
# Stood in for by _BUILT_IN (this process's maps without libssl/libcrypto);
# the real thing (MTLS_STATIC_PYTHON, on demand) is in test_static_python.py.

_BUILT_IN_USE = """
import ssl, sys
import mtls_engine
from mtls_engine import _lib
print("binding loaded:", "mtls_engine._binding" in sys.modules)
# A module that does not exist: a refusal that came after touching the card
# would be a ModuleLoadError.
for name, call in (
    ("load_card_key", lambda: mtls_engine.load_card_key(
        ssl.create_default_context(), "pkcs11:token=t;object=k;type=private", module="/nonexistent/p11.so")),
    ("client_context", lambda: mtls_engine.client_context(
        "pkcs11:token=t;object=k;type=private", module="/nonexistent/p11.so")),
):
    try:
        call()
    except mtls_engine.Error as exc:
        print(name, type(exc).__name__, exc)
    else:
        print(name, "no error")
"""


def test_a_python_with_openssl_built_in_imports_and_refuses_every_ssl_context() -> None:
    """The package imports (for config, uri-pem, list, check), and every
    call that would reach an SSL_CTX raises the refusal that names uv and
    the recipe, before any PKCS#11 module is loaded."""
    proc = run_python(_BUILT_IN + "\n" + _BUILT_IN_USE)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "binding loaded: True"
    import _ssl

    where = getattr(_ssl, "__file__", None) or "built into the interpreter"
    refusal = f"InterpreterSslError this Python has OpenSSL built in: its ssl module ({where}) loads no shared"
    assert lines[1].startswith(f"load_card_key {refusal}"), lines[1]
    assert lines[2].startswith(f"client_context {refusal}"), lines[2]
    assert "UV_PYTHON_PREFERENCE=only-system" in lines[1] and "password=''" in lines[1]


def test_commands_on_a_python_with_openssl_built_in(pki: Pki, tmp_path: Path) -> None:
    """config, uri-pem and list work there; check runs every step up to the
    test signature, warns at the openssl step with the refusal, and fails
    the handshake with it."""
    from .servers import echo_server, server_context

    site = _stand_in_site(tmp_path / "site", _BUILT_IN)
    key = pki.key_uri(KeyKind.P256)
    proc = run_module("mtls_engine", "uri-pem", key, site=site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("-----BEGIN PKCS#11 PROVIDER URI-----"), proc.stdout
    proc = run_module("mtls_engine", "config", "--module", pki.module, "--backend", "provider", site=site)
    assert proc.returncode == 0, proc.stderr
    assert f'pkcs11-module-path = "{pki.module}"' in proc.stdout, proc.stdout
    proc = run_module("mtls_engine", "list", "--module", pki.module, "--json", site=site)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["module"]["path"] == pki.module
    assert '"label": "card1"' in proc.stdout, proc.stdout

    pin = tmp_path / "pin"
    pin.write_text(pki.card1.pin)
    args = ["check", "--module", pki.module, "--pin-source", f"file:{pin}", "--key", key, "--json"]
    proc = run_module("mtls_engine", *args, site=site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    assert {k for k, s in steps.items() if s["status"] != "ok"} == {"openssl", "connect"}
    assert steps["openssl"]["status"] == "warn" and steps["openssl"]["facts"]["same_library"] is False
    assert steps["openssl"]["hint"].startswith("this Python has OpenSSL built in")
    assert steps["connect"]["status"] == "skip"

    with echo_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as srv:
        more = ["--connect", f"localhost:{srv.port}", "--cafile", str(pki.ca_file)]
        proc = run_module("mtls_engine", *args, *more, site=site)
        assert srv.seen == []
    assert proc.returncode == 1, proc.stdout + proc.stderr
    connect = json.loads(proc.stdout)["steps"][-1]
    assert connect["status"] == "fail" and connect["facts"]["error"] == "InterpreterSslError", connect
    assert connect["summary"].startswith("this Python has OpenSSL built in"), connect
    assert pki.card1.pin not in proc.stdout + proc.stderr
