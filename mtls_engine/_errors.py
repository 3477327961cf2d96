"""Exceptions: one class per thing a user can fix.  Messages name what was
looked for and what to do; they never contain a PIN."""

from __future__ import annotations

import ssl

__all__ = [
    "AmbiguousUri",
    "BackendUnavailable",
    "CertKeyMismatch",
    "CertificateError",
    "ClientAuthNotRequired",
    "ConfigError",
    "CrlError",
    "Error",
    "InterpreterSslError",
    "ModuleLoadError",
    "NoClientCertificate",
    "NotAnSSLContext",
    "ObjectNotFound",
    "OpenSSLError",
    "PinError",
    "PinFinalTry",
    "PinIncorrect",
    "PinLocked",
    "PinRequired",
    "PinWarning",
    "Pkcs11Error",
    "TokenNotFound",
    "TokenUnavailable",
    "UriError",
]


class Error(Exception):
    """Base class of every error mtls_engine raises on purpose."""


class InterpreterSslError(Error):
    """This interpreter's ``ssl`` module cannot be used with mtls_engine
    (other OpenSSL than the extension's, OpenSSL linked statically into
    ``_ssl``, or an ``SSLContext`` layout that failed validation)."""


class NotAnSSLContext(Error, TypeError):
    """The object given is not an ``ssl.SSLContext``."""


class BackendUnavailable(Error):
    """The requested backend (libp11 engine or pkcs11-provider) is missing."""


class ModuleLoadError(Error):
    """The PKCS#11 module could not be found, loaded or initialised."""


class UriError(Error, ValueError):
    """A ``pkcs11:`` URI is malformed or asks for something unsupported."""


class ConfigError(Error, ValueError):
    """An argument cannot be written into an OpenSSL configuration or URI PEM file."""


class ClientAuthNotRequired(ConfigError):
    """A server's SSLContext would serve clients without checking a client
    certificate (verify_mode not CERT_REQUIRED, no client CA, not a server
    context): found at start-up, never served."""


class CrlError(ConfigError):
    """A CRL file is missing, unreadable, expired, or not issued and signed
    by one of the trusted client CAs."""


class TokenNotFound(Error):
    """No token matches the URI."""


class TokenUnavailable(Error, ssl.SSLError):
    """A handshake needed the card key and the token could not sign, nor
    make a test signature after it: it is unreachable, was removed (a
    p11-kit server or network HSM that went away, a card pulled from its
    reader) or no longer knows the key.  Also an ``ssl.SSLError``, so code
    that handles TLS failures handles this one.  mtls_engine reaches the
    token again by itself at a later handshake once it is back."""

    library = "mtls_engine"
    reason = "TOKEN_UNAVAILABLE"

    def __str__(self) -> str:  # ssl.SSLError's own shows the args tuple
        return str(self.args[0]) if self.args else ""


class ObjectNotFound(Error):
    """No key or certificate on the token matches the URI."""


class AmbiguousUri(Error):
    """The URI matches several tokens or several objects; mtls_engine never
    guesses (and never logs in to a token it had to guess)."""


class PinError(Error):
    """Base class of PIN problems."""


class PinRequired(PinError):
    """The token needs a PIN and none was given."""


class PinIncorrect(PinError):
    """The token rejected the PIN (that PIN will not be offered again)."""


class PinLocked(PinError):
    """The user PIN is locked: only the security officer can unblock it."""


class PinFinalTry(PinLocked):
    """One more wrong PIN would lock the card, so mtls_engine did not try."""


class PinOnCommandLine(PinError):
    """A command-line argument carries a PIN (``pin-value`` in a URI), where
    every user of the machine can read it; nothing was done."""


class ProcessProtectionError(Error):
    """The system refused to keep this process out of core dumps."""


class PinWarning(UserWarning):
    """A login went ahead although the token warned (``force=True`` on a
    token whose PIN is on its final try)."""


class CertKeyMismatch(Error):
    """The certificate's public key does not belong to the private key."""


class CertificateError(Error, ValueError):
    """A certificate file or token certificate cannot be read or parsed."""


class NoClientCertificate(Error, ValueError):
    """The connection (or what the server gave the app) carries no client
    certificate to tell who the client is."""


class Pkcs11Error(Error):
    """A PKCS#11 call failed with a code no more specific class covers."""

    def __init__(self, message: str, rv: int | None = None, call: str | None = None) -> None:
        super().__init__(message)
        self.rv = rv
        self.call = call
        self.retry_safe = False


class OpenSSLError(Error):
    """An OpenSSL call failed; ``errors`` holds the drained error queue."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        self.errors = list(errors or [])
        if self.errors:
            message = f"{message} (OpenSSL: {'; '.join(self.errors)})"
        super().__init__(message)
