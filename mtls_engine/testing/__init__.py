"""Real software tokens for testing code that uses card keys (as trustme
gives tests certificates).

A :class:`TokenFolder` is a token store in a folder of its own (SoftHSM2
with its own ``SOFTHSM2_CONF``; never the machine's token store) with a test
CA and a server certificate; :meth:`TokenFolder.add_card` puts a token on it
whose keys are generated *on* the token, with certificates from that CA.
Everything is removed by :meth:`TokenFolder.close` (or the ``with`` block).
The pytest plugin (``mtls_card``, ``mtls_token_folder``) is in
:mod:`mtls_engine._pytest_plugin`; docs/testing.md has the whole API.

Never for real cards: the PIN of a test token is a plain attribute.
"""

from __future__ import annotations

import http.server
import os
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from .. import _softhsm
from .._errors import Error
from .._softhsm import CA, KeyKind

__all__ = [
    "CA",
    "KINDS",
    "Card",
    "HttpsServer",
    "KeyKind",
    "TokenFolder",
    "TokenFolderError",
    "TokenKindUnavailable",
    "missing_tools",
]

# The label and CKA_ID (hex) of each kind of key a card gets.
KEY_NAMES: dict[KeyKind, tuple[str, str]] = {
    KeyKind.RSA2048: ("rsa2048", "01"),
    KeyKind.P256: ("ec256", "02"),
    KeyKind.P384: ("ec384", "03"),
}
DEFAULT_KEYS = (KeyKind.RSA2048, KeyKind.P256)


class TokenFolderError(Error):
    """A test token folder cannot be made or used as asked."""


class TokenKindUnavailable(TokenFolderError):
    """This kind of test token cannot be made here (a tool is missing)."""


class _Store(Protocol):
    """What a kind of token store offers (mtls_engine._softhsm.TokenStore's shape)."""

    module: str

    @property
    def env(self) -> dict[str, str]: ...

    def init_token(self, label: str, pin: str = ..., so_pin: str = ...) -> Any: ...


def _softhsm2(directory: Path) -> _Store:
    missing = _softhsm.missing_tools()
    if missing:
        raise TokenKindUnavailable(
            f"a SoftHSM2 test token needs {', '.join(missing)} (Debian: apt-get install softhsm2 gnutls-bin opensc)"
        )
    return _softhsm.TokenStore.create(directory)


def _tpm2(directory: Path) -> _Store:
    from .. import _tpm

    missing = _tpm.missing_tools()
    if missing:
        raise TokenKindUnavailable(
            f"a TPM 2.0 test token needs {', '.join(missing)} (Debian: apt-get install swtpm swtpm-tools "
            "tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools dbus opensc)"
        )
    return _TpmStore(_tpm.Tpm.start(directory))


class _TpmStore:
    """A software TPM (swtpm behind tpm2-abrmd on a private D-Bus) as a
    token store: its daemons stop at close()."""

    def __init__(self, tpm: Any) -> None:
        self.tpm = tpm
        self.module: str = tpm.module

    @property
    def env(self) -> dict[str, str]:
        return dict(self.tpm.env())

    def init_token(self, label: str, pin: str = _softhsm.DEMO_PIN, so_pin: str = _softhsm.DEMO_SO_PIN) -> Any:
        return self.tpm.init_token(label, pin=pin, so_pin=so_pin)

    def close(self) -> None:
        self.tpm.close()


def _tpm2_missing() -> list[str]:
    from .. import _tpm

    return _tpm.missing_tools()


@dataclass(frozen=True)
class _Kind:
    make: Callable[[Path], _Store]  # the store, in a folder of its own
    missing: Callable[[], list[str]]  # what is not installed for it


# Each kind of token folder.  A store has ``module``, ``env`` (the
# variables its module needs) and ``init_token(label, pin, so_pin)``
# returning a token with ``label``, ``pin``, ``serial``, ``uri(**attrs)``,
# ``generate_key(kind, label, key_id)`` and ``store_certificate(cert,
# label, key_id, workdir)``; and ``close()`` if it runs processes.
KINDS: dict[str, _Kind] = {
    "softhsm2": _Kind(_softhsm2, _softhsm.missing_tools),
    "tpm2": _Kind(_tpm2, _tpm2_missing),
}


def missing_tools(kind: str = "softhsm2") -> list[str]:
    """What a token folder of ``kind`` needs that is not installed (for a
    skip reason); empty when it can be made."""
    if kind not in KINDS:
        return [f"a token kind named {kind!r} (known: {', '.join(sorted(KINDS))})"]
    return KINDS[kind].missing()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _softhsm_in_use(module: str) -> bool:
    """Whether mtls_engine has loaded ``module`` in this process (SoftHSM2
    reads SOFTHSM2_CONF once, when it is first initialised)."""
    from .._p11 import Module

    return os.path.realpath(module) in Module._cache


class TokenFolder:
    """A throwaway token store in a folder, with a test CA (``ca``,
    ``ca_file``) and a server certificate for ``localhost`` and 127.0.0.1
    (``server_cert``, ``server_key``), both issued by that CA."""

    def __init__(self, directory: Path, store: _Store, kind: str, ca: CA, *, owned: bool) -> None:
        self.directory = directory
        self.store = store
        self.kind = kind
        self.ca = ca
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(ca.pem)
        self.server_cert, self.server_key = ca.issue_server_files(directory, "localhost")
        self.cards: list[Card] = []
        self._saved_env: dict[str, str | None] = {}
        self._closed = False
        # Removed at interpreter exit even if never closed.
        self._finalizer = weakref.finalize(self, _remove, directory if owned else None, getattr(store, "close", None))

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str] | None = None,
        *,
        kind: str = "softhsm2",
        ca: CA | None = None,
        ca_name: str = "mtls_engine.testing CA",
        activate: bool = True,
    ) -> TokenFolder:
        """A new token folder in ``directory`` (None: a new temporary folder,
        removed by close()).  ``activate``: point this process's environment
        at it (SOFTHSM2_CONF) until close().  Raises TokenKindUnavailable
        when ``kind`` cannot be made here, TokenFolderError when SoftHSM2 was
        already loaded in this process with another folder."""
        try:
            make = KINDS[kind].make
        except KeyError:
            raise TokenFolderError(f"unknown token kind {kind!r}; use one of {', '.join(sorted(KINDS))}") from None
        owned = directory is None
        path = Path(tempfile.mkdtemp(prefix="mtls-engine-tokens-")) if directory is None else Path(directory)
        try:
            path = path.resolve()
            path.mkdir(parents=True, exist_ok=True)
            store = make(path / kind)
            folder = cls(path, store, kind, ca or CA.create(ca_name), owned=owned)
        except BaseException:
            if owned:
                shutil.rmtree(path, ignore_errors=True)
            raise
        if activate:
            try:
                folder.activate()
            except BaseException:
                folder.close()
                raise
        return folder

    @property
    def module(self) -> str:
        """The PKCS#11 module path of these tokens."""
        return self.store.module

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a process needs to see these tokens (give
        them to subprocesses)."""
        return dict(self.store.env)

    def activate(self) -> None:
        """Set this folder's environment (SOFTHSM2_CONF) in this process.
        The module reads it once, when first loaded: a process uses one
        token folder (several cards fit in it)."""
        for name, value in self.store.env.items():
            if os.environ.get(name) == value:
                continue
            if self.kind == "softhsm2" and _softhsm_in_use(self.module):
                raise TokenFolderError(
                    f"SoftHSM2 is already loaded in this process with {name}={os.environ.get(name)}, and reads "
                    "it only once; use one token folder per process (add cards to it with add_card), or make "
                    "this one before anything loads SoftHSM2"
                )
            self._set_env(name, value)

    def _set_env(self, name: str, value: str) -> None:
        """Set ``name`` until close(), which restores what it was."""
        self._saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def _active(self) -> bool:
        return all(os.environ.get(name) == value for name, value in self.store.env.items())

    def add_card(
        self,
        label: str = "mtls-card",
        keys: Iterable[KeyKind] = DEFAULT_KEYS,
        *,
        pin: str | None = None,
        so_pin: str | None = None,
        subject: str = "card-holder {card}",
    ) -> Card:
        """A new token ``label`` with a key of each kind in ``keys``
        generated on it (labels rsa2048/ec256/ec384, ids 01/02/03), and for
        each a client certificate from this folder's CA stored next to it:
        subject CN ``subject`` with ``{card}`` the card's label and ``{key}``
        the key's.  The PIN is random unless given."""
        if self._closed:
            raise TokenFolderError(f"the token folder {self.directory} is closed")
        if any(c.label == label for c in self.cards):
            raise TokenFolderError(f"this token folder already has a card labelled {label!r}; pick another label")
        if self.kind == "softhsm2" and self._active() and _softhsm_in_use(self.module):
            raise TokenFolderError(
                f"cannot add the card {label!r}: SoftHSM2 is already loaded in this process and sees only the "
                "tokens that existed when it was; make every card before the first key is loaded (e.g. in a "
                "session fixture), or use a folder made with activate=False from other processes"
            )
        pin = pin if pin is not None else f"{secrets.randbelow(10**8):08d}"
        so_pin = so_pin if so_pin is not None else f"{secrets.randbelow(10**8):08d}"
        token = self.store.init_token(label, pin=pin, so_pin=so_pin)
        card = Card(self, token, subject)
        for kind in keys:
            card.add_key(kind)
        self.cards.append(card)
        return card

    def server_context(self) -> ssl.SSLContext:
        """A server context with this folder's server certificate that
        requires a client certificate from its CA (TLS 1.2 or newer)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert, self.server_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(self.ca_file)
        return ctx

    @contextmanager
    def https_server(self, context: ssl.SSLContext | None = None) -> Iterator[HttpsServer]:
        """A local HTTPS server on 127.0.0.1 (``context``: default
        server_context()) answering every GET with ``hello, <client
        subject>``; stopped when the block ends."""
        server = HttpsServer(context or self.server_context())
        try:
            yield server
        finally:
            server.close()

    def close(self) -> None:
        """Restore the environment, stop what the store runs, and remove the
        folder if create() made it.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        for card in self.cards:
            card._forget()
        self._finalizer()

    def __enter__(self) -> TokenFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TokenFolder {self.kind} {self.directory}{' (closed)' if self._closed else ''}>"


def _remove(directory: Path | None, stop: Callable[[], None] | None) -> None:
    if stop is not None:
        stop()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Card:
    """One test token in a TokenFolder: its keys, their certificates, and
    its PIN (as a PIN source, and in clear for tests that need it)."""

    folder: TokenFolder
    token: Any = field(repr=False)  # the store's token (mtls_engine._softhsm.Token for SoftHSM2)
    subject_template: str
    keys: list[KeyKind] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.token.label)

    @property
    def pin(self) -> str:
        """The user PIN (a test token's: never do this with a real card)."""
        return str(self.token.pin)

    @property
    def serial(self) -> str:
        return str(self.token.serial)

    @property
    def module(self) -> str:
        return self.folder.module

    @property
    def ca_file(self) -> Path:
        return self.folder.ca_file

    @property
    def pin_file(self) -> Path:
        """A file (0600) holding the PIN; written on first use."""
        path = self.folder.directory / f"{self.label}.pin"
        if not path.exists():
            _write_private(path, self.pin.encode())
        return path

    @property
    def pin_source(self) -> str:
        """``file:PATH`` of pin_file, for ``mtls_engine.pin_source`` and ``--pin-source``."""
        return f"file:{self.pin_file}"

    def pin_env(self, var: str = "MTLS_ENGINE_TEST_PIN") -> str:
        """Set the environment variable ``var`` to the PIN in this process
        (until the folder closes) and return ``env:VAR``, a PIN source that
        leaves no file behind (subprocesses inherit it)."""
        self.folder._set_env(var, self.pin)
        return f"env:{var}"

    def add_key(self, kind: KeyKind) -> None:
        """Generate a key of ``kind`` on the token and store a client
        certificate for it from the folder's CA."""
        if kind in self.keys:
            raise TokenFolderError(f"{self.label} has a {kind.name} key already")
        name, key_id = KEY_NAMES[kind]
        pub = self.token.generate_key(kind, name, key_id)
        cert = self.folder.ca.issue(pub, self.subject_template.format(card=self.label, key=name))
        self.token.store_certificate(cert, name, key_id, self.folder.directory)
        self.keys.append(kind)

    def key_uri(self, kind: KeyKind = KeyKind.P256) -> str:
        """The ``pkcs11:`` URI of this card's ``kind`` key."""
        return str(self.token.uri(object=self._name(kind)[0], type="private"))

    def cert_file(self, kind: KeyKind = KeyKind.P256) -> Path:
        """The PEM file of the certificate stored on the token for ``kind``."""
        name, key_id = self._name(kind)
        return self.folder.directory / f"{self.label}-{name}-{key_id}.pem"

    def certificate(self, kind: KeyKind = KeyKind.P256) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_file(kind).read_bytes())

    def subject(self, kind: KeyKind = KeyKind.P256) -> str:
        """The subject of ``kind``'s certificate as ``CardKey.subject`` and
        the test server write it (RFC 4514, e.g. ``CN=card-holder mtls-card``)."""
        return str(self.certificate(kind).subject.rfc4514_string())

    def https_server(self, context: ssl.SSLContext | None = None) -> AbstractContextManager[HttpsServer]:
        """The folder's https_server(): a local server that trusts this card's CA."""
        return self.folder.https_server(context)

    def _name(self, kind: KeyKind) -> tuple[str, str]:
        if kind not in self.keys:
            have = ", ".join(k.name for k in self.keys) or "none"
            raise TokenFolderError(f"{self.label} has no {kind.name} key (it has: {have}); add_key({kind}) first")
        return KEY_NAMES[kind]

    def _forget(self) -> None:
        pin_file = self.folder.directory / f"{self.label}.pin"
        if pin_file.exists():
            pin_file.unlink()

    def __repr__(self) -> str:
        return f"<Card {self.label!r} ({', '.join(k.name for k in self.keys)}) in {self.folder.directory}>"


class HttpsServer:
    """A threaded HTTPS server on 127.0.0.1 that answers each GET with
    ``hello, <client certificate subject>\\n``.  ``url``, ``address``,
    ``clients`` (subjects seen, in order) and ``errors`` (failed handshakes)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.clients: list[str] = []
        self.errors: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                der = self.connection.getpeercert(binary_form=True)
                subject = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else ""
                outer.clients.append(subject)
                body = f"hello, {subject}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                raw, addr = self.socket.accept()
                # The handshake runs in the request's thread, so a client
                # that stalls holds up only itself.
                return context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False), addr

            def finish_request(self, request: Any, client_address: Any) -> None:
                request.settimeout(30)
                request.do_handshake()
                super().finish_request(request, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                import sys

                outer.errors.append(str(sys.exc_info()[1]))

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.address: tuple[str, int] = ("127.0.0.1", self._httpd.server_address[1])
        self.url = f"https://127.0.0.1:{self.address[1]}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
