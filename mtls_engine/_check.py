"""``python -m mtls_engine check``: walk the whole stack, one step at a
time, and say on the first thing that is wrong what to do about it.

Each step has a stable id (the ``--json`` schema, docs/check.md), a status
(ok, warn, fail, skip), a one-line summary, a hint on warn/fail, and facts.
A failed step makes the steps that need it ``skip``.  The check logs in at
most once, with the same lockout guard as ``load_card_key``.
"""

from __future__ import annotations

import _ssl
import argparse
import datetime
import json
import os
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import _backends, _connect, _kinds, _names, _packages
from ._api import (
    _PSS_RPC_NOTE,
    MODULE_ENV,
    can_sign_pss,
    certificate_candidates,
    load_card_key,
    pick_leaf,
)
from ._cliutil import add_card_arguments, cli_pin
from ._errors import (
    AmbiguousUri,
    CertificateError,
    CertKeyMismatch,
    Error,
    ModuleLoadError,
    ObjectNotFound,
    PinFinalTry,
    PinIncorrect,
    PinLocked,
    PinRequired,
    TokenNotFound,
    UriError,
)
from ._lib import BUILT_IN_OPENSSL, InterpreterFacts, consume_errors, expected_object_header, ffi, lib, text
from ._p11 import CKR_TOKEN_NOT_RECOGNIZED, KeyObject, Module, TokenInfo, ulong_bytes
from ._pin import MEMORY, pin_getter
from ._secret import wipe
from ._uri import ParsedUri, format_uri, parse

__all__ = ["Step", "register", "run_check"]

STATUSES = ("ok", "warn", "fail", "skip")
EXPIRY_WARNING_DAYS = 30


@dataclass
class Step:
    id: str
    title: str
    status: str = "skip"
    summary: str = ""
    hint: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def ok(self, summary: str, **facts: Any) -> None:
        self.status, self.summary = "ok", summary
        self.facts.update(facts)

    def warn(self, summary: str, hint: str, **facts: Any) -> None:
        self.status, self.summary, self.hint = "warn", summary, hint
        self.facts.update(facts)

    def fail(self, summary: str, hint: str, **facts: Any) -> None:
        self.status, self.summary, self.hint = "fail", summary, hint
        self.facts.update(facts)


class _Stop(Exception):
    """A step failed; the ones after it that need its result are skipped."""


# What to do, per error class, when a step fails with that error.  The
# error's own message (what was looked for, what was found) goes in the
# summary; the hint is the short action.
_HINTS: dict[type[Error], str] = {
    ModuleLoadError: "pass --module with the path of your card's PKCS#11 library (or set $MTLS_ENGINE_MODULE), "
    "or register it with p11-kit (a .module file: 'module: /path/to/lib.so')",
    TokenNotFound: "insert the card, or fix the token=/serial= attributes of --key (see 'mtls_engine list')",
    AmbiguousUri: "add serial=... / object=... / id=... to --key so it names exactly one (see 'mtls_engine list')",
    ObjectNotFound: "fix --key's object= or id= (see 'mtls_engine list'), or pass --cert",
    UriError: "write --key as a pkcs11: URI, e.g. 'pkcs11:token=card1;object=mykey;type=private'",
    PinRequired: "give the PIN with --pin-source env:VAR or file:PATH (or run on a terminal to be asked)",
    PinIncorrect: "check the PIN before trying again: each wrong try brings the card closer to locking",
    PinFinalTry: "make sure of the PIN first (card issuer, vendor tool); then --force tries it once",
    PinLocked: "have the PIN unblocked with the security officer PIN or PUK (e.g. pkcs11-tool --unlock-pin)",
    CertKeyMismatch: "use the certificate issued for this key (--cert), or store it on the token with the key's id",
    CertificateError: "pass --cert a readable PEM or DER certificate file, or a pkcs11: URI",
}


def _hint_for(exc: Error) -> str:
    for cls in type(exc).__mro__:
        if cls in _HINTS:
            return _HINTS[cls]
    return "see the message above"


def _flag_names(flags: int) -> list[str]:
    return _names.flags(flags, _names.TOKEN_FLAGS)


def pin_state(token: TokenInfo, mod: Module | None = None) -> str:
    """ok, count_low, final_try or locked, from the token's flags;
    not_reported when no flag is set and the token (of ``mod``) is of a
    kind that never reports them (see _kinds)."""
    if token.flags & lib.CKF_USER_PIN_LOCKED:
        return "locked"
    if token.flags & lib.CKF_USER_PIN_FINAL_TRY:
        return "final_try"
    if token.flags & lib.CKF_USER_PIN_COUNT_LOW:
        return "count_low"
    if mod is not None and not _kinds.counters_reported(_kinds.kind(mod, token), token):
        return "not_reported"
    return "ok"


def token_uri(token: TokenInfo) -> str:
    """A URI naming the token: label and serial, and manufacturer and model
    where the serial says nothing (empty or all zeros, as on every TPM)."""
    attrs = [("token", token.label.encode()), ("serial", token.serial.encode())]
    if not token.serial.strip("0"):
        attrs += [("manufacturer", token.manufacturer.encode()), ("model", token.model.encode())]
    return format_uri(attrs)


class Checker:
    def __init__(
        self,
        *,
        module: str | None,
        key: str | None,
        cert: str | None,
        pin: Any,
        backend: str,
        force: bool,
        connect: str | None,
        cafile: str | None,
        timeout: float,
    ) -> None:
        self.module_arg = module
        self.key_text = key
        self.cert = cert
        self.pin = pin
        self.backend = backend
        self.force = force
        self.connect = connect
        self.cafile = cafile
        self.timeout = timeout
        self.steps: list[Step] = []
        # filled in as the steps pass
        self.chosen = ""
        self.uri: ParsedUri | None = None
        self.mod: Module | None = None
        self.token: TokenInfo | None = None
        self.key: KeyObject | None = None
        self.pkey: Any = None
        self._verified_pin: bytearray | None = None
        self.candidates: list[bytes] = []
        self.searched = ""
        self.leaf: x509.Certificate | None = None
        self.kind: str | None = None  # of the token, once found (_kinds)

    # -- running --------------------------------------------------------------

    @contextmanager
    def step(self, sid: str, title: str) -> Iterator[Step]:
        st = Step(sid, title)
        self.steps.append(st)
        try:
            yield st
        except Error as exc:
            hint = _hint_for(exc)
            if isinstance(exc, PinLocked) and self.kind is not None:
                hint = _kinds.lockout_advice(self.kind)
            elif isinstance(exc, TokenNotFound) and self.mod is not None and self.mod.unreadable:
                if any(u.rv == CKR_TOKEN_NOT_RECOGNIZED for u in self.mod.unreadable):
                    hint = (
                        "the card in the reader needs another PKCS#11 module: its own middleware's (--module), "
                        "or an OpenSC with a driver for it"
                    )
                else:
                    hint = "leave the card in the reader and run check again"
            st.fail(str(exc), hint, error=type(exc).__name__)
        if st.status == "fail":
            raise _Stop(sid)

    def run(self) -> list[Step]:
        plan: list[tuple[str, str, Callable[[Step], None]]] = [
            ("openssl", "OpenSSL", self._openssl),
            ("backends", "backends", self._backends),
            ("module", "PKCS#11 module", self._module),
            ("token", "token", self._token),
            ("login", "login", self._login),
            ("key", "private key", self._key),
            ("certificate", "certificate", self._certificate),
            ("backend_key", "key through backend", self._backend_key),
            ("match", "certificate matches key", self._match),
            ("validity", "validity period", self._validity),
            ("usage", "key usage", self._usage),
            ("mechanisms", "token mechanisms", self._mechanisms),
            ("signature", "test signature", self._signature),
            ("connect", "mTLS handshake", self._connect),
        ]
        failed = None
        for sid, title, fn in plan:
            if failed is not None:
                self.steps.append(Step(sid, title, "skip", f"not run: step '{failed}' failed"))
                continue
            try:
                with self.step(sid, title) as st:
                    fn(st)
            except _Stop as stop:
                failed = str(stop)
        wipe(self._verified_pin)  # a step failed between the login and the backend
        self._verified_pin = None
        return self.steps

    # -- the steps ------------------------------------------------------------

    def _openssl(self, st: Step) -> None:
        # Importing mtls_engine already proved _ssl and the extension share
        # one loaded libssl/libcrypto (it refuses otherwise); show which,
        # and what the interpreter check decided on.
        libssl = text(lib.mtls_library_of(lib.mtls_own_symbol(b"SSL_CTX_new")))
        libcrypto = text(lib.mtls_library_of(lib.mtls_own_symbol(b"OpenSSL_version_num")))
        here = InterpreterFacts.of_this_process()
        python = sys.version.split()[0]
        build = ", ".join(n for n, on in (("debug", here.debug), ("trace-refs", here.trace_refs)) if on) or "release"
        built_with = _number_version_text(lib.mtls_built_openssl_number())
        facts = {
            "python": python,
            "python_openssl": ssl.OPENSSL_VERSION,
            "python_openssl_built": _api_version_text(getattr(ssl, "_OPENSSL_API_VERSION", None)),
            "extension_openssl": text(lib.OpenSSL_version(0)),
            "extension_openssl_built": built_with,
            "libssl": libssl,
            "libcrypto": libcrypto,
            "same_library": BUILT_IN_OPENSSL is None,
            "interpreter": {
                "implementation": here.implementation,
                "version": python,
                "executable": sys.executable,
                "build": build,
                "debug": here.debug,
                "trace_refs": here.trace_refs,
                "free_threaded": here.free_threaded,
                "abiflags": getattr(sys, "abiflags", ""),
                "pointer_size": here.pointer_size,
                "object_header": here.object_header,
                "expected_object_header": expected_object_header(here),
                "ssl_module": getattr(_ssl, "__file__", None),
            },
        }
        summary = (
            f"{ssl.OPENSSL_VERSION}; {here.implementation} {python} ({build} build); "
            f"Python's ssl and mtls_engine share {libssl}"
        )
        if BUILT_IN_OPENSSL is not None:
            # The steps up to the test signature run on the extension's own
            # (the system's) OpenSSL; only the handshake needs Python's.
            st.warn(
                f"{ssl.OPENSSL_VERSION} built into {here.implementation} {python}; mtls_engine uses {libssl}: "
                "the steps below run, a handshake (--connect) cannot",
                str(BUILT_IN_OPENSSL),
                **facts,
            )
        elif lib.mtls_built_openssl_number() > lib.OpenSSL_version_num():
            st.warn(
                summary,
                f"mtls_engine was compiled with the headers of OpenSSL {built_with}, newer than the OpenSSL "
                f"{_number_version_text(lib.OpenSSL_version_num())} it runs with: a rebuild picks up the same "
                "headers, so first install the OpenSSL development headers matching the libssl Python's ssl "
                "uses (Debian: the libssl-dev of the same version as the libssl package providing "
                f"{libssl}), then rebuild (pip install --force-reinstall --no-binary mtls_engine mtls_engine)",
                **facts,
            )
        else:
            st.ok(summary, **facts)

    def _backends(self, st: Step) -> None:
        status = {name: dict(zip(("available", "detail"), fn())) for name, fn in _backends.STATUS.items()}
        status["engine"].update(_engine_facts())
        status["provider"].update(_provider_facts())
        st.facts.update(status)
        self.chosen, reason = _backends.choose(self.backend)
        st.facts.update(chosen=self.chosen, reason=reason)
        found = "; ".join(f"{n}: {_described(n, status[n])}" for n in ("engine", "provider"))
        # Where OpenSSL has no ENGINE API (OpenSSL 4), the provider is the
        # only backend there can be: nothing to install, nothing to warn of.
        missing = [
            f"{n}: {s['detail']}"
            for n, s in status.items()
            if not s["available"] and (n != "engine" or lib.MTLS_HAS_ENGINE)
        ]
        if missing:
            st.warn(f"using {reason}; {found}", "only one backend is available; " + "; ".join(missing))
        else:
            st.ok(f"using {reason}; {found}")

    def _module(self, st: Step) -> None:
        self.uri = parse(self.key_text or "pkcs11:", what="key")
        if self.uri.object_type not in (None, "private"):
            raise UriError(f"the key URI {self.uri.safe!r} must name a private key (type=private)")
        path = self.module_arg or self.uri.module_path or os.environ.get(MODULE_ENV)
        origin = (
            "--module" if self.module_arg else "the URI's module-path" if self.uri.module_path else f"${MODULE_ENV}"
        )
        registry = None
        if not path:
            from ._registry import choose, scan

            found, _token = choose(self.uri, isolate=True)
            path, origin = found.path, found.origin
            registry = scan(isolate=True)  # cached modules: what else is registered, and what was skipped
        mod = self.mod = Module.load(path)
        info = mod.info
        lib_version = f"{info.libraryVersion.major}.{info.libraryVersion.minor}"
        cryptoki = "{}.{}".format(*mod.cryptoki_version)
        st.ok(
            f"{mod.path} ({origin}): {mod.description} {lib_version} by {mod.manufacturer}, Cryptoki {cryptoki}",
            path=mod.path,
            manufacturer=mod.manufacturer,
            description=mod.description,
            library_version=lib_version,
            cryptoki_version=cryptoki,
            origin=origin,
        )
        if registry is not None:
            skipped = [f"{r.name} ({r.path}): {r.error}" for r in registry.modules if r.module is None]
            skipped += registry.skipped
            st.facts["registered"] = [r.path for r in registry.modules]
            st.facts["skipped"] = skipped
            if skipped:
                st.summary += "; skipped registered modules: " + "; ".join(skipped)

    def _token(self, st: Step) -> None:
        assert self.mod is not None and self.uri is not None
        tok = self.token = self.mod.find_token(self.uri)
        self.kind = _kinds.kind(self.mod, tok)
        state = pin_state(tok, self.mod)
        raw = self.mod.raw_token_info(tok.slot_id)
        facts = {
            "label": tok.label,
            "serial": tok.serial,
            "manufacturer": tok.manufacturer,
            "model": tok.model,
            "slot": tok.slot_id,
            "uri": token_uri(tok),
            "flags": _flag_names(tok.flags),
            "login_required": bool(tok.flags & lib.CKF_LOGIN_REQUIRED),
            "pinpad": tok.protected_authentication_path,
            "pin_state": state,
            "pin_length": [int(raw.ulMinPinLen), int(raw.ulMaxPinLen)],
            "token_kind": self.kind,
        }
        where = f"{tok}, slot {tok.slot_id}{', pinpad reader' if tok.protected_authentication_path else ''}"
        if state == "locked":
            st.fail(f"{where}: the user PIN is locked", _kinds.lockout_advice(self.kind), **facts)
        elif state == "final_try":
            st.fail(f"{where}: one more wrong PIN locks the card", _HINTS[PinFinalTry], **facts)
            if self.force:  # the user knows; the login step warns again
                st.warn(st.summary, "--force given: the login will use the final try", **facts)
        elif state == "count_low":
            st.warn(f"{where}: the card reports few PIN tries left", "make sure of the PIN before logging in", **facts)
        elif state == "not_reported":
            st.ok(f"{where}; PIN tries: {_kinds.NOT_REPORTED} ({_kinds.unguarded(self.kind)})", **facts)
        else:
            st.ok(f"{where}; PIN tries: not low", **facts)

    def _login(self, st: Step) -> None:
        assert self.mod is not None and self.token is not None and self.uri is not None
        tok = self.mod.token_info(self.token.slot_id)
        if not tok.flags & lib.CKF_LOGIN_REQUIRED:
            st.ok("the token needs no login", method="none")
            return
        if self.mod.logged_in(tok.slot_id):
            st.ok("already logged in (in this process)", method="session")
            return
        get_pin = pin_getter(self.pin, self.uri)
        # Kept only until the backend loads the key (p11-kit-client: its
        # connection logs in separately and is offered this verified PIN).
        self._verified_pin = self.mod.login(tok, get_pin, pin_memory=MEMORY, allow_final_try=self.force)
        if tok.protected_authentication_path:
            st.ok("logged in on the reader's pinpad (no PIN passed through software)", method="pinpad")
        else:
            st.ok("logged in (one C_Login)", method="pin")

    def _key(self, st: Step) -> None:
        assert self.mod is not None and self.token is not None and self.uri is not None
        try:
            key = self.key = self.mod.find_private_key(self.token, self.uri)
        except (ObjectNotFound, AmbiguousUri) as exc:
            keys = self.mod.find_objects(self.token.slot_id, [(lib.CKA_CLASS, ulong_bytes(lib.CKO_PRIVATE_KEY))])
            uris = [_backends.key_uri(self.token, self.mod.describe(self.token.slot_id, h)) for h in keys]
            hint = _hint_for(exc)
            if uris and self.key_text is None:
                hint = "pass --key with one of: " + ", ".join(uris)
            st.fail(str(exc), hint, error=type(exc).__name__, candidates=uris)
            return
        bits, curve = self.mod.key_size(self.token.slot_id, key.handle, key.key_type)
        kind = _names.KEY_TYPES.get(key.key_type, f"{key.key_type:#x}")
        size = f"{kind}-{bits}" if kind == "RSA" else f"{kind} {curve or f'{bits} bits'}"
        always_auth = self.mod.attribute(self.token.slot_id, key.handle, lib.CKA_ALWAYS_AUTHENTICATE)
        facts = {
            "label": key.label,
            "id": key.id.hex(),
            "type": kind,
            "bits": bits,
            "curve": curve or None,
            "uri": _backends.key_uri(self.token, key),
            "always_authenticate": always_auth == b"\x01",
        }
        summary = f"{key.label or '(no label)'} (id {key.id.hex() or 'none'}): {size}"
        if always_auth == b"\x01":
            st.fail(
                summary + "; the key demands a PIN for every signature (CKA_ALWAYS_AUTHENTICATE)",
                "use the card's authentication key (PIV slot 9a), not a signature key (9c): TLS signs "
                "every handshake and neither backend re-enters the PIN per signature",
                **facts,
            )
            return
        st.ok(summary, **facts)

    def _certificate(self, st: Step) -> None:
        assert self.mod is not None and self.token is not None and self.key is not None
        self.candidates, _chain, self.searched = certificate_candidates(self.mod, self.token, self.key, self.cert)
        certs = [x509.load_der_x509_certificate(d) for d in self.candidates]
        if self.cert is None:
            where = f"on the token, with the key's id {self.key.id.hex()}"
        elif self.cert[:7].lower() == "pkcs11:":
            where = "on the token, by --cert"
        else:
            where = f"from {self.cert}" + (f", with {len(_chain)} chain certificate(s)" if _chain else "")
        st.ok(
            "; ".join(c.subject.rfc4514_string() for c in certs) + f" ({where})",
            source="file" if self.cert and self.cert[:7].lower() != "pkcs11:" else "token",
            subjects=[c.subject.rfc4514_string() for c in certs],
            chain_certificates=len(_chain),
        )

    def _backend_key(self, st: Step) -> None:
        assert self.mod is not None and self.token is not None and self.key is not None
        pin, self._verified_pin = self._verified_pin, None
        try:
            self.pkey = _backends.load_private_key(self.chosen, self.mod, self.token, self.key, pin)
        finally:
            wipe(pin)
        st.ok(f"the {self.chosen} holds a handle to the card key (the key stays on the token)", backend=self.chosen)

    def _match(self, st: Step) -> None:
        assert self.token is not None and self.key is not None
        der, _ = pick_leaf(self.candidates, self.searched, self.pkey, self.key, self.token)
        leaf = self.leaf = x509.load_der_x509_certificate(der)
        st.ok(
            f"{leaf.subject.rfc4514_string()} (serial {leaf.serial_number:x}, issuer {leaf.issuer.rfc4514_string()})",
            subject=leaf.subject.rfc4514_string(),
            issuer=leaf.issuer.rfc4514_string(),
            serial=f"{leaf.serial_number:x}",
        )

    def _validity(self, st: Step) -> None:
        assert self.leaf is not None
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = self.leaf.not_valid_before_utc, self.leaf.not_valid_after_utc
        days = (end - now).total_seconds() / 86400
        facts = {"not_before": start.isoformat(), "not_after": end.isoformat(), "days_left": int(days)}
        if now < start:
            st.fail(
                f"not valid yet: valid from {start:%Y-%m-%d %H:%M} UTC",
                "check this machine's clock, or wait until the certificate's start date",
                **facts,
            )
        elif now > end:
            st.fail(
                f"expired on {end:%Y-%m-%d %H:%M} UTC ({int(-days)} days ago)",
                "servers refuse an expired certificate: have a new one issued for this key",
                **facts,
            )
        elif days < EXPIRY_WARNING_DAYS:
            st.warn(
                f"expires on {end:%Y-%m-%d} UTC, in {int(days)} days",
                "have the certificate renewed before it expires",
                **facts,
            )
        else:
            st.ok(f"valid until {end:%Y-%m-%d} UTC ({int(days)} days left)", **facts)

    def _usage(self, st: Step) -> None:
        assert self.leaf is not None
        ku: list[str] | None = None
        eku: list[str] | None = None
        problems = []
        try:
            kue = self.leaf.extensions.get_extension_for_class(x509.KeyUsage).value
            names = ("digital_signature", "key_encipherment", "key_agreement", "key_cert_sign", "crl_sign")
            ku = [n for n in names if getattr(kue, n)]
            if not kue.digital_signature:
                problems.append("key usage lacks digitalSignature")
        except x509.ExtensionNotFound:
            pass
        try:
            ekue = self.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            eku = [getattr(o, "_name", None) or o.dotted_string for o in ekue]
            if ExtendedKeyUsageOID.CLIENT_AUTH not in ekue and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in ekue:
                problems.append("extended key usage lacks clientAuth")
        except x509.ExtensionNotFound:
            pass
        facts = {"key_usage": ku, "extended_key_usage": eku}
        if problems:
            st.fail(
                "; ".join(problems),
                "servers refuse this certificate for client authentication: have one issued with "
                "digitalSignature and the clientAuth extended key usage",
                **facts,
            )
        else:
            shown = ", ".join(eku or ["any (no extended key usage extension)"])
            st.ok(f"fits client authentication (extended key usage: {shown})", **facts)

    def _mechanisms(self, st: Step) -> None:
        assert self.mod is not None and self.token is not None and self.key is not None
        slot, key = self.token.slot_id, self.key
        token_mechs = self.mod.mechanisms(slot)
        allowed = self.mod.allowed_mechanisms(slot, key.handle)

        def usable(m: int) -> bool:
            return m in token_mechs and (allowed is None or m in allowed)

        facts: dict[str, Any] = {
            "allowed_mechanisms": None if allowed is None else [_names.mechanism(m) for m in allowed],
        }
        if key.key_type == lib.CKK_RSA:
            pss = can_sign_pss(self.mod, self.token, key)
            pkcs1 = usable(lib.CKM_RSA_PKCS) or any(usable(m) for m in (0x40, 0x41, 0x42))
            facts.update(rsa_pss=pss, rsa_pkcs1=pkcs1, tls13=pss)
            if pss:
                st.ok("RSA-PSS available: TLS 1.3 and TLS 1.2", **facts)
            elif pkcs1:
                where = "the key's CKA_ALLOWED_MECHANISMS exclude" if allowed is not None else "the token lacks"
                st.warn(
                    f"{where} RSA-PSS: TLS 1.3 is impossible with this key; mtls_engine offers PKCS#1 v1.5 "
                    "signatures only and caps the context at TLS 1.2",
                    "a server that requires TLS 1.3 will refuse this card; use an EC key (or a card with "
                    "RSA-PSS) for TLS 1.3",
                    **facts,
                )
            else:
                st.fail(
                    "the key can make neither RSA-PSS nor PKCS#1 v1.5 signatures",
                    "TLS needs CKM_RSA_PKCS_PSS or CKM_RSA_PKCS: check the key's CKA_ALLOWED_MECHANISMS",
                    **facts,
                )
        elif key.key_type == lib.CKK_EC:
            ecdsa = usable(lib.CKM_ECDSA) or any(usable(m) for m in (0x1044, 0x1045, 0x1046))
            facts.update(ecdsa=ecdsa, tls13=ecdsa)
            if ecdsa:
                st.ok("ECDSA available: TLS 1.3 and TLS 1.2", **facts)
            else:
                st.fail("the key cannot make ECDSA signatures", "TLS needs CKM_ECDSA for an EC key", **facts)
        else:
            st.fail(
                f"key type {_names.KEY_TYPES.get(key.key_type, key.key_type)} is not supported for TLS here",
                "use an RSA or EC key",
                **facts,
            )

    def _signature(self, st: Step) -> None:
        assert self.leaf is not None and self.mod is not None and self.token is not None and self.key is not None
        data = os.urandom(32) + b"mtls_engine check"
        is_rsa = self.key.key_type == lib.CKK_RSA
        pss = is_rsa and can_sign_pss(self.mod, self.token, self.key)
        algorithm = ("RSA-PSS" if pss else "RSA-PKCS1") if is_rsa else "ECDSA"
        sig = ffi.new("unsigned char[]", 1024)
        siglen = ffi.new("size_t *", 1024)
        lib.ERR_clear_error()
        ok = bool(lib.mtls_test_sign(self.pkey, b"SHA256", int(pss), data, len(data), sig, siglen))
        errors = consume_errors()
        through_rpc = False
        if not ok and pss and self.mod.isolated:
            # p11-kit-client carries only the mechanisms its RPC can encode;
            # load_card_key then signs with PKCS#1 v1.5 (and TLS 1.2): so does
            # this check.
            pss, algorithm, through_rpc = False, "RSA-PKCS1", True
            siglen[0] = len(sig)
            ok = bool(lib.mtls_test_sign(self.pkey, b"SHA256", 0, data, len(data), sig, siglen))
            errors = consume_errors()
        if not ok:
            st.fail(
                f"the card did not make a {algorithm}-SHA256 signature ({'; '.join(errors) or 'no detail'})",
                "the token refused to sign: check the key's CKA_SIGN and CKA_ALLOWED_MECHANISMS, and "
                "run 'mtls_engine list' to see its mechanisms",
                algorithm=algorithm,
            )
            return
        signature = bytes(ffi.buffer(sig, siglen[0]))
        pub = self.leaf.public_key()
        try:
            if isinstance(pub, rsa.RSAPublicKey):
                pad: padding.AsymmetricPadding = (
                    padding.PSS(padding.MGF1(hashes.SHA256()), 32) if pss else padding.PKCS1v15()
                )
                pub.verify(signature, data, pad, hashes.SHA256())
            elif isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                raise InvalidSignature
        except InvalidSignature:
            st.fail(
                f"the card's {algorithm} signature does not verify with the certificate's public key",
                "the certificate does not belong to this key, or the card signs wrongly",
                algorithm=algorithm,
                verified=False,
            )
            return
        summary = f"{algorithm}-SHA256 made on the card, verified with the certificate's key"
        facts = {"algorithm": algorithm, "signature_bytes": len(signature), "verified": True}
        if through_rpc:
            st.warn(f"{summary}; {_PSS_RPC_NOTE}", "use an EC key (or the engine backend) for TLS 1.3", **facts)
        else:
            st.ok(summary, **facts)

    def _connect(self, st: Step) -> None:
        if not self.connect:
            st.status, st.summary = "skip", "not asked (--connect HOST:PORT makes a real mTLS handshake)"
            return
        host, port = _host_port(self.connect)
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        assert self.key_text is not None or self.key is not None
        key_uri = self.key_text if self.key_text else _backends.key_uri(self.token, self.key)  # type: ignore[arg-type]
        load_card_key(
            ctx, key_uri, cert=self.cert, module=self.mod.path if self.mod else None, pin=self.pin,
            backend=self.chosen, force=self.force,
        )  # fmt: skip
        facts: dict[str, Any] = {"host": host, "port": port}
        try:
            with socket.create_connection((host, port), timeout=self.timeout) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as tls:
                    facts.update(version=tls.version(), cipher=(tls.cipher() or ("",))[0])
                    facts["server_subject"] = _peer_subject(tls.getpeercert() or {})
                    # In TLS 1.3 the server judges the client's certificate
                    # after the client's last flight: a refusal is an alert
                    # waiting at the first read.  Silence means accepted.
                    late = _connect.drain(tls, 1.0) if tls.version() == "TLSv1.3" else None
                    alert = _connect.alert_of(late, None) if isinstance(late, ssl.SSLError) else None
        except ssl.SSLCertVerificationError as exc:
            st.fail(*_connect.server_not_trusted(exc, host, self.cafile), **facts)
            return
        except ssl.SSLError as exc:
            alert = _connect.alert_of(exc, None)
            if alert is None:
                st.fail(f"the handshake failed: {exc}", "see the OpenSSL reason above", **facts)
            else:
                st.fail(*self._alert(alert, after_handshake=False), alert=alert, **facts)
            return
        except OSError as exc:
            st.fail(
                f"cannot reach {host}:{port}: {exc.strerror or exc}",
                "check the host, the port and that the server is running",
                **facts,
            )
            return
        if alert is not None and alert != "close_notify":
            st.fail(*self._alert(alert, after_handshake=True), alert=alert, accepted=False, **facts)
            return
        facts["accepted"] = True
        st.ok(
            f"{facts['version']} {facts['cipher']} with {facts['server_subject']}; the server accepted the card",
            **facts,
        )

    def _alert(self, alert: str, *, after_handshake: bool) -> tuple[str, str]:
        """connect's reading of the alert, plus what the check knows of this card."""
        what, hint = _connect.alert_failure(alert, after_handshake=after_handshake)
        if alert in ("unknown_ca", "bad_certificate") and self.leaf is not None:
            hint += f"; the card's certificate was issued by {self.leaf.issuer.rfc4514_string()}"
        mech = next((s for s in self.steps if s.id == "mechanisms"), None)
        if alert in ("protocol_version", "handshake_failure") and mech and mech.facts.get("tls13") is False:
            hint += (
                "; this card cannot sign RSA-PSS, so it is capped at TLS 1.2: a TLS-1.3-only server cannot accept it"
            )
        return what, hint


def _api_version_text(version: Any) -> str | None:
    """ssl._OPENSSL_API_VERSION (the OpenSSL _ssl was compiled with) as text:
    (3, 0, 0, 19, 0) is 3.0.19, (1, 1, 1, 20, 15) is 1.1.1t."""
    if not isinstance(version, tuple) or len(version) < 4:
        return None
    major, minor, fix, patch = (int(x) for x in version[:4])
    if major >= 3:
        return f"{major}.{minor}.{patch}"
    return f"{major}.{minor}.{fix}" + (chr(ord("a") + patch - 1) if 0 < patch <= 26 else "")


def _number_version_text(number: int) -> str:
    """An OPENSSL_VERSION_NUMBER as text: 0x30000160 is 3.0.22 (OpenSSL 3:
    0xMNN00PP0), 0x1010114f is 1.1.1t (0xMNNFFPPS)."""
    major, minor = number >> 28, (number >> 20) & 0xFF
    if major >= 3:
        return f"{major}.{minor}.{(number >> 4) & 0xFF}"
    return _api_version_text((major, minor, (number >> 12) & 0xFF, (number >> 4) & 0xFF)) or hex(number)


def _package_facts(path: str | None) -> dict[str, Any]:
    pkg = _packages.package_of(path) if path else None
    return {"package": pkg.as_json() if pkg else None}


def _engine_facts() -> dict[str, Any]:
    """libp11's engine: where, and libp11's version (from the package: the
    engine itself does not say)."""
    path = _backends.engine_path() if lib.MTLS_HAS_ENGINE else None
    facts: dict[str, Any] = {"path": path, "implementation": "libp11" if path else None}
    facts.update(_package_facts(path))
    facts["libp11_version"] = facts["package"]["upstream"] if facts["package"] else None
    return facts


def _provider_facts() -> dict[str, Any]:
    """The provider the provider backend would load: which implementation
    (pkcs11-provider or libp11's own), what it says about itself, the
    project's version (from the package), and which of the two are in
    OpenSSL's modules folder."""
    modules = _backends.modules_dir() if lib.MTLS_HAS_PROVIDER else ""
    installed = {
        impl: (os.path.join(modules, name) if modules and os.path.exists(os.path.join(modules, name)) else None)
        for impl, name in _backends.PROVIDER_FILES.items()
    }
    override = os.environ.get("MTLS_ENGINE_PKCS11_PROVIDER")
    path = override if override and os.path.exists(override) else installed[_backends.PKCS11_PROVIDER]
    facts: dict[str, Any] = {"path": path, "installed": installed}
    if path is None:
        facts.update(implementation=None, params=None, package=None, version=None)
        return facts
    mismatch = _backends.libcrypto_mismatch(path)
    if mismatch:
        # Not loaded, not even to ask its name: it would bring a second
        # libcrypto into this process.
        pkg = _packages.package_of(path)
        facts.update(implementation=_backends.provider_implementation(path, None, pkg), params=None,
                     package=pkg.as_json() if pkg else None, version=pkg.upstream if pkg else None,
                     libcrypto_mismatch=mismatch)  # fmt: skip
        return facts
    params = _backends.describe_provider(path)
    pkg = _packages.package_of(path)
    facts.update(
        libcrypto_mismatch=None,
        implementation=_backends.provider_implementation(path, params["name"] if params else None, pkg),
        params=params,
        package=pkg.as_json() if pkg else None,
        version=pkg.upstream if pkg else None,
    )
    return facts


def _described(name: str, facts: dict[str, Any]) -> str:
    """'libp11 0.4.12 (/usr/lib/.../pkcs11.so)', 'pkcs11-provider 1.0 (...)', or 'none'."""
    if not facts.get("path"):
        return "none"
    version = facts.get("libp11_version") if name == "engine" else facts.get("version")
    what = facts.get("implementation") or "unknown"
    return f"{what}{f' {version}' if version else ''} ({facts['path']})"


def _peer_subject(peer: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or "?"


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--connect wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


# -- output ---------------------------------------------------------------------

_MARKS = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}
_ASCII = {"ok": "OK  ", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}


def render(steps: list[Step], encoding: str | None) -> str:
    try:
        "✓✗".encode(encoding or "ascii")
        marks = _MARKS
    except (UnicodeEncodeError, LookupError):
        marks = _ASCII
    width = max(len(s.title) for s in steps)
    lines = []
    for s in steps:
        lines.append(f"{marks[s.status]} {s.title:<{width}}  {s.summary}")
        if s.hint and s.status in ("warn", "fail"):
            lines.append(f"  {' ' * width}  → {s.hint}")
    failed = [s.id for s in steps if s.status == "fail"]
    warned = [s.id for s in steps if s.status == "warn"]
    if failed:
        lines.append(f"check failed at: {', '.join(failed)}")
    else:
        lines.append("all checks passed" + (f" (warnings: {', '.join(warned)})" if warned else ""))
    return "\n".join(lines)


def as_json(steps: list[Step]) -> dict[str, Any]:
    return {
        "schema": "mtls_engine-check/1",
        "ok": not any(s.status == "fail" for s in steps),
        "steps": [asdict(s) for s in steps],
    }


def run_check(args: argparse.Namespace) -> tuple[int, list[Step]]:
    checker = Checker(
        module=args.module,
        key=args.key,
        cert=args.cert,
        pin=cli_pin(args.pin_source, args.key),
        backend=args.backend,
        force=args.force,
        connect=args.connect,
        cafile=args.cafile,
        timeout=args.timeout,
    )
    steps = checker.run()
    return (1 if any(s.status == "fail" for s in steps) else 0), steps


def run(args: argparse.Namespace) -> int:
    if args.connect:
        try:
            _host_port(args.connect)
        except ValueError as exc:
            print(f"mtls_engine check: {exc}", file=sys.stderr)
            return 2
    status, steps = run_check(args)
    if args.json:
        print(json.dumps(as_json(steps), indent=2))
    else:
        print(render(steps, getattr(sys.stdout, "encoding", None)))
    return status


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "check", help="check step by step that a card key can do mutual TLS, and say what to fix"
    )
    add_card_arguments(p)
    p.add_argument("--key", metavar="URI", help="the key's pkcs11: URI (default: the one private key on the token)")
    p.add_argument(
        "--cert", metavar="URI|FILE", help="the certificate (default: the one on the token with the key's id)"
    )
    p.add_argument("--connect", metavar="HOST:PORT", help="also make a real mTLS handshake with this server")
    p.add_argument("--cafile", help="CA file to verify the --connect server (default: the system's CAs)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for --connect (default 10)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON (schema: docs/check.md)")
    p.set_defaults(func=run)
