"""pytest plugin of mtls_engine.testing (entry point ``pytest11``).

pytest imports it at the start of every run where mtls_engine is
installed, so it lives outside mtls_engine.testing and imports nothing
heavy: the token machinery (and cryptography) waits for the first fixture.

Fixtures, session-scoped (one token folder per test process: the PKCS#11
module reads its configuration once per process):

- ``mtls_token_folder``: a TokenFolder of the kind ``--mtls-token-kind``
  (default softhsm2), active in this process, removed after the session;
- ``mtls_card``: a Card on it, labelled ``mtls-card``, with an RSA-2048
  and a P-256 key and their certificates.

A missing tool skips the tests that use them, with the reason.  The names
all start with ``mtls_``, so they do not meet a project's own fixtures; a
project overrides ``mtls_token_folder`` in its conftest.py to share a token
folder it already has.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # importing the package waits for the first fixture
    from .testing import Card, TokenFolder


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--mtls-token-kind",
        default="softhsm2",
        help="kind of test token for mtls_engine.testing's fixtures (softhsm2 or tpm2)",
    )


@pytest.fixture(scope="session")
def mtls_token_folder(request: pytest.FixtureRequest) -> Iterator[TokenFolder]:
    """A throwaway token folder (its own token store, a test CA, a server
    certificate), active in this process for the session."""
    from .testing import TokenFolder, missing_tools

    kind = request.config.getoption("--mtls-token-kind")
    missing = missing_tools(kind)
    if missing:
        pytest.skip(f"mtls_engine.testing: a {kind} test token needs {', '.join(missing)}")
    with TokenFolder.create(kind=kind) as folder:
        yield folder


@pytest.fixture(scope="session")
def mtls_card(mtls_token_folder: TokenFolder) -> Card:
    """A test token ``mtls-card`` with an RSA-2048 and a P-256 key generated
    on it and a client certificate for each from the folder's CA."""
    for card in mtls_token_folder.cards:
        if card.label == "mtls-card":
            return card
    return mtls_token_folder.add_card("mtls-card")
