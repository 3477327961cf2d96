"""``python -m mtls_engine list``: what a PKCS#11 module offers — its own
information, every slot and token, each token's mechanisms (with key sizes
and flags) and objects (certificates with subject, issuer and validity;
keys with type, size, id, label and the URI that names them).

Private keys are usually visible only after a login.  ``list`` logs in only
when asked (``--login``), to one token (``--token URI`` when there are
several), with the same lockout guard as everything else.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from cryptography import x509

from . import _kinds, _names
from ._api import MODULE_ENV
from ._backends import key_uri
from ._check import pin_state, token_uri
from ._cliutil import add_card_arguments, cli_pin
from ._errors import ModuleLoadError, Pkcs11Error
from ._lib import lib
from ._p11 import UNREADABLE_TOKEN, KeyObject, Module, TokenInfo, _pad, ckr, ulong_bytes
from ._pin import MEMORY, pin_getter
from ._secret import wipe
from ._uri import parse

__all__ = ["describe_module", "register"]

_CLASSES = (
    ("certificate", lib.CKO_CERTIFICATE),
    ("private_key", lib.CKO_PRIVATE_KEY),
    ("public_key", lib.CKO_PUBLIC_KEY),
)


def _version(v: Any) -> str:
    return f"{v.major}.{v.minor}"


def _mechanisms(mod: Module, slot: int) -> list[dict[str, Any]]:
    out = []
    for m in sorted(mod.mechanisms(slot)):
        info = mod.mechanism_info(slot, m)
        entry: dict[str, Any] = {"id": m, "name": _names.mechanism(m)}
        if info is not None:
            entry.update(
                min_key_size=info[0], max_key_size=info[1], flags=_names.flags(info[2], _names.MECHANISM_FLAGS)
            )
        out.append(entry)
    return out


def _certificate(mod: Module, token: TokenInfo, handle: int) -> dict[str, Any]:
    obj = mod.describe(token.slot_id, handle)
    entry: dict[str, Any] = {"class": "certificate", "label": obj.label, "id": obj.id.hex()}
    der = mod.attribute(token.slot_id, handle, lib.CKA_VALUE)
    try:
        cert = x509.load_der_x509_certificate(der or b"")
    except ValueError as exc:
        entry["error"] = f"unreadable certificate: {exc}"
        return entry
    entry.update(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
    )
    return entry


def _key(mod: Module, token: TokenInfo, handle: int, cls: str) -> dict[str, Any]:
    obj = mod.describe(token.slot_id, handle)
    bits, curve = mod.key_size(token.slot_id, handle, obj.key_type)
    entry: dict[str, Any] = {
        "class": cls,
        "label": obj.label,
        "id": obj.id.hex(),
        "type": _names.KEY_TYPES.get(obj.key_type, f"{obj.key_type:#x}"),
        "bits": bits,
        "curve": curve or None,
    }
    if cls == "private_key":
        allowed = mod.allowed_mechanisms(token.slot_id, handle)
        entry["allowed_mechanisms"] = None if allowed is None else [_names.mechanism(m) for m in allowed]
        entry["uri"] = key_uri(token, KeyObject(handle, obj.id, obj.label, obj.key_type))
    return entry


def _objects(mod: Module, token: TokenInfo) -> list[dict[str, Any]]:
    out = []
    for cls, value in _CLASSES:
        for h in mod.find_objects(token.slot_id, [(lib.CKA_CLASS, ulong_bytes(value))]):
            out.append(_certificate(mod, token, h) if cls == "certificate" else _key(mod, token, h, cls))
    return out


def describe_module(mod: Module, login_slot: int | None = None) -> dict[str, Any]:
    """Everything ``list`` shows, as data."""
    info = mod.info
    data: dict[str, Any] = {
        "schema": "mtls_engine-list/1",
        "module": {
            "path": mod.path,
            "manufacturer": mod.manufacturer,
            "description": mod.description,
            "library_version": _version(info.libraryVersion),
            "cryptoki_version": "{}.{}".format(*mod.cryptoki_version),
        },
        "slots": [],
    }
    for slot_id, sinfo in mod.slots():
        slot: dict[str, Any] = {
            "id": slot_id,
            "description": _pad(sinfo.slotDescription),
            "manufacturer": _pad(sinfo.manufacturerID),
            "flags": _names.flags(int(sinfo.flags), _names.SLOT_FLAGS),
            "token": None,
        }
        data["slots"].append(slot)
        if not sinfo.flags & lib.CKF_TOKEN_PRESENT:
            continue
        try:
            tok = mod.token_info(slot_id)
        except Pkcs11Error as exc:
            if exc.rv not in UNREADABLE_TOKEN:
                raise
            # Something is in the reader that the module cannot read as a
            # token: say so, and go on with the other slots.
            slot["token_error"] = {"code": ckr(exc.rv), "text": UNREADABLE_TOKEN[exc.rv]}
            continue
        raw = mod.raw_token_info(slot_id)
        tdata: dict[str, Any] = {
            "label": tok.label,
            "serial": tok.serial,
            "manufacturer": tok.manufacturer,
            "model": tok.model,
            "uri": token_uri(tok),
            "flags": _names.flags(tok.flags, _names.TOKEN_FLAGS),
            "initialized": bool(tok.flags & lib.CKF_TOKEN_INITIALIZED),
            "pin_state": pin_state(tok, mod),
            "token_kind": _kinds.kind(mod, tok),
            "pinpad": tok.protected_authentication_path,
            "pin_length": [int(raw.ulMinPinLen), int(raw.ulMaxPinLen)],
            "hardware_version": _version(raw.hardwareVersion),
            "firmware_version": _version(raw.firmwareVersion),
            "mechanisms": _mechanisms(mod, slot_id),
            "logged_in": False,
            "objects": [],
        }
        slot["token"] = tdata
        if tdata["initialized"]:
            tdata["logged_in"] = (
                not tok.flags & lib.CKF_LOGIN_REQUIRED or slot_id == login_slot or mod.logged_in(slot_id)
            )
            tdata["objects"] = _objects(mod, tok)
    return data


def render(data: dict[str, Any]) -> str:
    m = data["module"]
    lines = [
        f"module {m['path']}",
        f"  {m['description']} {m['library_version']} by {m['manufacturer']}, Cryptoki {m['cryptoki_version']}",
    ]
    for slot in data["slots"]:
        lines.append(f"slot {slot['id']}: {slot['description']} ({', '.join(slot['flags']) or 'no flags'})")
        t = slot["token"]
        if t is None:
            err = slot.get("token_error")
            lines.append(f"  {err['text']} ({err['code']})" if err else "  no token")
            continue
        if not t["initialized"]:
            lines.append(f"  token not initialised ({t['manufacturer']} {t['model']})")
            continue
        state = _kinds.NOT_REPORTED if t["pin_state"] == "not_reported" else t["pin_state"].replace("_", " ")
        pin = f"tries {state}" + (", pinpad reader" if t["pinpad"] else "")
        lines.append(f"  token {t['label']!r} serial {t['serial']} ({t['manufacturer']} {t['model']})")
        lines.append(f"    uri    {t['uri']}")
        lines.append(f"    kind   {t['token_kind'].replace('_', ' ')}")
        lines.append(f"    PIN    {pin} (length {t['pin_length'][0]}-{t['pin_length'][1]})")
        lines.append(f"    flags  {', '.join(t['flags'])}")
        lines.append(f"    mechanisms ({len(t['mechanisms'])}):")
        for mech in t["mechanisms"]:
            sizes = f" {mech['min_key_size']}-{mech['max_key_size']}" if mech.get("max_key_size") else ""
            flags = " ".join(f.removeprefix("CKF_").lower() for f in mech.get("flags", []))
            lines.append(f"      {mech['name']:<28}{sizes:<12} {flags}")
        seen = "" if t["logged_in"] else " (not logged in: private objects hidden; add --login)"
        lines.append(f"    objects ({len(t['objects'])}){seen}:")
        for o in t["objects"]:
            ident = f"{o['label'] or '(no label)'} id {o['id'] or 'none'}"
            if o["class"] == "certificate":
                if "error" in o:
                    lines.append(f"      certificate  {ident}: {o['error']}")
                else:
                    lines.append(f"      certificate  {ident}: {o['subject']}")
                    valid = f"valid {o['not_before'][:10]} to {o['not_after'][:10]}"
                    lines.append(f"                   issuer {o['issuer']}, {valid}")
            else:
                size = f"{o['type']}-{o['bits']}" if o["type"] == "RSA" else f"{o['type']} {o['curve'] or o['bits']}"
                kind = "private key" if o["class"] == "private_key" else "public key "
                lines.append(f"      {kind}  {ident}: {size}")
                if o.get("uri"):
                    lines.append(f"                   {o['uri']}")
    return "\n".join(lines)


def _run_registry(args: argparse.Namespace) -> int:
    """``list`` with no module given: every module registered with p11-kit."""
    from ._registry import HOW_TO_REGISTER, choose, scan

    login: tuple[str, int] | None = None
    if args.login:
        uri = parse(args.token or "pkcs11:", what="token")
        found, token = choose(uri, isolate=True)  # AmbiguousUri when several: never log in to a guess
        assert found.module is not None
        wipe(found.module.login(token, pin_getter(cli_pin(args.pin_source, args.token), uri), pin_memory=MEMORY,
                                allow_final_try=args.force))  # fmt: skip
        login = (found.path, token.slot_id)
    reg = scan(isolate=True)
    if not reg.modules and not reg.skipped:
        raise ModuleLoadError(f"no PKCS#11 module given and none is registered with p11-kit; {HOW_TO_REGISTER}")
    data: dict[str, Any] = {"schema": "mtls_engine-list-registry/1", "modules": [], "skipped": []}
    for r in reg.modules:
        if r.module is None:
            data["skipped"].append({"name": r.name, "path": r.path, "file": r.file, "error": r.error})
            continue
        slot = login[1] if login is not None and login[0] == r.path else None
        try:
            one = describe_module(r.module, slot)
        except Pkcs11Error as exc:  # one module's failure is reported, never fatal
            data["skipped"].append({"name": r.name, "path": r.path, "file": r.file, "error": str(exc)})
            continue
        one["module"].update(name=r.name, file=r.file, origin=r.origin)
        data["modules"].append(one)
    data["skipped"] += [{"name": None, "path": None, "file": None, "error": s} for s in reg.skipped]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    parts = [f"{len(data['modules'])} module(s) registered with p11-kit"]
    for one in data["modules"]:
        parts.append(f"== {one['module']['name']}: {one['module']['origin']}\n{render(one)}")
    for sk in data["skipped"]:
        who = f"{sk['name']} ({sk['path']})" if sk["name"] else "a registered module"
        parts.append(f"== skipped {who}: {sk['error']}")
    print("\n".join(parts))
    return 0


def run(args: argparse.Namespace) -> int:
    path = args.module or os.environ.get(MODULE_ENV)
    if not path:
        return _run_registry(args)
    mod = Module.load(path)
    login_slot = None
    if args.login:
        uri = parse(args.token or "pkcs11:", what="token")
        token = mod.find_token(uri)  # AmbiguousUri when several: never log in to a guess
        wipe(mod.login(token, pin_getter(cli_pin(args.pin_source, args.token), uri), pin_memory=MEMORY,
                       allow_final_try=args.force))  # fmt: skip
        login_slot = token.slot_id
    data = describe_module(mod, login_slot)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render(data))
    return 0


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("list", help="show the module's slots, tokens, mechanisms and objects")
    add_card_arguments(p, backend=False)
    p.add_argument("--login", action="store_true", help="log in to the token first, to see its private keys")
    p.add_argument("--token", metavar="URI", help="the token to log in to, when there are several (a pkcs11: URI)")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(func=run)
