"""requests integration: a transport adapter whose every connection uses one
``ssl.SSLContext`` (typically ``mtls_engine.client_context(...)``, so the
card signs each TLS handshake and nothing else changes per request)::

    session = requests.Session()
    session.mount("https://mtls.example.org/", CardKeyAdapter(ctx))
    session.get("https://mtls.example.org/whoami")

Needs ``requests`` (``pip install mtls_engine[requests]``); the core of
mtls_engine never imports it.

Why an adapter rather than ``init_poolmanager(ssl_context=ctx)`` alone
(measured with requests 2.31.0, 2.32.2-2.32.5, 2.33.1, 2.34):

- requests 2.32.2 (2.32.0 and 2.32.1 were yanked) put a context of their own (made at import, with
  certifi's CAs and no client key) into each ``verify=True`` request's pool
  keyword arguments, which urllib3 lets override the pool manager's: the
  server sees no client certificate.  (2.32.3/2.32.4 skip it when the pool
  manager has an ``ssl_context``; 2.32.5 removed it.)
- ``cert_verify`` points the pool at a CA bundle — certifi's for
  ``verify=True`` (2.31, 2.32.5+), the ``verify`` path, or the
  ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` file that requests turns
  ``verify=True`` into (every version) — and urllib3 calls
  ``load_verify_locations`` with it *on the given context* for each new
  connection: a context meant to trust one CA then trusts all of those.
  ``cert=`` would likewise make urllib3 call ``load_cert_chain`` on it,
  replacing the card key by a file key.

So this adapter passes the context, and only the context, for every
connection (direct or through a proxy: the context is used for the
destination server, never for the TLS connection to an HTTPS proxy), and
refuses request arguments that would change it: ``verify=False``,
``verify="ca-bundle.pem"`` and ``cert=...`` raise ``ValueError``.  A CA
bundle from ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` is ignored (the
user did not ask for it on this request): the context verifies the server
with its own CAs, chain and host name — never with more CAs than those.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any
from urllib.parse import urlsplit

from requests import PreparedRequest, Response
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, DEFAULT_RETRIES, HTTPAdapter
from requests.exceptions import InvalidProxyURL, InvalidURL
from requests.utils import prepend_scheme_if_needed, select_proxy
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.util import Retry, parse_url

__all__ = ["CardKeyAdapter"]

log = logging.getLogger("mtls_engine")

# What requests may put into a request's urllib3 pool keyword arguments
# (requests.adapters._urllib3_request_context), and what a pool manager must
# not get beside the context: urllib3 applies each of these to the context.
_CONTEXT_CHANGING = ("ssl_context", "cert_reqs", "ca_certs", "ca_cert_dir", "ca_cert_data", "cert_file", "key_file",
                     "key_password")  # fmt: skip
_ENV_BUNDLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
# requests >= 2.32.3 asks this method for a request's pool key; 2.32.2 has
# get_connection_with_tls_context without it; 2.31 has neither.
_HAS_POOL_KEY_HOOK = hasattr(HTTPAdapter, "build_connection_pool_key_attributes")


class CardKeyAdapter(HTTPAdapter):
    """A ``requests`` transport adapter that makes every connection with
    ``ssl_context`` — its client key (a card key attached by
    ``mtls_engine``), its CAs, its host-name check, its protocol versions.
    Pooled keep-alive connections are reused as usual; the key is never
    reloaded and the token never logged in again per request.

    Mount it on the ``https://`` prefix of the servers that should see the
    card identity (and only those)::

        session.mount("https://mtls.example.org/", CardKeyAdapter(ctx))

    ``verify=False``, a CA-bundle ``verify=`` and ``cert=`` on a request
    through this adapter raise ``ValueError``: the context decides.  The
    other arguments are those of ``requests.adapters.HTTPAdapter``.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        max_retries: int | Retry = DEFAULT_RETRIES,
        pool_block: bool = DEFAULT_POOLBLOCK,
    ) -> None:
        if not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(
                f"CardKeyAdapter needs an ssl.SSLContext (e.g. mtls_engine.client_context(...)), "
                f"not {type(ssl_context).__name__}"
            )
        if ssl_context.protocol == ssl.PROTOCOL_TLS_SERVER:
            raise ValueError("CardKeyAdapter needs a client context; this one is for servers (PROTOCOL_TLS_SERVER)")
        # Set before HTTPAdapter.__init__, which calls init_poolmanager.
        self.ssl_context = ssl_context
        super().__init__(pool_connections, pool_maxsize, max_retries, pool_block)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a CardKeyAdapter cannot be pickled: its SSLContext (and the card key in it) cannot")

    # -- the pool managers: every pool gets the context --------------------------

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = DEFAULT_POOLBLOCK, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block=block, **self._with_context(pool_kwargs))

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # The context goes to the destination server (through the tunnel);
        # an HTTPS proxy's own TLS uses urllib3's proxy_ssl_context.
        return super().proxy_manager_for(proxy, **self._with_context(proxy_kwargs))

    def _with_context(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        given = kwargs.get("ssl_context", self.ssl_context)
        others = sorted(k for k in _CONTEXT_CHANGING if k in kwargs and k != "ssl_context")
        if given is not self.ssl_context or others:
            raise ValueError(
                f"CardKeyAdapter uses its own ssl_context for every connection; "
                f"set {', '.join(others) or 'ssl_context'} on that context instead"
            )
        return {**kwargs, "ssl_context": self.ssl_context}

    # -- per request: the context, whatever requests would have chosen ----------

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> Response:
        self._check_tls_arguments(verify, cert)
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """requests would set ``conn.ca_certs`` (certifi's bundle, which
        urllib3 then loads into the context) and ``conn.cert_file``; the
        context already carries the trust and the key, so only check."""
        self._check_tls_arguments(verify, cert)

    def build_connection_pool_key_attributes(
        self, request: PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(host parameters, pool keyword arguments) for ``request``: the
        pool keyword arguments name this adapter's context and nothing else
        TLS-related (no ``cert_reqs``: urllib3 then takes the context's own
        ``verify_mode`` rather than writing one into it)."""
        self._check_tls_arguments(verify, cert)
        if _HAS_POOL_KEY_HOOK:
            host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        else:
            url = urlsplit(request.url or "")  # as requests' own _urllib3_request_context
            host_params, pool_kwargs = {"scheme": url.scheme.lower(), "host": url.hostname, "port": url.port}, {}
        pool_kwargs = {k: v for k, v in pool_kwargs.items() if k not in _CONTEXT_CHANGING}
        pool_kwargs["ssl_context"] = self.ssl_context
        return host_params, pool_kwargs

    def get_connection_with_tls_context(
        self, request: PreparedRequest, verify: Any, proxies: Any = None, cert: Any = None
    ) -> HTTPConnectionPool:
        self._check_tls_arguments(verify, cert)
        if _HAS_POOL_KEY_HOOK:  # requests >= 2.32.3: calls build_connection_pool_key_attributes
            pool: HTTPConnectionPool = super().get_connection_with_tls_context(
                request, verify, proxies=proxies, cert=cert
            )
            return pool
        # requests 2.32.2: the same steps, with this adapter's pool key
        # instead of one naming requests' preloaded context.
        proxy = select_proxy(request.url or "", proxies)
        try:
            host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        except ValueError as exc:
            if isinstance(exc, _TlsArgumentError):
                raise
            raise InvalidURL(exc, request=request) from None
        if proxy:
            proxy = prepend_scheme_if_needed(proxy, "http")
            if not parse_url(proxy).host:
                raise InvalidProxyURL("Please check proxy URL. It is malformed and could be missing the host.")
            manager = self.proxy_manager_for(proxy)
        else:
            manager = self.poolmanager
        conn: HTTPConnectionPool = manager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)
        return conn

    @staticmethod
    def _check_tls_arguments(verify: Any, cert: Any) -> None:
        if cert:
            raise _TlsArgumentError(
                "CardKeyAdapter: cert= would replace the card key of this adapter's SSLContext with a key "
                "file; the client key comes from the context (mtls_engine.client_context / load_card_key)"
            )
        if verify is True or verify is None:
            return
        if isinstance(verify, str) and verify:
            if verify in {os.environ.get(name) for name in _ENV_BUNDLES}:
                # requests' trust_env turned verify=True into this bundle:
                # the context's own CAs decide (never more trust than those).
                log.debug("CardKeyAdapter: ignoring the CA bundle %r from the environment", verify)
                return
            raise _TlsArgumentError(
                f"CardKeyAdapter: verify={verify!r} would add that CA bundle to this adapter's SSLContext; "
                "give the CAs when making the context (mtls_engine.client_context(cafile=...))"
            )
        raise _TlsArgumentError(
            f"CardKeyAdapter: verify={verify!r} cannot turn off server verification; this adapter's "
            "SSLContext decides how the server is verified"
        )


class _TlsArgumentError(ValueError):
    """A request argument the adapter refuses (not an invalid URL)."""
