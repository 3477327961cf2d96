"""The PKCS#11 modules registered with p11-kit, and the one a key URI picks.

Used only when no module is given anywhere (argument, the URI's
module-path, $MTLS_ENGINE_MODULE).  p11-kit's own API reads its registry and
applies its configuration rules (user/system config, enable-in/disable-in);
no file is parsed here.  Every registered module is loaded and initialised
in this process: one that fails to load or initialise is skipped and
reported, never fatal.  A module that hangs or crashes in C_Initialize is not
isolated (see docs/tokens.md): it would do the same to any PKCS#11 consumer
of the registry; give module= to bypass the registry.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import _uri
from ._errors import AmbiguousUri, ModuleLoadError, TokenNotFound
from ._fork import ForkSafeLock
from ._lib import ffi, lib
from ._p11 import Module, TokenInfo, _initialize
from ._uri import ParsedUri, format_uri

# Where p11-kit looks for .module files (its compiled-in defaults on Debian
# and most distributions, user folder first); used only to say which file
# registered a module and where to register one.
USER_DIR = "~/.config/pkcs11/modules"
SYSTEM_DIRS = ("/etc/pkcs11/modules", "/usr/share/p11-kit/modules")
HOW_TO_REGISTER = (
    "register your card's middleware with p11-kit: a one-line file such as "
    "/etc/pkcs11/modules/mycard.module (or ~/.config/pkcs11/modules/mycard.module) containing "
    "'module: /path/to/your-pkcs11-library.so'; or pass module= (--module), set $MTLS_ENGINE_MODULE, "
    "or add module-path=... to the key URI"
)


@dataclass(frozen=True)
class Registered:
    """One module p11-kit's registry names (loaded or not)."""

    name: str  # the .module file's name without its extension
    path: str  # the library, as p11-kit resolved it
    file: str | None  # the .module file, when found in the usual folders
    module: Module | None = field(default=None, repr=False, compare=False)
    error: str | None = None  # why it was skipped

    @property
    def origin(self) -> str:
        where = self.file or f"the p11-kit registry entry {self.name!r}"
        return f"registered with p11-kit by {where}"


@dataclass(frozen=True)
class Registry:
    modules: list[Registered]  # every registered module p11-kit could load
    skipped: list[str]  # registered modules p11-kit could not even load (its message)

    @property
    def usable(self) -> list[Registered]:
        return [r for r in self.modules if r.module is not None]

    def summary(self) -> str:
        """Each registered module with its tokens, or why it was skipped."""
        parts = []
        for r in self.modules:
            if r.module is None:
                parts.append(f"{r.name} ({r.path}): skipped, {r.error}")
                continue
            try:
                toks = [t for t in r.module.tokens() if t.flags & lib.CKF_TOKEN_INITIALIZED]
            except Exception as exc:  # a module that fails here is reported, not fatal
                parts.append(f"{r.name} ({r.path}): cannot list its tokens ({exc})")
                continue
            # A card in a reader that this module cannot read (see _p11.UNREADABLE_TOKEN).
            toks_text = [str(t) for t in toks] + [f"unreadable {u}" for u in r.module.unreadable]
            parts.append(f"{r.name} ({r.path}): " + (", ".join(toks_text) or "no tokens"))
        parts += [f"skipped: {s}" for s in self.skipped]
        return "; ".join(parts) or "none"


_lock = ForkSafeLock()
_seen_messages: list[str] = []  # p11-kit's messages about registered modules it skipped


def _config_file(name: str) -> str | None:
    base = os.environ.get("XDG_CONFIG_HOME")
    user = os.path.join(base, "pkcs11", "modules") if base else os.path.expanduser(USER_DIR)
    for folder in (user, *SYSTEM_DIRS):
        candidate = os.path.join(folder, f"{name}.module")
        if os.path.isfile(candidate):
            return candidate
    return None


def _string(p: object) -> str:
    if p == ffi.NULL:
        return ""
    try:
        return str(ffi.string(p).decode("utf-8", "replace"))
    finally:
        lib.free(p)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 on /dev/null meanwhile: tpm2-pkcs11 with no TPM
    prints ERROR and CRITICAL lines (its own, GLib's, its TSS library's) at
    C_Initialize, and a module the user did not ask for must not write into
    their output.  Its failure is reported by list and check instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
        finally:
            os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# How long a registered module may take in C_Initialize when list/check
# try it in a child process first (a card reader's middleware can take a
# second or two to talk to pcscd).
PROBE_TIMEOUT = 10.0
_probe_failures: dict[str, str] = {}  # module path -> why it was left out


def _probe(path: str, timeout: float) -> str | None:
    """Load and initialise ``path`` in a forked child: why it must be left
    out (it crashed, or did not return within ``timeout``), else None.  The
    child's result is not used: a module that fails politely is loaded,
    and reported, in this process."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            fl = lib.p11_kit_module_load(path.encode(), lib.P11_KIT_MODULE_UNMANAGED)
            if fl != ffi.NULL:
                _initialize(fl)
        finally:
            os._exit(0)
    os.close(w)
    os.close(r)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"did not return from C_Initialize within {timeout:g} s (tried in a child process)"
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"crashed in C_Initialize ({name}, in a child process)"
    return None


def scan(*, isolate: bool = False) -> Registry:
    """Load and initialise every module registered with p11-kit; failures are
    recorded in the result, never raised.  ``isolate``: try each module not
    yet loaded in a child process first, and leave out one that crashes or
    hangs there (list and check)."""
    with _lock:
        before = lib.p11_kit_message()
        before_text = ffi.string(before).decode("utf-8", "replace") if before != ffi.NULL else ""
        with _stderr_silenced():  # a module's constructor may print, too
            mods = lib.p11_kit_modules_load(ffi.NULL, lib.P11_KIT_MODULE_UNMANAGED)
        after = lib.p11_kit_message()
        after_text = ffi.string(after).decode("utf-8", "replace") if after != ffi.NULL else ""
        # p11-kit skips a module it cannot load and keeps only its last message
        # ("couldn't load module: ...", "call to C_GetFunctionList failed in
        # module: ..."), cleared by its next call and not repeated by every
        # later load: what a scan of this process saw is kept for the next.
        if after_text and after_text != before_text and after_text not in _seen_messages:
            _seen_messages.append(after_text)
        skipped = list(_seen_messages)
        found: list[tuple[str, str]] = []
        if mods != ffi.NULL:
            i = 0
            while mods[i] != ffi.NULL:
                found.append((_string(lib.p11_kit_module_get_name(mods[i])),
                              _string(lib.p11_kit_module_get_filename(mods[i]))))  # fmt: skip
                i += 1
    # Released only after Module.load has its own reference: a library
    # unloaded and loaded again in between would run its constructors twice.
    try:
        return _load_found(found, skipped, isolate)
    finally:
        if mods != ffi.NULL:
            lib.p11_kit_modules_release(mods)


def _load_found(found: list[tuple[str, str]], skipped: list[str], isolate: bool) -> Registry:
    out: list[Registered] = []
    seen: set[str] = set()
    for name, path in found:
        real = os.path.realpath(path)
        if real in seen:  # the same library registered twice: one module
            continue
        seen.add(real)
        why = _probe_failures.get(real)
        if why is None and isolate and real not in Module._cache:
            why = _probe(path, PROBE_TIMEOUT)
            if why is not None:
                _probe_failures[real] = why
        if why is not None:
            out.append(Registered(name, path, _config_file(name), None, why))
            continue
        try:
            with _stderr_silenced():
                mod = Module.load(path)
        except ModuleLoadError as exc:
            out.append(Registered(name, path, _config_file(name), None, str(exc)))
            continue
        out.append(Registered(name, path, _config_file(name), mod))
    return Registry(out, skipped)


def _picking_uri(uri: ParsedUri, reg: Registered, tok: TokenInfo, unique_serial: bool) -> str:
    attrs = [("token", tok.label.encode()), ("serial", tok.serial.encode())]
    if not tok.serial.strip("0"):
        attrs += [("manufacturer", tok.manufacturer.encode()), ("model", tok.model.encode())]
    text = format_uri(attrs)
    obj = [f"{k}={v}" for k, v in _uri._split_path(uri.text) if k in ("object", "id", "type")]
    if obj:
        text += ";" + ";".join(obj)
    if not unique_serial:
        text += "?module-path=" + reg.path
    return text


def _names_module(name: str | None, reg: Registered) -> bool:
    """RFC 7512's module-name (the library's file name without folder and
    suffix: opensc-pkcs11, libsofthsm2 or softhsm2) names ``reg``, or is
    not given; the p11-kit registry name counts too."""
    if not name:
        return True
    stem = os.path.basename(reg.path).split(".so")[0]
    return name in (reg.name, stem, stem.removeprefix("lib"))


def choose(uri: ParsedUri, *, isolate: bool = False) -> tuple[Registered, TokenInfo]:
    """The registered module holding the one token the URI names (``isolate``:
    as for scan).  ModuleLoadError (nothing registered or loadable),
    TokenNotFound, AmbiguousUri."""
    reg = scan(isolate=isolate)
    if not reg.usable:
        why = "; ".join([f"{r.name} ({r.path}): {r.error}" for r in reg.modules] + reg.skipped)
        raise ModuleLoadError(
            "no PKCS#11 module given and no usable module is registered with p11-kit"
            + (f" ({why})" if why else " (none registered)")
            + "; "
            + HOW_TO_REGISTER
        )
    hits: list[tuple[Registered, TokenInfo]] = []
    for r in reg.usable:
        assert r.module is not None
        if not uri.matches_module(r.module.info) or not _names_module(uri.module_name, r):
            continue
        try:
            tokens = [t for t in r.module.tokens() if t.flags & lib.CKF_TOKEN_INITIALIZED]
        except Exception:  # a module that cannot list its slots holds nothing we can use
            continue
        for tok in tokens:
            slot_info = ffi.new("CK_SLOT_INFO *")
            if r.module.fl.C_GetSlotInfo(tok.slot_id, slot_info) != lib.CKR_OK:
                continue
            if uri.matches_slot(tok.slot_id, slot_info) and uri.matches_token(r.module.raw_token_info(tok.slot_id)):
                hits.append((r, tok))
    if not hits:
        raise TokenNotFound(
            f"no token matches {uri.safe!r} in the modules registered with p11-kit: {reg.summary()}. "
            "Insert the card, fix the URI's token/serial attributes, or pass module= (--module) "
            "if its middleware is not registered"
        )
    if len(hits) > 1:
        serials = [t.serial for _, t in hits]
        lines = [
            f"{t} in {r.name} ({r.path}): {_picking_uri(uri, r, t, serials.count(t.serial) == 1)}" for r, t in hits
        ]
        raise AmbiguousUri(
            f"{len(hits)} tokens in the modules registered with p11-kit match {uri.safe!r}: "
            + "; ".join(lines)
            + ". Use the URI given for the one you mean (or pass module=); mtls_engine does not log in "
            "to a token it would have to guess"
        )
    return hits[0]
