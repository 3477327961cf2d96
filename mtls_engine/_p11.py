"""A small PKCS#11 layer over p11-kit: load a module once per process, find
the one token and the one object a URI names, and log in safely.

mtls_engine does the login itself, before the backend touches the token,
because only here can it (a) refuse a token whose PIN is on its final try or
locked, (b) refuse to log in to a token it had to guess, (c) log in on a
pinpad reader without a PIN, and (d) know the exact PKCS#11 result, so a
wrong PIN is tried exactly once.  PKCS#11 login state belongs to the whole
process, so the engine or provider then finds the token logged in.  A
session per token stays open for the life of the process: closing the last
session would log the token out.
"""

from __future__ import annotations

import atexit
import os
import time
import warnings
from collections.abc import Callable

from . import _kinds
from ._errors import (
    AmbiguousUri,
    ModuleLoadError,
    ObjectNotFound,
    PinFinalTry,
    PinIncorrect,
    PinLocked,
    PinRequired,
    PinWarning,
    Pkcs11Error,
    TokenNotFound,
)
from ._fork import ForkSafeLock
from ._lib import ffi, lib
from ._record import dataclass
from ._secret import wipe
from ._uri import ParsedUri

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

CKR_NAMES = {
    0x000: "CKR_OK",
    0x003: "CKR_SLOT_ID_INVALID",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x0A0: "CKR_PIN_INCORRECT",
    0x0A1: "CKR_PIN_INVALID",
    0x0A2: "CKR_PIN_LEN_RANGE",
    0x0A3: "CKR_PIN_EXPIRED",
    0x0A4: "CKR_PIN_LOCKED",
    0x0B0: "CKR_SESSION_CLOSED",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}


CKR_DEVICE_REMOVED = 0x032
CKR_TOKEN_NOT_PRESENT = 0x0E0
CKR_TOKEN_NOT_RECOGNIZED = 0x0E1

# C_GetTokenInfo answers that say something is in the reader but the module
# cannot read it as a token: the slot is shown as such, never an abort.
UNREADABLE_TOKEN = {
    CKR_TOKEN_NOT_RECOGNIZED: "card present, not recognised by this module",
    CKR_DEVICE_REMOVED: "card removed while it was being read",
    CKR_TOKEN_NOT_PRESENT: "card removed while it was being read",
}


@dataclass(frozen=True)
class UnreadableSlot:
    """A slot with something in its reader that the module cannot read."""

    slot_id: int
    description: str  # the reader's name (CK_SLOT_INFO)
    rv: int

    @property
    def what(self) -> str:
        return UNREADABLE_TOKEN[self.rv]

    def __str__(self) -> str:
        return f"slot {self.slot_id} ({self.description or 'no description'}): {self.what} ({ckr(self.rv)})"


def ckr(rv: int) -> str:
    return CKR_NAMES.get(rv, f"CKR {rv:#x}")


def _pad(raw: Any) -> str:
    return bytes(raw).decode("utf-8", "replace").rstrip(" \x00")


@dataclass(frozen=True)
class TokenInfo:
    """What a PIN callback is told about the token that asks for a PIN."""

    label: str
    manufacturer: str
    model: str
    serial: str
    flags: int
    slot_id: int

    @property
    def protected_authentication_path(self) -> bool:
        return bool(self.flags & lib.CKF_PROTECTED_AUTHENTICATION_PATH)

    def __str__(self) -> str:
        return f"token {self.label!r} (serial {self.serial}, {self.manufacturer} {self.model})"


@dataclass(frozen=True)
class KeyObject:
    handle: int
    id: bytes
    label: str
    key_type: int


AFTER_FORK_PATIENCE = 2.0  # seconds

# What p11-kit-client.so reports as its library while it has no connection
# to a p11-kit server (its C_Initialize succeeds all the same, with no slots).
P11_KIT_NO_CONNECTION = "p11-kit (no connection)"


class Module:
    """One loaded, initialised PKCS#11 module (cached per path; finalised
    only at interpreter exit, see finalize_all: the backend shares it).

    ``isolated``: the module gives each caller of C_GetFunctionList an
    instance of its own, with its own sessions and login
    (p11-kit-client.so: one connection, served by its own p11-kit-remote
    process, per caller).  The backend's connection then needs a login of
    its own, and this instance may be re-initialised after the token was
    lost without touching the backend's."""

    _cache: ClassVar[dict[str, Module]] = {}
    _cache_lock: ClassVar[ForkSafeLock] = ForkSafeLock()
    _exit_hook: ClassVar[bool] = False

    def __init__(self, path: str, functions: Any) -> None:
        self.path = path
        self.fl = functions
        self._lock = ForkSafeLock(reentrant=True)
        self._sessions: dict[int, int] = {}
        # Tokens logged in through this module, with how: a forked child
        # logs them in again the same way (see after_fork).
        self._logins: dict[int, tuple[TokenInfo, Callable[[TokenInfo], bytearray | None], Any, bool]] = {}
        self.fork_error: Exception | None = None  # why after_fork failed in this process, if it did
        self.unreadable: list[UnreadableSlot] = []  # as the last tokens() found them
        self._read_info()
        other = lib.mtls_module_function_list(path.encode())
        self.isolated = other != ffi.NULL and other != functions

    def _read_info(self) -> None:
        info = ffi.new("CK_INFO *")
        self._check(self.fl.C_GetInfo(info), "C_GetInfo")
        self.info = info
        self.manufacturer = _pad(info.manufacturerID)
        self.description = _pad(info.libraryDescription)
        self.cryptoki_version = (info.cryptokiVersion.major, info.cryptokiVersion.minor)

    @property
    def disconnected(self) -> bool:
        """p11-kit-client.so without a connection to its p11-kit server."""
        return self.description == P11_KIT_NO_CONNECTION

    def reopen(self) -> None:
        """After the token was lost (a p11-kit server restarted, a card
        pulled): forget this module's sessions, and re-initialise an
        isolated instance, which is the only way p11-kit-client.so
        connects again.  A shared module is never finalised here (the
        backend uses it); its next session is simply a new one."""
        with self._lock:
            self._sessions.clear()
            if not self.isolated:
                return
            self.fl.C_Finalize(ffi.NULL)
            args = ffi.new("CK_C_INITIALIZE_ARGS *")
            args.flags = lib.CKF_OS_LOCKING_OK
            rv = self.fl.C_Initialize(args)
            if rv not in (lib.CKR_OK, lib.CKR_CRYPTOKI_ALREADY_INITIALIZED):
                raise Pkcs11Error(f"C_Initialize failed with {ckr(rv)} (module {self.path})", rv)
            self._read_info()

    @classmethod
    def load(cls, path: str) -> Module:
        real = os.path.realpath(path)
        with cls._cache_lock:
            mod = cls._cache.get(real)
            if mod is not None:
                return mod
            if not os.path.exists(path):
                raise ModuleLoadError(
                    f"PKCS#11 module {path!r} does not exist; pass module= (or set "
                    "MTLS_ENGINE_MODULE) to the path of your card's PKCS#11 library, "
                    "e.g. /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
                )
            fl = lib.p11_kit_module_load(path.encode(), lib.P11_KIT_MODULE_UNMANAGED)
            if fl == ffi.NULL:
                why = lib.p11_kit_message()
                detail = ffi.string(why).decode("utf-8", "replace") if why != ffi.NULL else "unknown reason"
                raise ModuleLoadError(
                    f"cannot load PKCS#11 module {path!r}: {detail}; check that it is a PKCS#11 "
                    "library for this machine's architecture and that its dependencies are installed"
                )
            rv = _initialize(fl)
            if rv not in (lib.CKR_OK, lib.CKR_CRYPTOKI_ALREADY_INITIALIZED):
                raise ModuleLoadError(
                    f"PKCS#11 module {path!r} failed to initialise ({ckr(rv)}); check its "
                    "configuration (for SoftHSM2: SOFTHSM2_CONF and its token directory)"
                )
            mod = cls(path, fl)
            if not cls._cache and not cls._exit_hook:
                atexit.register(finalize_all)
                cls._exit_hook = True
            cls._cache[real] = mod
            return mod

    # -- slots and tokens ---------------------------------------------------

    def _check(self, rv: int, call: str, what: str = "") -> None:
        if rv != lib.CKR_OK:
            detail = f" {what}" if what else ""
            raise Pkcs11Error(f"{call} failed with {ckr(rv)}{detail} (module {self.path})", rv, call)

    def tokens(self) -> list[TokenInfo]:
        """Every slot with a token present that the module can read (the
        others are in ``unreadable`` afterwards)."""
        with self._lock:
            n = ffi.new("unsigned long *")
            self._check(self.fl.C_GetSlotList(1, ffi.NULL, n), "C_GetSlotList")
            slots = ffi.new("CK_SLOT_ID[]", max(n[0], 1))
            self._check(self.fl.C_GetSlotList(1, slots, n), "C_GetSlotList")
            out = []
            unreadable = []
            for i in range(n[0]):
                try:
                    out.append(self.token_info(int(slots[i])))
                except Pkcs11Error as exc:
                    if exc.rv not in UNREADABLE_TOKEN:
                        raise
                    unreadable.append(UnreadableSlot(int(slots[i]), self.slot_description(int(slots[i])), exc.rv))
            self.unreadable = unreadable
            return out

    def slot_description(self, slot_id: int) -> str:
        """The slot's description (a reader's name), "" when it will not say."""
        info = ffi.new("CK_SLOT_INFO *")
        if self.fl.C_GetSlotInfo(slot_id, info) != lib.CKR_OK:
            return ""
        return _pad(info.slotDescription)

    def token_info(self, slot_id: int) -> TokenInfo:
        info = self._raw_token_info(slot_id)
        return TokenInfo(
            label=_pad(info.label),
            manufacturer=_pad(info.manufacturerID),
            model=_pad(info.model),
            serial=_pad(info.serialNumber),
            flags=int(info.flags),
            slot_id=slot_id,
        )

    def _raw_token_info(self, slot_id: int) -> Any:
        info = ffi.new("CK_TOKEN_INFO *")
        self._check(self.fl.C_GetTokenInfo(slot_id, info), "C_GetTokenInfo")
        # PKCS#11 pads these fields with spaces; tpm2-pkcs11 1.9 pads the
        # model with NULs ("SW   TPM\0\0..."), which p11-kit's URI matching
        # then never matches: pad them all with spaces.
        for name in ("label", "manufacturerID", "model", "serialNumber"):
            field_ = getattr(info, name)
            raw = bytes(field_)
            end = raw.find(b"\x00")
            if end >= 0:
                ffi.memmove(field_, raw[:end] + b" " * (len(raw) - end), len(raw))
        return info

    def find_token(self, uri: ParsedUri) -> TokenInfo:
        """The one token the URI names.  TokenNotFound / AmbiguousUri."""
        if not uri.matches_module(self.info):
            raise TokenNotFound(
                f"the URI {uri.safe!r} names a library that module {self.path!r} is not "
                f"({self.manufacturer} / {self.description}); fix its library-* attributes "
                "or use the right module"
            )
        # An uninitialised token (SoftHSM2 always offers one) holds no keys.
        all_tokens = [t for t in self.tokens() if t.flags & lib.CKF_TOKEN_INITIALIZED]
        matches = []
        for tok in all_tokens:
            slot_info = ffi.new("CK_SLOT_INFO *")
            self._check(self.fl.C_GetSlotInfo(tok.slot_id, slot_info), "C_GetSlotInfo")
            if uri.matches_slot(tok.slot_id, slot_info) and uri.matches_token(self._raw_token_info(tok.slot_id)):
                matches.append(tok)
        if not matches:
            if self.disconnected:
                address = os.environ.get("P11_KIT_SERVER_ADDRESS") or "(P11_KIT_SERVER_ADDRESS is not set)"
                raise TokenNotFound(
                    f"no token matches {uri.safe!r}: {self.path!r} has no connection to a p11-kit server "
                    f"(address {address}). Start the server (p11-kit server --provider MODULE 'pkcs11:...') "
                    "and set P11_KIT_SERVER_ADDRESS to the address it prints"
                )
            present = ", ".join(str(t) for t in all_tokens) or "none"
            if self.unreadable:
                cards = "; ".join(
                    f"a card is in reader {u.description!r} (slot {u.slot_id}) but this module "
                    f"{'does not recognise it' if u.rv == CKR_TOKEN_NOT_RECOGNIZED else 'lost it while reading it'} "
                    f"({ckr(u.rv)})"
                    for u in self.unreadable
                )
                advice = (
                    "Use the PKCS#11 module of the card's own middleware (--module), or an OpenSC with a "
                    "driver for this card"
                    if any(u.rv == CKR_TOKEN_NOT_RECOGNIZED for u in self.unreadable)
                    else "Leave the card in the reader and try again"
                )
                raise TokenNotFound(
                    f"no token matches {uri.safe!r} in module {self.path!r}: {cards}; tokens present: "
                    f"{present}. {advice}"
                )
            raise TokenNotFound(
                f"no token matches {uri.safe!r} in module {self.path!r}; tokens present: "
                f"{present}. Insert the card, or fix the URI's token/serial attributes"
            )
        if len(matches) > 1:
            raise AmbiguousUri(
                f"{len(matches)} tokens match {uri.safe!r}: "
                + ", ".join(str(t) for t in matches)
                + ". Add serial=... (or token=...) to the URI so it names exactly one; "
                "mtls_engine does not log in to a token it would have to guess"
            )
        return matches[0]

    # -- sessions and login --------------------------------------------------

    def session(self, slot_id: int) -> int:
        """The long-lived session of this token (kept open to keep the login)."""
        with self._lock:
            h = self._sessions.get(slot_id)
            if h is not None:
                return h
            out = ffi.new("CK_SESSION_HANDLE *")
            self._check(
                self.fl.C_OpenSession(slot_id, lib.CKF_SERIAL_SESSION, ffi.NULL, ffi.NULL, out),
                "C_OpenSession",
            )
            self._sessions[slot_id] = int(out[0])
            return int(out[0])

    def logged_in(self, slot_id: int) -> bool:
        info = ffi.new("CK_SESSION_INFO *")
        self._check(self.fl.C_GetSessionInfo(self.session(slot_id), info), "C_GetSessionInfo")
        return info.state in (lib.CKS_RO_USER_FUNCTIONS, lib.CKS_RW_USER_FUNCTIONS)

    def login(
        self,
        token: TokenInfo,
        get_pin: Callable[[TokenInfo], bytearray | None],
        *,
        pin_memory: Any,
        allow_final_try: bool = False,
    ) -> bytearray | None:
        """Log the token in, at most one C_Login, only when it is safe.

        Returns the PIN this C_Login accepted (None when no PIN was used:
        already logged in, no login needed, or a pinpad), so that a backend
        whose connection to the token is separate from this one
        (p11-kit-client.so) can be offered that verified PIN and nothing
        else; the caller wipes it (``_pin.wipe``) once the backend is done."""
        with self._lock:
            verified = self._login(token, get_pin, pin_memory, allow_final_try)
            self._logins.setdefault(token.slot_id, (token, get_pin, pin_memory, allow_final_try))
            return verified

    def _login(
        self,
        token: TokenInfo,
        get_pin: Callable[[TokenInfo], bytearray | None],
        pin_memory: Any,
        allow_final_try: bool,
        again: bool = False,
    ) -> bytearray | None:
        with self._lock:
            if self.logged_in(token.slot_id):
                _same_pin_or_raise(token, get_pin, pin_memory)
                return None
            fresh = self.token_info(token.slot_id)
            if not fresh.flags & lib.CKF_LOGIN_REQUIRED:
                return None
            if fresh.flags & lib.CKF_USER_PIN_LOCKED:
                raise PinLocked(
                    f"the user PIN of {fresh} is locked; mtls_engine did not try to log in. "
                    f"{_capital(_kinds.lockout_advice(_kinds.kind(self, fresh)))}"
                )
            if fresh.flags & lib.CKF_USER_PIN_FINAL_TRY:
                if not allow_final_try:
                    raise PinFinalTry(
                        f"{fresh} reports that one more wrong PIN will lock it, so mtls_engine did "
                        "not log in. Make sure of the PIN (your card issuer or its tool), then pass "
                        "force=True (--force) to try it once"
                    )
                warnings.warn(
                    f"{fresh} is on its final PIN try; logging in anyway because force=True was given",
                    PinWarning,
                    stacklevel=4,
                )
            if fresh.protected_authentication_path:
                pin = None  # pinpad reader: the PIN is entered on the reader
            else:
                pin = get_pin(fresh)
                if pin is None:
                    raise PinRequired(
                        f"{fresh} needs a PIN and none was given; pass pin= (a str, bytes, a callable "
                        "or mtls_engine.pin_source('env:VAR'|'file:PATH'|'prompt')), --pin-source on the "
                        "command line, or add pin-source=file:... to the URI"
                    )
            try:
                return self._login_with(token, fresh, pin, pin_memory, again)
            except BaseException:
                wipe(pin)  # only a PIN that logged in goes back to the caller
                raise

    def _login_with(
        self, token: TokenInfo, fresh: TokenInfo, pin: bytearray | None, pin_memory: Any, again: bool
    ) -> bytearray | None:
        """``_login``'s checks on the PIN and its one C_Login (lock held)."""
        known_good: bool | None = None
        if pin is not None:
            if pin_memory.rejected(fresh, pin):
                raise PinIncorrect(
                    f"{fresh} already rejected this PIN in this process; mtls_engine will "
                    "not offer it again (each wrong try brings the card closer to locking)"
                )
            known_good = again and pin_memory.compare_accepted(fresh, pin)
            if again and known_good is False:
                raise PinIncorrect(
                    f"{fresh} must log in again in this forked process, and the PIN source now "
                    "gives another PIN than the one that logged it in before; mtls_engine did "
                    "not try it (every worker would spend a try). Fix the PIN source and restart"
                )
        session = self.session(token.slot_id)
        if pin is None:
            rv = self.fl.C_Login(session, lib.CKU_USER, ffi.NULL, 0)
        else:
            # A pointer into the caller's bytearray: no C copy to wipe.
            rv = self.fl.C_Login(session, lib.CKU_USER, ffi.from_buffer("unsigned char[]", pin), len(pin))
        if rv in (lib.CKR_OK, lib.CKR_USER_ALREADY_LOGGED_IN):
            if pin is not None and rv == lib.CKR_OK:
                pin_memory.accepted(fresh, pin)
            return pin
        if rv == lib.CKR_PIN_INCORRECT:
            if pin is not None:
                pin_memory.remember(fresh, pin)
            after = self.token_info(token.slot_id)
            state = ""
            if after.flags & lib.CKF_USER_PIN_LOCKED:
                state = " The PIN is now locked."
            elif after.flags & lib.CKF_USER_PIN_FINAL_TRY:
                state = " One try is left before the card locks."
            elif after.flags & lib.CKF_USER_PIN_COUNT_LOW:
                state = " Few tries are left."
            elif not _kinds.counters_reported(_kinds.kind(self, after), after):
                state = " This token does not say how many tries are left."
            raise PinIncorrect(
                f"{fresh} rejected the PIN (CKR_PIN_INCORRECT); it was tried once and will not "
                f"be tried again.{state} Check the PIN before retrying"
            )
        if rv == lib.CKR_PIN_LOCKED:
            raise PinLocked(
                f"the user PIN of {fresh} is locked (CKR_PIN_LOCKED). "
                f"{_capital(_kinds.lockout_advice(_kinds.kind(self, fresh)))}"
            )
        if rv == lib.CKR_PIN_LEN_RANGE:
            raise PinIncorrect(f"{fresh} refused the PIN because of its length (CKR_PIN_LEN_RANGE); check the PIN")
        try:
            self._check(rv, "C_Login", f"on {fresh}")
        except Pkcs11Error as exc:
            # Not a PIN verdict, and the very PIN that logged in before:
            # trying it again cannot cost a try (see after_fork).
            exc.retry_safe = bool(known_good)
            raise
        return None  # not reached: _check raised

    def after_fork(self, reinitialized: bool) -> None:
        """In a forked child: forget the parent's sessions, initialise the
        module for this process (``reinitialized``: a backend just did, with
        C_Finalize and C_Initialize), and log in again every token that was
        logged in, with the PIN source used before.  A token still logged in
        (a module whose state survived the fork) costs no C_Login.  A
        failure is also kept in ``fork_error`` (see _reconnect)."""
        try:
            self._after_fork(reinitialized)
        except Exception as exc:
            self.fork_error = exc
            raise

    def _after_fork(self, reinitialized: bool) -> None:
        self.fork_error = None
        with self._lock:
            self._sessions.clear()
            if not reinitialized:
                self._initialize_in_child()
            for token, get_pin, pin_memory, allow_final_try in list(self._logins.values()):
                # A module re-initialising in several children at once can
                # miss its token (measured: SoftHSM2 in 1 child out of 6 finds
                # no token while the others log in and write its file).  Look
                # again for up to AFTER_FORK_PATIENCE seconds; where a backend
                # already re-initialised the module, initialise it afresh
                # (nothing of the backend's is open yet).  After a failed
                # C_Login only when it was no PIN verdict for the PIN that
                # logged in before the fork (SoftHSM2 answers such a race
                # with CKR_GENERAL_ERROR too).
                deadline = time.monotonic() + AFTER_FORK_PATIENCE
                pause = 0.01
                while True:
                    try:
                        wipe(self._login(token, get_pin, pin_memory, allow_final_try, again=True))
                        break
                    except Pkcs11Error as exc:
                        if (exc.call == "C_Login" and not exc.retry_safe) or time.monotonic() + pause > deadline:
                            raise
                    time.sleep(pause)
                    pause = min(pause * 2, 0.2)
                    self._sessions.clear()
                    if reinitialized:
                        self.fl.C_Finalize(ffi.NULL)
                    self._initialize_in_child()

    def _initialize_in_child(self) -> None:
        rv = _initialize(self.fl)
        if rv not in (lib.CKR_OK, lib.CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise Pkcs11Error(f"C_Initialize failed with {ckr(rv)} in a forked child (module {self.path})", rv)

    # -- objects -----------------------------------------------------------

    def find_objects(self, slot_id: int, template: list[tuple[int, bytes]]) -> list[int]:
        """Handles of the token's own (persistent) objects matching the
        template.  Session objects are left out: they are not what a URI
        names, and a backend may make session copies of keys
        (pkcs11-provider caches keys that way)."""
        template = [*template, (lib.CKA_TOKEN, b"\x01")]
        with self._lock:
            session = self.session(slot_id)
            keep = []
            attrs = ffi.new("CK_ATTRIBUTE[]", max(len(template), 1))
            for i, (atype, value) in enumerate(template):
                buf = ffi.new("unsigned char[]", value or b"\x00")
                keep.append(buf)
                attrs[i].type = atype
                attrs[i].pValue = buf
                attrs[i].ulValueLen = len(value)
            self._check(self.fl.C_FindObjectsInit(session, attrs, len(template)), "C_FindObjectsInit")
            found: list[int] = []
            try:
                handles = ffi.new("CK_OBJECT_HANDLE[]", 32)
                n = ffi.new("unsigned long *")
                while True:
                    self._check(self.fl.C_FindObjects(session, handles, 32, n), "C_FindObjects")
                    found.extend(int(handles[i]) for i in range(n[0]))
                    if n[0] < 32:
                        break
            finally:
                self.fl.C_FindObjectsFinal(session)
            return found

    def attribute(self, slot_id: int, handle: int, atype: int) -> bytes | None:
        with self._lock:
            session = self.session(slot_id)
            attr = ffi.new("CK_ATTRIBUTE *")
            attr.type = atype
            attr.pValue = ffi.NULL
            rv = self.fl.C_GetAttributeValue(session, handle, attr, 1)
            if rv != lib.CKR_OK or attr.ulValueLen == int(ffi.cast("unsigned long", -1)):
                return None
            buf = ffi.new("unsigned char[]", max(attr.ulValueLen, 1))
            attr.pValue = buf
            rv = self.fl.C_GetAttributeValue(session, handle, attr, 1)
            if rv != lib.CKR_OK:
                return None
            return bytes(ffi.buffer(buf, attr.ulValueLen))

    def ulong_attribute(self, slot_id: int, handle: int, atype: int) -> int | None:
        raw = self.attribute(slot_id, handle, atype)
        if raw is None or len(raw) != ffi.sizeof("unsigned long"):
            return None
        return int(ffi.cast("unsigned long *", ffi.from_buffer(raw))[0])

    def describe(self, slot_id: int, handle: int) -> KeyObject:
        key_type = self.ulong_attribute(slot_id, handle, lib.CKA_KEY_TYPE)  # CKK_RSA is 0
        return KeyObject(
            handle=handle,
            id=self.attribute(slot_id, handle, lib.CKA_ID) or b"",
            label=(self.attribute(slot_id, handle, lib.CKA_LABEL) or b"").decode("utf-8", "replace"),
            key_type=-1 if key_type is None else key_type,
        )

    def find_private_key(self, token: TokenInfo, uri: ParsedUri) -> KeyObject:
        """The one private key the URI names on ``token``."""
        template = [(t, v) for t, v in uri.object_template() if t != lib.CKA_CLASS]
        template.append((lib.CKA_CLASS, ulong_bytes(lib.CKO_PRIVATE_KEY)))
        handles = self.find_objects(token.slot_id, template)
        if not handles:
            others = self.find_objects(token.slot_id, [(lib.CKA_CLASS, ulong_bytes(lib.CKO_PRIVATE_KEY))])
            listing = ", ".join(_show(self.describe(token.slot_id, h)) for h in others) or "none"
            raise ObjectNotFound(
                f"no private key matches {uri.describe_object()} on {token}; private keys "
                f"there: {listing}. Fix the URI's object= or id="
            )
        if len(handles) > 1:
            listing = ", ".join(_show(self.describe(token.slot_id, h)) for h in handles)
            raise AmbiguousUri(
                f"{len(handles)} private keys match {uri.describe_object()} on {token}: "
                f"{listing}. Add object=... or id=... to the URI so it names exactly one"
            )
        return self.describe(token.slot_id, handles[0])

    def certificates(self, slot_id: int, template: list[tuple[int, bytes]]) -> list[bytes]:
        """DER of every certificate matching the template."""
        template = [(t, v) for t, v in template if t != lib.CKA_CLASS]
        template.append((lib.CKA_CLASS, ulong_bytes(lib.CKO_CERTIFICATE)))
        out = []
        for h in self.find_objects(slot_id, template):
            der = self.attribute(slot_id, h, lib.CKA_VALUE)
            if der:
                out.append(der)
        return out

    def slots(self) -> list[tuple[int, Any]]:
        """Every slot, with or without a token: (slot id, CK_SLOT_INFO)."""
        with self._lock:
            n = ffi.new("unsigned long *")
            self._check(self.fl.C_GetSlotList(0, ffi.NULL, n), "C_GetSlotList")
            ids = ffi.new("CK_SLOT_ID[]", max(n[0], 1))
            self._check(self.fl.C_GetSlotList(0, ids, n), "C_GetSlotList")
            out = []
            for i in range(n[0]):
                info = ffi.new("CK_SLOT_INFO *")
                self._check(self.fl.C_GetSlotInfo(ids[i], info), "C_GetSlotInfo")
                out.append((int(ids[i]), info))
            return out

    def raw_token_info(self, slot_id: int) -> Any:
        return self._raw_token_info(slot_id)

    def mechanism_info(self, slot_id: int, mechanism: int) -> tuple[int, int, int] | None:
        """(min key size, max key size, flags), or None when the module will not say."""
        info = ffi.new("CK_MECHANISM_INFO *")
        if self.fl.C_GetMechanismInfo(slot_id, mechanism, info) != lib.CKR_OK:
            return None
        return int(info.ulMinKeySize), int(info.ulMaxKeySize), int(info.flags)

    def key_size(self, slot_id: int, handle: int, key_type: int) -> tuple[int, str]:
        """(bits, curve name or "") of a key object; 0 bits when unknown."""
        from ._names import CURVES

        if key_type == lib.CKK_RSA:
            modulus = self.attribute(slot_id, handle, lib.CKA_MODULUS)
            return (len(modulus.lstrip(b"\x00")) * 8 if modulus else 0), ""
        params = self.attribute(slot_id, handle, lib.CKA_EC_PARAMS)
        if params:
            name, bits = CURVES.get(params, ("", 0))
            return bits, name
        return 0, ""

    def allowed_mechanisms(self, slot_id: int, handle: int) -> list[int] | None:
        """The key's CKA_ALLOWED_MECHANISMS, or None when it sets none (any
        mechanism the token has)."""
        raw = self.attribute(slot_id, handle, lib.CKA_ALLOWED_MECHANISMS)
        if not raw:
            return None
        n = len(raw) // ffi.sizeof("unsigned long")
        arr = ffi.cast("unsigned long *", ffi.from_buffer(raw))
        return [int(arr[i]) for i in range(n)]

    def mechanisms(self, slot_id: int) -> set[int]:
        with self._lock:
            n = ffi.new("unsigned long *")
            if self.fl.C_GetMechanismList(slot_id, ffi.NULL, n) != lib.CKR_OK:
                return set()
            # One element more than asked for: p11-kit-client 0.24 reads one
            # past the array it fills (mechanism_list_purge, fixed upstream).
            mechs = ffi.new("CK_MECHANISM_TYPE[]", n[0] + 1)
            if self.fl.C_GetMechanismList(slot_id, mechs, n) != lib.CKR_OK:
                return set()
            return {int(mechs[i]) for i in range(n[0])}


def finalize_all() -> None:
    """At interpreter exit: C_Finalize every module loaded here.  (Where
    the module gives each caller an instance of its own, p11-kit-client.so,
    the backend's instance is the backend's to finalise.)

    Without it a token reached with no resource manager in between (a TPM
    through /dev/tpm0 or a simulator socket) keeps the objects and sessions
    of every process that ended: a TPM holds 3 of each, so the third process
    in a row fails to log in.  This runs among Python's exit handlers, so
    before OpenSSL's own clean-up: the backend finds the module finalised
    (every later call answers CKR_CRYPTOKI_NOT_INITIALIZED) and never
    finalises it itself (pkcs11-provider runs with the no-deinit quirk:
    SoftHSM2 finalised from OpenSSL's clean-up crashes, see _config)."""
    with Module._cache_lock:
        modules = list(Module._cache.values())
        Module._cache.clear()
    for mod in modules:
        with mod._lock:
            mod._sessions.clear()
            mod._logins.clear()
            mod.fl.C_Finalize(ffi.NULL)


def _same_pin_or_raise(token: TokenInfo, get_pin: Callable[[TokenInfo], bytearray | None], pin_memory: Any) -> None:
    """For a token this process has logged in already: a PIN given as a
    value that differs from the one that logged it in raises PinIncorrect.
    The token keeps one login per process and would never check that PIN,
    so the card-holder who mistyped it would learn nothing now and lose a
    try in the next process.  A callable or PIN source is not consulted (a
    login is not needed, so nobody is asked); a pinpad takes no PIN."""
    if token.protected_authentication_path:
        return
    given = getattr(get_pin, "given", None)
    pin = given() if callable(given) else None
    if pin is None:
        return
    try:
        differs = pin_memory.compare_accepted(token, pin) is False
    finally:
        wipe(pin)
    if differs:
        raise PinIncorrect(
            f"this PIN differs from the one that logged {token} in earlier in this process; the token was "
            "not asked (it stays logged in and would not check it, and a wrong PIN would cost a try in the "
            "next process). Give the PIN that logged it in, or pin=None to use that login"
        )


def _initialize(fl: Any) -> int:
    args = ffi.new("CK_C_INITIALIZE_ARGS *")
    args.flags = lib.CKF_OS_LOCKING_OK
    return int(fl.C_Initialize(args))


def ulong_bytes(value: int) -> bytes:
    """A CK_ULONG attribute value, as the module expects it in a template."""
    return bytes(ffi.buffer(ffi.new("unsigned long *", value)))


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _show(obj: KeyObject) -> str:
    return f"{obj.label or '(no label)'} (id {obj.id.hex() or 'none'})"
