"""What kind of token a PKCS#11 module offers (smart card, TPM, HSM,
software token), recognised from what the module and the token say about
themselves, and what follows for PIN counters and lockouts.

Measured: tpm2-pkcs11 1.9 (library manufacturer "tpm2-software.github.io",
description "TPM2.0 Cryptoki"; token manufacturer the TPM vendor, e.g.
"IBM", model e.g. "SW   TPM") never sets the PIN-counter flags, and a TPM in
dictionary-attack lockout refuses the SO login as well.  SoftHSM2 has no
retry counter at all and sets only CKF_USER_PIN_COUNT_LOW, after a failure.
"""

from __future__ import annotations

from ._lib import lib

TYPE_CHECKING = False  # typing is not imported at run time (import cost)
if TYPE_CHECKING:
    from ._p11 import Module, TokenInfo

__all__ = ["HSM", "SMART_CARD", "SOFTWARE", "TPM", "UNKNOWN", "counters_reported", "kind", "lockout_advice"]

SMART_CARD = "smart_card"
TPM = "tpm"
HSM = "hsm"
SOFTWARE = "software"
UNKNOWN = "unknown"

_PIN_STATE_FLAGS = lib.CKF_USER_PIN_COUNT_LOW | lib.CKF_USER_PIN_FINAL_TRY | lib.CKF_USER_PIN_LOCKED

# Words in the module's or token's manufacturer / description / model.
_SOFTWARE_WORDS = ("softhsm", "software token", "nss ", "network security services", "kryoptic")
_HSM_WORDS = ("luna", "safenet network", "ncipher", "nshield", "utimaco", "cryptoserver", "cloudhsm",
              "yubihsm", "proteccio", "primus", "entrust")  # fmt: skip
_SMART_CARD_WORDS = ("opensc", "smart card", "smartcard", "cardos", "yubikey", "nitrokey", "gemalto",
                     "idprime", "starcos", "coolkey", "ias-ecc")  # fmt: skip


def kind(mod: Module, token: TokenInfo) -> str:
    """smart_card, tpm, hsm, software or unknown."""
    library = f"{mod.manufacturer} {mod.description}".lower()
    tok = f"{token.manufacturer} {token.model}".lower()
    if "tpm2" in library or "tpm2_pkcs11" in mod.path or " tpm" in f" {tok}":
        return TPM
    both = f"{library} {tok} "
    if any(w in both for w in _SOFTWARE_WORDS):
        return SOFTWARE
    if any(w in both for w in _HSM_WORDS):
        return HSM
    if any(w in both for w in _SMART_CARD_WORDS):
        return SMART_CARD
    return UNKNOWN


def counters_reported(kind_: str, token: TokenInfo) -> bool:
    """Whether the token's PIN-counter flags can be believed when none is
    set: not on a TPM (never set) nor a software token (no counter, or only
    some flags).  A flag that is set is always believed."""
    return bool(token.flags & _PIN_STATE_FLAGS) or kind_ not in (TPM, SOFTWARE)


NOT_REPORTED = "not reported by this token"


def unguarded(kind_: str) -> str:
    """What mtls_engine cannot do for a token whose counters are not
    reported: refuse the final try (so force= changes nothing there)."""
    if kind_ == TPM:
        return (
            "a TPM does not say how many wrong PINs are left before its dictionary-attack lockout (3 on some "
            "TPMs), so mtls_engine cannot stop a login on the last try and force= has nothing to override; "
            "every wrong PIN counts"
        )
    return (
        "this token does not say how many wrong PINs are left, so mtls_engine cannot stop a login on the last "
        "try and force= has nothing to override"
    )


def lockout_advice(kind_: str) -> str:
    """What to do about a locked user PIN, for this kind of token."""
    if kind_ == TPM:
        return (
            "a TPM in dictionary-attack lockout refuses the security officer PIN as well: wait for the TPM's "
            "lockout interval (tpm2_getcap properties-variable shows TPM2_PT_LOCKOUT_INTERVAL), or have the "
            "TPM's owner clear it (tpm2_dictionarylockout --clear-lockout)"
        )
    if kind_ == SMART_CARD:
        return (
            "have the PIN unblocked with the PUK or security officer PIN (the card issuer's tool, or "
            "pkcs11-tool --unlock-pin); too many wrong PUKs block the card for good"
        )
    if kind_ == HSM:
        return "have the HSM's security officer or administrator unblock the user (the HSM vendor's tool)"
    if kind_ == SOFTWARE:
        return (
            "set a new user PIN with the security officer PIN (pkcs11-tool --init-pin --login --login-type so, "
            "or the software token's own tool)"
        )
    return "have the PIN unblocked with the security officer PIN or PUK (e.g. pkcs11-tool --unlock-pin)"
