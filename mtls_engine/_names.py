"""Readable names for PKCS#11 numbers: mechanisms, token flags, mechanism
flags, curves.  Values are those of the PKCS#11 specification (a test
compares them with the system's pkcs11.h); unknown numbers print in hex."""

from __future__ import annotations

MECHANISMS: dict[int, str] = {
    0x0000: "CKM_RSA_PKCS_KEY_PAIR_GEN",
    0x0001: "CKM_RSA_PKCS",
    0x0002: "CKM_RSA_9796",
    0x0003: "CKM_RSA_X_509",
    0x0005: "CKM_MD5_RSA_PKCS",
    0x0006: "CKM_SHA1_RSA_PKCS",
    0x0009: "CKM_RSA_PKCS_OAEP",
    0x000D: "CKM_RSA_PKCS_PSS",
    0x000E: "CKM_SHA1_RSA_PKCS_PSS",
    0x0010: "CKM_DSA_KEY_PAIR_GEN",
    0x0011: "CKM_DSA",
    0x0012: "CKM_DSA_SHA1",
    0x0013: "CKM_DSA_SHA224",
    0x0014: "CKM_DSA_SHA256",
    0x0015: "CKM_DSA_SHA384",
    0x0016: "CKM_DSA_SHA512",
    0x0020: "CKM_DH_PKCS_KEY_PAIR_GEN",
    0x0021: "CKM_DH_PKCS_DERIVE",
    0x0040: "CKM_SHA256_RSA_PKCS",
    0x0041: "CKM_SHA384_RSA_PKCS",
    0x0042: "CKM_SHA512_RSA_PKCS",
    0x0043: "CKM_SHA256_RSA_PKCS_PSS",
    0x0044: "CKM_SHA384_RSA_PKCS_PSS",
    0x0045: "CKM_SHA512_RSA_PKCS_PSS",
    0x0046: "CKM_SHA224_RSA_PKCS",
    0x0047: "CKM_SHA224_RSA_PKCS_PSS",
    0x0120: "CKM_DES_KEY_GEN",
    0x0121: "CKM_DES_ECB",
    0x0122: "CKM_DES_CBC",
    0x0125: "CKM_DES_CBC_PAD",
    0x0130: "CKM_DES2_KEY_GEN",
    0x0131: "CKM_DES3_KEY_GEN",
    0x0132: "CKM_DES3_ECB",
    0x0133: "CKM_DES3_CBC",
    0x0136: "CKM_DES3_CBC_PAD",
    0x0138: "CKM_DES3_CMAC",
    0x0210: "CKM_MD5",
    0x0211: "CKM_MD5_HMAC",
    0x0220: "CKM_SHA_1",
    0x0221: "CKM_SHA_1_HMAC",
    0x0250: "CKM_SHA256",
    0x0251: "CKM_SHA256_HMAC",
    0x0255: "CKM_SHA224",
    0x0256: "CKM_SHA224_HMAC",
    0x0260: "CKM_SHA384",
    0x0261: "CKM_SHA384_HMAC",
    0x0270: "CKM_SHA512",
    0x0271: "CKM_SHA512_HMAC",
    0x0350: "CKM_GENERIC_SECRET_KEY_GEN",
    0x1040: "CKM_EC_KEY_PAIR_GEN",
    0x1041: "CKM_ECDSA",
    0x1042: "CKM_ECDSA_SHA1",
    0x1043: "CKM_ECDSA_SHA224",
    0x1044: "CKM_ECDSA_SHA256",
    0x1045: "CKM_ECDSA_SHA384",
    0x1046: "CKM_ECDSA_SHA512",
    0x1050: "CKM_ECDH1_DERIVE",
    0x1051: "CKM_ECDH1_COFACTOR_DERIVE",
    0x1053: "CKM_ECDH_AES_KEY_WRAP",
    0x1054: "CKM_RSA_AES_KEY_WRAP",
    0x1055: "CKM_EC_EDWARDS_KEY_PAIR_GEN",
    0x1057: "CKM_EDDSA",
    0x1080: "CKM_AES_KEY_GEN",
    0x1081: "CKM_AES_ECB",
    0x1082: "CKM_AES_CBC",
    0x1083: "CKM_AES_MAC",
    0x1084: "CKM_AES_MAC_GENERAL",
    0x1085: "CKM_AES_CBC_PAD",
    0x1086: "CKM_AES_CTR",
    0x1087: "CKM_AES_GCM",
    0x1088: "CKM_AES_CCM",
    0x108A: "CKM_AES_CMAC",
    0x1200: "CKM_GOSTR3410_KEY_PAIR_GEN",
    0x1201: "CKM_GOSTR3410",
    0x1202: "CKM_GOSTR3410_WITH_GOSTR3411",
    0x1210: "CKM_GOSTR3411",
    0x1211: "CKM_GOSTR3411_HMAC",
    0x2000: "CKM_DSA_PARAMETER_GEN",
    0x2001: "CKM_DH_PKCS_PARAMETER_GEN",
    0x2109: "CKM_AES_KEY_WRAP",
    0x210A: "CKM_AES_KEY_WRAP_PAD",
}

# CK_TOKEN_INFO.flags
TOKEN_FLAGS: dict[int, str] = {
    1 << 0: "CKF_RNG",
    1 << 1: "CKF_WRITE_PROTECTED",
    1 << 2: "CKF_LOGIN_REQUIRED",
    1 << 3: "CKF_USER_PIN_INITIALIZED",
    1 << 5: "CKF_RESTORE_KEY_NOT_NEEDED",
    1 << 6: "CKF_CLOCK_ON_TOKEN",
    1 << 8: "CKF_PROTECTED_AUTHENTICATION_PATH",
    1 << 9: "CKF_DUAL_CRYPTO_OPERATIONS",
    1 << 10: "CKF_TOKEN_INITIALIZED",
    1 << 11: "CKF_SECONDARY_AUTHENTICATION",
    1 << 16: "CKF_USER_PIN_COUNT_LOW",
    1 << 17: "CKF_USER_PIN_FINAL_TRY",
    1 << 18: "CKF_USER_PIN_LOCKED",
    1 << 19: "CKF_USER_PIN_TO_BE_CHANGED",
    1 << 20: "CKF_SO_PIN_COUNT_LOW",
    1 << 21: "CKF_SO_PIN_FINAL_TRY",
    1 << 22: "CKF_SO_PIN_LOCKED",
    1 << 23: "CKF_SO_PIN_TO_BE_CHANGED",
}

# CK_SLOT_INFO.flags
SLOT_FLAGS: dict[int, str] = {
    1 << 0: "CKF_TOKEN_PRESENT",
    1 << 1: "CKF_REMOVABLE_DEVICE",
    1 << 2: "CKF_HW_SLOT",
}

# CK_MECHANISM_INFO.flags
MECHANISM_FLAGS: dict[int, str] = {
    1 << 0: "CKF_HW",
    1 << 8: "CKF_ENCRYPT",
    1 << 9: "CKF_DECRYPT",
    1 << 10: "CKF_DIGEST",
    1 << 11: "CKF_SIGN",
    1 << 12: "CKF_SIGN_RECOVER",
    1 << 13: "CKF_VERIFY",
    1 << 14: "CKF_VERIFY_RECOVER",
    1 << 15: "CKF_GENERATE",
    1 << 16: "CKF_GENERATE_KEY_PAIR",
    1 << 17: "CKF_WRAP",
    1 << 18: "CKF_UNWRAP",
    1 << 19: "CKF_DERIVE",
    1 << 20: "CKF_EC_F_P",
    1 << 21: "CKF_EC_F_2M",
    1 << 22: "CKF_EC_ECPARAMETERS",
    1 << 23: "CKF_EC_NAMEDCURVE",
    1 << 24: "CKF_EC_UNCOMPRESS",
    1 << 25: "CKF_EC_COMPRESS",
}

KEY_TYPES: dict[int, str] = {0x0: "RSA", 0x1: "DSA", 0x2: "DH", 0x3: "EC", 0x1F: "AES", 0x40: "EC_EDWARDS"}

# DER of the named-curve OIDs found in CKA_EC_PARAMS, with their sizes.
CURVES: dict[bytes, tuple[str, int]] = {
    bytes.fromhex("06082a8648ce3d030107"): ("P-256", 256),
    bytes.fromhex("06052b81040022"): ("P-384", 384),
    bytes.fromhex("06052b81040023"): ("P-521", 521),
    bytes.fromhex("06052b8104000a"): ("secp256k1", 256),
    bytes.fromhex("06032b6570"): ("Ed25519", 255),
    bytes.fromhex("06032b6571"): ("Ed448", 448),
}


def mechanism(value: int) -> str:
    return MECHANISMS.get(value, f"{value:#x}")


def flags(value: int, table: dict[int, str]) -> list[str]:
    """The names of the bits set in ``value`` (unknown bits in hex)."""
    out = [name for bit, name in table.items() if value & bit]
    rest = value & ~sum(table)
    if rest:
        out.append(f"{rest:#x}")
    return out
