"""Backends that turn a token object into an OpenSSL ``EVP_PKEY`` whose
private operations run on the token, inside OpenSSL.

``engine``: libp11's ``pkcs11`` engine (OpenSSL 1.1.1-3.x).  ``provider``:
pkcs11-provider (OpenSSL >= 3.0.7, and the only way on OpenSSL 4).
"""

from __future__ import annotations

import functools
import os
import re

from . import _fork
from ._config import provider_section
from ._errors import AmbiguousUri, BackendUnavailable, ObjectNotFound
from ._lib import BINDING_PATH, consume_errors, ffi, lib, text
from ._log import log
from ._p11 import KeyObject, Module, TokenInfo
from ._uri import format_uri

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from ._packages import Package

    _T = TypeVar("_T")


BACKENDS = ("engine", "provider")


def engines_dir() -> str:
    return text(lib.OPENSSL_info(lib.OPENSSL_INFO_ENGINES_DIR))


def _installed(env: str, directory: str, names: tuple[str, ...]) -> tuple[str | None, str]:
    """A backend's shared object: ``$env`` if set, else the first of
    ``names`` in ``directory``.  Returns (path or None, where it was looked
    for)."""
    override = os.environ.get(env)
    if override:
        return (override if os.path.exists(override) else None), override
    for name in names:
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate, candidate
    return None, os.path.join(directory, names[0])


def engine_path() -> str | None:
    """libp11's engine: ``$MTLS_ENGINE_PKCS11_ENGINE``, else ``pkcs11.so`` (or
    ``libpkcs11.so``) in the engines directory OpenSSL itself reports."""
    return _installed("MTLS_ENGINE_PKCS11_ENGINE", engines_dir(), ("pkcs11.so", "libpkcs11.so"))[0]


def engine_status() -> tuple[bool, str]:
    if not lib.MTLS_HAS_ENGINE:
        return False, "this OpenSSL has no ENGINE API (OpenSSL 4, or built with no-engine)"
    path, where = _installed("MTLS_ENGINE_PKCS11_ENGINE", engines_dir(), ("pkcs11.so", "libpkcs11.so"))
    if path is None:
        return False, (
            f"libp11's pkcs11 engine is not installed ({where} does not exist); install it "
            "(Debian: apt-get install libengine-pkcs11-openssl) or set MTLS_ENGINE_PKCS11_ENGINE"
        )
    if lib.mtls_engine_listed(b"pkcs11"):
        # libp11 keeps its state in the shared object: a second instance of
        # the engine fails to initialise in a process that already has one.
        return False, (
            "libp11's pkcs11 engine was already loaded by OpenSSL's configuration (OPENSSL_CONF or the "
            "system openssl.cnf), and a second instance cannot start in this process; use the provider "
            "backend, or drop the engine from that configuration"
        )
    return True, path


def modules_dir() -> str:
    return text(lib.OPENSSL_info(lib.OPENSSL_INFO_MODULES_DIR))


# pkcs11-provider 1.0 needs OpenSSL 3.0.7 or newer.
_PROVIDER_MIN_OPENSSL = 0x30000070

# Two PKCS#11 providers exist, with the same job and different settings:
# pkcs11-provider (its own project; "pkcs11.so" in OpenSSL's modules folder,
# and what the provider backend configures: pkcs11-module-path, quirks, ...)
# and libp11's own provider ("pkcs11prov.so", libp11 0.4.14 and later; not
# in Debian 12 or 13, which ship libp11 0.4.12 and 0.4.13).
PKCS11_PROVIDER = "pkcs11-provider"
LIBP11_PROVIDER = "libp11"
PROVIDER_FILES = {PKCS11_PROVIDER: "pkcs11.so", LIBP11_PROVIDER: "pkcs11prov.so"}
# What pkcs11-provider answers to OSSL_PROVIDER_get_params "name" (measured,
# 1.0 on Debian 12 and 13).  libp11's provider answers with the name it was
# loaded under, so only its file (or package) tells it apart.
PKCS11_PROVIDER_NAME = "PKCS#11 Provider"


def provider_implementation(path: str, name: str | None = None, package: Package | None = None) -> str:
    """pkcs11-provider, libp11 (libp11's provider) or unknown, from what
    the provider says its name is, the package it came from, its file name."""
    pkg = package.name if package is not None else ""
    if name == PKCS11_PROVIDER_NAME or pkg == PKCS11_PROVIDER:
        return PKCS11_PROVIDER
    if os.path.basename(path) == PROVIDER_FILES[LIBP11_PROVIDER] or "libp11" in pkg:
        return LIBP11_PROVIDER
    return "unknown"


def _per_file_version(read: Callable[[str, int, int], _T]) -> Callable[[str], _T | None]:
    """``read(path, mtime, size)`` once per version of the file (None when
    it cannot be stat'ed): these run on every backend choice."""
    cached = functools.lru_cache(maxsize=8)(read)

    def get(path: str) -> _T | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cached(path, st.st_mtime_ns, st.st_size)

    return get


def _noted_package_of(path: str, mtime: int, size: int) -> Package | None:
    from ._packages import Package, elf_package_note, upstream_version  # the provider's only

    note = elf_package_note(path)
    if note is None:
        return None
    return Package(note["name"], note["version"], upstream_version(note["version"]), "elf-note")


_noted_package = _per_file_version(_noted_package_of)  # the package in the file's ELF note (no dpkg)


def describe_provider(path: str) -> dict[str, str] | None:
    """OSSL_PROVIDER_get_params "name", "version", "buildinfo" of the
    provider in ``path``, asked in a library context of its own (None when
    OpenSSL cannot load it).  The "version" is whatever the provider puts
    there: pkcs11-provider 1.0 gives the OpenSSL version it was built with."""
    if not lib.MTLS_HAS_PROVIDER:
        return None
    bufs = [ffi.new("char[256]") for _ in range(3)]
    lib.ERR_clear_error()
    if not lib.mtls_provider_describe(path.encode(), bufs[0], 256, bufs[1], 256, bufs[2], 256):
        consume_errors()
        return None
    return dict(zip(("name", "version", "buildinfo"), (text(b) for b in bufs)))


def provider_status() -> tuple[bool, str]:
    if not lib.MTLS_HAS_PROVIDER:
        return False, "this OpenSSL is older than 3.0 and has no providers"
    if lib.OpenSSL_version_num() < _PROVIDER_MIN_OPENSSL:
        return False, f"pkcs11-provider needs OpenSSL 3.0.7 or newer; this is {text(lib.OpenSSL_version(0))}"
    path, where = _installed("MTLS_ENGINE_PKCS11_PROVIDER", modules_dir(), ("pkcs11.so",))
    if path is None:
        return False, (
            f"pkcs11-provider is not installed ({where} does not exist); install it (Debian 13: "
            "apt-get install pkcs11-provider; Debian 12: from bookworm-backports) or set "
            "MTLS_ENGINE_PKCS11_PROVIDER"
        )
    if provider_implementation(path, package=_noted_package(path)) == LIBP11_PROVIDER:
        return False, (
            f"{path} is libp11's own provider, which takes other settings than pkcs11-provider, the "
            "provider mtls_engine's provider backend configures; install pkcs11-provider (Debian 13: "
            "apt-get install pkcs11-provider; Debian 12: from bookworm-backports) and point "
            "MTLS_ENGINE_PKCS11_PROVIDER at its pkcs11.so, or use the engine backend"
        )
    mismatch = libcrypto_mismatch(path)
    if mismatch:
        return False, mismatch
    return True, path


def loaded_libcrypto() -> tuple[str, str]:
    """The libcrypto this process uses (Python's ssl and mtls_engine share
    it): its file and its soname (libcrypto.so.3)."""
    path = text(lib.mtls_library_of(lib.mtls_own_symbol(b"OpenSSL_version_num")))
    name = os.path.basename(path)
    if re.fullmatch(r"libcrypto\.so\.\d+", name):
        return path, name  # its soname, as distributions name the file (no need to read it)
    dynamic = _dynamic(path) if path else None
    return path, dynamic["soname"][0] if dynamic and dynamic["soname"] else name


def libcrypto_mismatch(path: str) -> str | None:
    """Why the provider in ``path`` cannot be used when it is linked against
    another libcrypto than this process's (None when it is not): loaded, it
    would bring a second OpenSSL into the process, whose own console PIN
    prompt bypasses mtls_engine's PIN handling."""
    dynamic = _dynamic(path)
    theirs = [n for n in (dynamic or {}).get("needed", []) if n.startswith("libcrypto.so")]
    ours_path, ours = loaded_libcrypto()
    if not theirs or ours in theirs or not ours.startswith("libcrypto.so"):
        return None
    version = text(lib.OpenSSL_version(0))
    return (
        f"the provider {path} is linked against {theirs[0]}, but Python's ssl uses {ours} ({version}, "
        f"{ours_path}): loading it would put a second OpenSSL in this process (whose console PIN prompt "
        f"bypasses mtls_engine); install a pkcs11-provider built for {version} (Debian: the "
        f"pkcs11-provider package of the release that ships {ours}) and set MTLS_ENGINE_PKCS11_PROVIDER "
        f"to its pkcs11.so, or use a Python whose ssl links {theirs[0]}"
    )


def _dynamic_of(path: str, mtime: int, size: int) -> dict[str, list[str]] | None:
    from ._packages import elf_dynamic  # the provider's only

    return elf_dynamic(path)


_dynamic = _per_file_version(_dynamic_of)


# Each backend's availability: (True, path) or (False, why not).
STATUS = {"engine": engine_status, "provider": provider_status}


def choose(backend: str) -> tuple[str, str]:
    """The backend to use and why: ``engine``/``provider`` when asked for and
    available; for ``auto`` the engine where OpenSSL still has one (it serves
    any number of PKCS#11 modules in one process and adds nothing per
    handshake but the signature), else pkcs11-provider."""
    if backend not in ("auto", *BACKENDS):
        raise BackendUnavailable(f"unknown backend {backend!r}; use 'engine', 'provider' or 'auto'")
    if backend != "auto":
        ok, why = STATUS[backend]()
        if not ok:
            raise BackendUnavailable(f"backend {backend!r} is unavailable: {why}")
        return backend, f"{backend} (asked for)"
    engine_ok, engine_why = engine_status()
    if engine_ok:
        return "engine", "engine (auto: libp11's engine is available; it serves any number of modules per process)"
    provider_ok, provider_why = provider_status()
    if provider_ok:
        return "provider", f"provider (auto: the engine is unavailable: {engine_why})"
    raise BackendUnavailable(f"no backend is available; engine: {engine_why}; provider: {provider_why}")


def key_uri(token: TokenInfo, key: KeyObject) -> str:
    """The URI a backend loads: the token by serial and label, the key by id
    and label, exactly as mtls_engine found it.  Where the serial says
    nothing (empty or all zeros: every TPM token of tpm2-pkcs11), the
    token's manufacturer and model are named too."""
    attrs: list[tuple[str, bytes]] = [("serial", token.serial.encode()), ("token", token.label.encode())]
    if not token.serial.strip("0"):
        attrs += [("manufacturer", token.manufacturer.encode()), ("model", token.model.encode())]
    if key.id:
        attrs.append(("id", key.id))
    if key.label:
        attrs.append(("object", key.label.encode()))
    attrs.append(("type", b"private"))
    return format_uri(attrs)


class _Library:
    """An engine library loaded for the life of the process: libp11's own
    file, or a private copy of it.  ``busy`` while an engine instance made
    from it is alive."""

    def __init__(self, path: str, copy: bool) -> None:
        self.path = path
        self.copy = copy
        self.busy = False


class _Instance:
    """One engine instance: its ENGINE (a functional reference), the
    library it came from, and the count of its keys still alive (C:
    mtls_users)."""

    def __init__(self, e: Any, library: _Library, users: Any) -> None:
        self.e = e
        self.library = library
        self.users = users
        self.counted = True  # every key it made is counted (OpenSSL 3)
        self.loading = 0  # key loads under way (its key is not counted yet)


class _EngineBackend:
    """One engine instance per PKCS#11 module at a time: a new instance
    would re-initialise libp11 and could log in again.  The one exception
    is ``fresh=True`` after the token was lost: libp11 0.4.12 keeps its
    module connection for the life of its instance and never
    re-initialises it (except in a forked child), so a token that went away
    (a p11-kit server restarted, a card pulled) is reached again only
    through a new instance.  The old one is *retired*: keys it made may
    still be in use (connections in flight hold their own reference), so it
    is freed only once none is left (:meth:`release_unused`; every key is
    counted in C, see mtls_users).  Freeing it closes its sessions and ends
    its connection to the module (csrc/helper.c, mtls_p11_wrap).

    OpenSSL 3 lets one engine library back only one ENGINE at a time (its
    list of dynamic engines is keyed by the library's bind function: a
    second load of the same file fails with "init failed").  So a second
    instance alive at the same time is loaded from a private copy of the
    engine library (a temporary folder of its own, removed once loaded),
    which has its own libp11 state.  Libraries are never unloaded (libp11
    leaves its error strings and EVP_PKEY methods registered with OpenSSL,
    pointing into the library) and are reused: an instance is made from a
    library whose previous instance was freed, so the number of copies is
    the largest number of instances alive at once, not the number of
    reconnections.

    Every instance reaches its module through this extension's
    C_GetFunctionList (csrc/helper.c): the module's own functions, except
    that a failed C_OpenSession makes libp11 fail the call instead of
    waiting for ever (libp11 0.4.13, after the token went away)."""

    def __init__(self) -> None:
        self._engines: dict[str, _Instance] = {}
        self._retired: list[_Instance] = []
        self._libraries: list[_Library] = []
        self._lock = _fork.ForkSafeLock()

    def _library(self, path: str) -> tuple[_Library, str | None]:
        """A loaded engine library no instance uses (a new copy when every
        one is busy), and the copy's folder to remove once it is loaded."""
        for library in self._libraries:
            if not library.busy:
                return library, None
        if not self._libraries:
            library = _Library(path, copy=False)
            if not lib.mtls_dl_keep(path.encode()):
                raise BackendUnavailable(f"cannot load libp11's engine {path}: {_dl_error()}")
            self._libraries.append(library)
            return library, None
        import shutil  # a second instance only (after a lost token)
        import tempfile

        copy_dir = None
        try:
            copy_dir = tempfile.mkdtemp(prefix="mtls_engine-")
            so_path = os.path.join(copy_dir, os.path.basename(path))
            shutil.copyfile(path, so_path)
        except OSError as exc:
            if copy_dir is not None:
                shutil.rmtree(copy_dir, ignore_errors=True)
            raise BackendUnavailable(
                f"cannot copy libp11's engine {path} for a second engine instance ({exc.strerror}); "
                "OpenSSL loads one instance per engine library. Set TMPDIR to a writable folder"
            ) from None
        if not lib.mtls_dl_keep(so_path.encode()):
            why = _dl_error()
            shutil.rmtree(copy_dir, ignore_errors=True)
            raise BackendUnavailable(
                f"cannot load a copy of libp11's engine {path} from {copy_dir} ({why}); TMPDIR must allow executables"
            )
        library = _Library(so_path, copy=True)
        self._libraries.append(library)
        return library, copy_dir

    def _open(self, module: Module) -> _Instance:
        path = engine_path()
        if path is None:
            raise BackendUnavailable(engine_status()[1])
        _guard_pin_prompts()
        self._release_unused()  # a library whose instance is gone can serve this one
        library, copy_dir = self._library(path)
        lib.ERR_clear_error()
        try:
            e = lib.mtls_engine_open(library.path.encode(), BINDING_PATH.encode(), module.path.encode(),
                                     int(module.isolated))  # fmt: skip
        finally:
            if copy_dir is not None:
                import shutil

                shutil.rmtree(copy_dir, ignore_errors=True)  # loaded: the file is no longer needed
        if e == ffi.NULL:
            errors = consume_errors()
            where = f" (loaded from a copy in {os.path.dirname(library.path)})" if library.copy else ""
            raise BackendUnavailable(
                f"cannot start libp11's engine {path} for module {module.path}{where}"
                + (f" (OpenSSL: {'; '.join(errors)})" if errors else "")
            )
        users = lib.mtls_users_new()
        if users == ffi.NULL:
            lib.mtls_engine_close(e)
            raise BackendUnavailable("out of memory starting libp11's engine")
        library.busy = True
        return _Instance(e, library, users)

    def engine(self, module: Module, *, fresh: bool = False) -> _Instance:
        """The module's current instance (a new one when ``fresh``), held
        for a key load: :meth:`done` when that key is counted."""
        with self._lock:
            inst = self._engines.get(module.path)
            if inst is None or fresh:
                new = self._open(module)
                if inst is not None:
                    self._retired.append(inst)
                inst = self._engines[module.path] = new
            inst.loading += 1
            return inst

    def done(self, inst: _Instance) -> None:
        with self._lock:
            inst.loading -= 1

    def release_unused(self) -> int:
        """Free every retired instance none of whose keys is left; returns
        how many are still alive (current and retired)."""
        with self._lock:
            self._release_unused()
            return len(self._engines) + len(self._retired)

    def _release_unused(self) -> None:
        keep = []
        for inst in self._retired:
            if not inst.counted or inst.loading or lib.mtls_users_count(inst.users) != 0:
                keep.append(inst)
                continue
            lib.mtls_engine_close(inst.e)
            consume_errors()  # libp11's teardown may leave some (a module already gone)
            lib.mtls_users_free(inst.users)
            inst.library.busy = False
        self._retired = keep

    def libraries(self) -> int:
        """Engine libraries loaded so far (libp11's own and its copies)."""
        with self._lock:
            return len(self._libraries)

    def load_private_key(
        self, module: Module, token: TokenInfo, key: KeyObject, pin: bytearray | None = None, *, fresh: bool = False
    ) -> Any:
        uri = key_uri(token, key)
        slots = ffi.new("int[4]")
        lib.mtls_p11_slots(slots, slots + 1, slots + 2, slots + 3)
        unwrapped = slots[2]
        inst = self.engine(module, fresh=fresh)
        try:
            return self._load(inst, module, token, uri, pin, unwrapped)
        finally:
            self.done(inst)

    def _load(
        self, inst: _Instance, module: Module, token: TokenInfo, uri: str, pin: bytearray | None, unwrapped: int
    ) -> Any:
        slots = ffi.new("int[4]")
        lib.ERR_clear_error()
        pin_buf = _pin_buffer(pin)
        pkey = lib.mtls_engine_load_private_key(inst.e, module.path.encode(), int(module.isolated), uri.encode(),
                                                pin_buf, len(pin or b""))  # fmt: skip
        if pkey == ffi.NULL:
            errors = consume_errors()
            raise ObjectNotFound(
                f"libp11's engine could not load the private key {uri} that mtls_engine found on "
                f"{token}" + (f" (OpenSSL: {'; '.join(errors)})" if errors else "")
            )
        pkey = ffi.gc(pkey, lib.EVP_PKEY_free)
        if not lib.mtls_pkey_track(pkey, inst.users):
            inst.counted = False  # stays loaded for the life of the process
        lib.mtls_p11_slots(slots, slots + 1, slots + 2, slots + 3)
        if slots[2] != unwrapped:
            log.warning(
                "libp11's engine for %s got the module's own function list: %d engine instances are alive "
                "(keys of earlier reconnections are still in use); with libp11 0.4.13 a lost token would "
                "block its signatures", module.path, slots[0],
            )  # fmt: skip
        return pkey


def _dl_error() -> str:
    why = lib.dlerror()
    return text(why) if why != ffi.NULL else "no reason given"


def _pin_buffer(pin: bytearray | None) -> Any:
    """A pointer into the caller's copy of a verified PIN for one backend
    call (ffi.NULL: none): no C copy is made; the caller wipes its copy."""
    return ffi.NULL if pin is None else ffi.from_buffer("char[]", pin)


class _ProviderBackend:
    """pkcs11-provider for one PKCS#11 module, each instance loaded under
    its own name into a library context of its own, never into OpenSSL's
    default one (where CPython's SSL_CTXs live): there, its decoders and
    store would take part in every certificate decoding of the process,
    file keys' handshakes included.  The key still signs for contexts of
    the default library context (OpenSSL fetches the signature from the
    key's own provider).  One module per process, as before: every
    instance answers the same ``pkcs11:`` scheme.

    After the token was lost, ``fresh=True`` loads a new instance for the
    same module, in a new library context: pkcs11-provider 1.0
    re-initialises its module only after a fork, so a connection that broke
    (a p11-kit server restarted) is never re-opened by the old instance, and
    only a separate library context lets a key be loaded from the new
    instance and not the old one.  Older instances stay loaded, unlike the engine's: every
    time OpenSSL compares the key with a certificate (X509_check_private_key,
    and SSL_use_PrivateKey at each handshake) it imports the certificate's
    public key into the key's provider and keeps that copy in the
    certificate's EVP_PKEY for the certificate's life (the context's), with
    nothing to say when it goes.  Tearing the instance down before then
    leaves that copy pointing into it (measured: SIGSEGV when the context
    is freed).  So each reconnection through pkcs11-provider keeps an
    instance, its sessions and its module connection (docs/p11kit.md)."""

    NAME = "mtls_engine_pkcs11"

    def __init__(self) -> None:
        self._module: str | None = None
        self._libctx: Any = ffi.NULL  # where the current instance lives
        self._generation = 0
        self._lock = _fork.ForkSafeLock()
        # One EVP_PKEY per token key and instance, loaded once:
        # pkcs11-provider keeps a session copy of a key it has used, which a
        # second search would find as well.
        self._keys: dict[tuple[int, str, int, str, str, int], Any] = {}

    @property
    def module(self) -> str | None:
        return self._module

    @property
    def libctx(self) -> Any:
        """The library context of the current instance (NULL before one)."""
        return self._libctx

    def activate(self, module: Module, *, fresh: bool = False) -> None:
        """Load pkcs11-provider for ``module`` (a new instance when ``fresh``)."""
        with self._lock:
            if self._module == module.path and not fresh:
                return
            if self._module is not None and self._module != module.path:
                raise BackendUnavailable(
                    f"pkcs11-provider already serves the PKCS#11 module {self._module} in this process and "
                    f"cannot serve a second one ({module.path}); use backend='engine' for it, or one module "
                    "that reaches every token (p11-kit-proxy.so)"
                )
            ok, path = provider_status()
            if not ok:
                raise BackendUnavailable(path)
            _guard_pin_prompts()
            # Every instance in a library context of its own, the first one
            # too: in OpenSSL's default one (where CPython's SSL_CTXs live)
            # pkcs11-provider's decoders and store would be consulted by
            # every certificate decoding of the process, file keys' included
            # (measured: about 1 M instructions more per handshake).
            libctx = lib.mtls_libctx_new()
            if libctx == ffi.NULL:
                raise BackendUnavailable("OpenSSL cannot create a library context for pkcs11-provider")
            text_ = "\n".join(
                ["openssl_conf = mtls_engine_init", "",
                 "[mtls_engine_init]", "providers = mtls_engine_providers", "",
                 # pkcs11-provider digests and decodes through its own library
                 # context: OpenSSL's default provider must be there too.
                 "[mtls_engine_providers]", f"{self.NAME} = mtls_engine_provider",
                 "default = mtls_engine_default", "",
                 *provider_section("mtls_engine_provider", path, module.path), "",
                 "[mtls_engine_default]", "activate = 1"]
            )  # fmt: skip
            line = ffi.new("long *")
            lib.ERR_clear_error()
            if not lib.mtls_apply_config(libctx, text_.encode(), line) or not lib.mtls_provider_loaded(
                libctx, self.NAME.encode()
            ):
                errors = consume_errors()
                if line[0] > 0:
                    errors.append(f"line {line[0]} of mtls_engine's provider configuration")
                raise BackendUnavailable(
                    f"cannot load pkcs11-provider {path} for the PKCS#11 module {module.path}"
                    + (f" (OpenSSL: {'; '.join(errors)})" if errors else "")
                )
            self._module = module.path
            self._libctx = libctx
            self._generation += 1
            # Older instances' keys are no longer handed out: whoever holds one keeps it.
            self._keys = {k: v for k, v in self._keys.items() if k[0] == self._generation}

    def instances(self) -> int:
        """pkcs11-provider instances mtls_engine loaded in this process."""
        with self._lock:
            return self._generation

    def load_private_key(
        self, module: Module, token: TokenInfo, key: KeyObject, pin: bytearray | None = None, *, fresh: bool = False
    ) -> Any:
        self.activate(module, fresh=fresh)
        with self._lock:
            # Not the serial alone: tokens may share one (all zeros on a TPM).
            slot = (self._generation, module.path, token.slot_id, token.label, token.serial, key.handle)
            cached = self._keys.get(slot)
            if cached is None:
                cached = self._keys[slot] = self._load(self._libctx, token, key, pin, copies=fresh)
            return cached

    def _load(self, libctx: Any, token: TokenInfo, key: KeyObject, pin: bytearray | None, *, copies: bool) -> Any:
        """``copies``: a new instance on a module whose state the old one
        shares may also find the session copy the old instance made of the
        key (pkcs11-provider caches keys that way, and session objects are
        the whole process's).  mtls_engine's own search found exactly one
        token object for this URI, so any further match is such a copy, and
        the first key found is taken."""
        uri = key_uri(token, key)
        count = ffi.new("int *")
        lib.ERR_clear_error()
        pin_buf = _pin_buffer(pin)
        pkey = lib.mtls_store_load_private_key(libctx, uri.encode(), pin_buf, len(pin or b""), int(copies), count)
        if pkey == ffi.NULL:
            errors = consume_errors()
            if count[0] > 1:
                raise AmbiguousUri(f"pkcs11-provider found {count[0]} private keys for {uri}; expected one")
            raise ObjectNotFound(
                f"pkcs11-provider could not load the private key {uri} that mtls_engine found on "
                f"{token}" + (f" (OpenSSL: {'; '.join(errors)})" if errors else "")
            )
        return ffi.gc(pkey, lib.EVP_PKEY_free)


def _guard_pin_prompts() -> None:
    """Before a backend is loaded: no PKCS#11 PIN prompt through OpenSSL's
    default UI (csrc/helper.c, mtls_guard_pin_prompts).  mtls_engine logs
    in itself; a backend that finds its token logged out must fail, not ask
    a terminal and try what it is given."""
    if not lib.mtls_guard_pin_prompts():
        raise BackendUnavailable("cannot install mtls_engine's PIN prompt guard (OpenSSL UI_create_method failed)")


ENGINE = _EngineBackend()
PROVIDER = _ProviderBackend()


def release_unused() -> None:
    """Free the engine instances that reconnections retired and whose keys
    are all gone (nothing else frees them)."""
    ENGINE.release_unused()


def _after_fork() -> None:
    """In a forked child (see _fork): pkcs11-provider re-initialises its
    module at its first call, so make that call now; then every module
    initialises for this process and its tokens log in again."""
    by_provider = PROVIDER.module
    woke = by_provider is None or lib.mtls_provider_wake(PROVIDER.libctx)
    errors = consume_errors()
    if not woke:
        log.warning("after fork (pid %d): pkcs11-provider did not answer: %s", os.getpid(),
                    "; ".join(errors) or "no reason given")  # fmt: skip
    for mod in list(Module._cache.values()):
        try:
            mod.after_fork(reinitialized=mod.path == by_provider)
        except Exception as exc:
            log.warning("after fork (pid %d): %s: %s", os.getpid(), mod.path, exc)


_fork.in_child("logging in to the card again", _after_fork)


def load_private_key(
    backend: str, module: Module, token: TokenInfo, key: KeyObject, pin: bytearray | None = None, *, fresh: bool = False
) -> Any:
    """The token's key as an EVP_PKEY through ``backend``.  ``pin``: the
    PIN mtls_engine's own login just verified, offered to a backend that
    asks (its connection may be a separate login); ``fresh``: through a new
    backend instance, after the token was lost."""
    if backend == "engine":
        return ENGINE.load_private_key(module, token, key, pin, fresh=fresh)
    return PROVIDER.load_private_key(module, token, key, pin, fresh=fresh)
