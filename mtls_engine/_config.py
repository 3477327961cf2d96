"""OpenSSL configuration text for the two backends: the sections
``python -m mtls_engine config`` writes for stock clients, and the providers
section mtls_engine itself applies when it loads pkcs11-provider."""

from __future__ import annotations

import os

from ._errors import ConfigError

__all__ = ["conf_value", "engine_section", "openssl_cnf", "provider_section"]

# Without no-deinit, pkcs11-provider finalises the PKCS#11 module while
# OpenSSL winds down at exit, under code that still uses it: with SoftHSM2 a
# process that made one handshake then dies with SIGSEGV (status 139).
PROVIDER_QUIRKS = "no-deinit"

# pkcs11-provider 1.0 keeps at most 5 sessions (the login session
# included): with 4 threads signing at once it closes and reopens a session
# on a quarter of the handshakes, for ever (measured by the benchmark).
PROVIDER_SESSIONS = 16

# In a configuration written for both backends, this environment variable
# picks one: "provider" (the default) or "engine".
SELECTOR_ENV = "MTLS_ENGINE_BACKEND"


def conf_value(value: str | os.PathLike[str], what: str = "value") -> str:
    """``value`` quoted for an OpenSSL configuration file: inside double
    quotes ``$`` is not expanded and ``#`` is not a comment."""
    text = os.fspath(value)
    if any(c in text for c in "\n\r\0"):
        raise ConfigError(f"the {what} {text!r} contains a line break or NUL, which openssl.cnf cannot hold")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pin_source_value(pin_source: str | None) -> str | None:
    """Only ``file:`` PIN sources go into a configuration file: a PIN itself
    never does."""
    if pin_source is None:
        return None
    if not pin_source.startswith("file:") or len(pin_source) == 5:
        raise ConfigError(
            f"the PIN source {pin_source!r} cannot be written to openssl.cnf; use file:/path/to/pin "
            "(a file readable only by you), or leave it out and let the client ask for the PIN"
        )
    path = pin_source[5:]
    if not os.path.isabs(path):
        raise ConfigError(f"the PIN file in {pin_source!r} must be an absolute path: stock clients run from any folder")
    return pin_source


def provider_section(section: str, provider_so: str, module: str, pin_source: str | None = None) -> list[str]:
    lines = [
        f"[{section}]",
        f"module = {conf_value(provider_so, 'provider path')}",
        f"pkcs11-module-path = {conf_value(module, 'module path')}",
        f"pkcs11-module-quirks = {PROVIDER_QUIRKS}",
        f"pkcs11-module-cache-sessions = {PROVIDER_SESSIONS}",
    ]
    pin = pin_source_value(pin_source)
    if pin is not None:
        lines.append(f"pkcs11-module-token-pin = {conf_value(pin, 'PIN source')}")
    lines.append("activate = 1")
    return lines


def engine_section(section: str, engine_so: str, module: str) -> list[str]:
    # init = 0: the engine starts when a client asks for it (-engine
    # pkcs11, --engine pkcs11), not in every program that reads this file.
    return [
        f"[{section}]",
        "engine_id = pkcs11",
        f"dynamic_path = {conf_value(engine_so, 'engine path')}",
        f"MODULE_PATH = {conf_value(module, 'module path')}",
        "init = 0",
    ]


def openssl_cnf(
    module: str,
    backend: str,
    *,
    engine_so: str | None,
    provider_so: str | None,
    pin_source: str | None = None,
) -> str:
    """A complete openssl.cnf for stock clients.  ``backend``: engine,
    provider or both."""
    if backend not in ("engine", "provider", "both"):
        raise ConfigError(f"unknown backend {backend!r} for openssl.cnf; use engine, provider or both")
    want_engine = backend in ("engine", "both")
    want_provider = backend in ("provider", "both")
    if want_engine and engine_so is None:
        raise ConfigError("libp11's pkcs11 engine is not installed, so no engine section can be written")
    if want_provider and provider_so is None:
        raise ConfigError("pkcs11-provider is not installed, so no provider section can be written")
    pin = pin_source_value(pin_source)
    out = [
        f"# openssl.cnf for stock OpenSSL clients with the PKCS#11 module {module}",
        "# written by python -m mtls_engine config; use it with OPENSSL_CONF=<this file>",
        "",
    ]
    if backend == "both":
        # libp11's engine and pkcs11-provider must not both be loaded into one
        # process by a configuration: with the engine in OpenSSL's engine list,
        # keys from the provider fail (X509_check_private_key: "key values
        # mismatch", OpenSSL 3.0).  So one file holds both set-ups and the
        # environment picks one; OpenSSL looks $ENV::NAME up in the
        # environment first, then in this file's default section.
        out += [
            f"# Uses pkcs11-provider; run with {SELECTOR_ENV}=engine to use libp11's engine instead.",
            f"{SELECTOR_ENV} = provider",
            f"openssl_conf = mtls_engine_init_${{ENV::{SELECTOR_ENV}}}",
            "",
            "[mtls_engine_init_engine]",
            "engines = mtls_engine_engines",
            "",
            "[mtls_engine_init_provider]",
            "providers = mtls_engine_providers",
            "",
        ]
    else:
        out += [
            f"openssl_conf = mtls_engine_init_{backend}",
            "",
            f"[mtls_engine_init_{backend}]",
            "engines = mtls_engine_engines" if want_engine else "providers = mtls_engine_providers",
            "",
        ]
    if want_engine:
        assert engine_so is not None
        out += ["[mtls_engine_engines]", "pkcs11 = mtls_engine_engine_pkcs11", ""]
        out += [*engine_section("mtls_engine_engine_pkcs11", engine_so, module), ""]
    if want_provider:
        assert provider_so is not None
        # Naming any provider turns off OpenSSL's automatic "default" one.
        out += [
            "[mtls_engine_providers]",
            "default = mtls_engine_default",
            "pkcs11 = mtls_engine_provider_pkcs11",
            "",
            "[mtls_engine_default]",
            "activate = 1",
            "",
        ]
        out += [*provider_section("mtls_engine_provider_pkcs11", provider_so, module, pin), ""]
    return "\n".join(out)
