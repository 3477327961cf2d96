"""Property tests for URI PEM files: any bytes give a URI or a UriError,
never another exception; every key URI that can be written reads back."""

from __future__ import annotations

import base64
import urllib.parse

from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_engine import UriError
from mtls_engine._uripem import read_uri_pem, uri_pem

from .test_hostile_input import SCALE

BEGIN = b"-----BEGIN PKCS#11 PROVIDER URI-----\n"
END = b"\n-----END PKCS#11 PROVIDER URI-----\n"


@settings(max_examples=300 * SCALE, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_inside_the_pem_markers(body: bytes) -> None:
    for data in (BEGIN + body + END, BEGIN + base64.b64encode(body) + END, body):
        try:
            uri = read_uri_pem(data)
        except UriError:
            continue
        assert isinstance(uri, str)


@settings(max_examples=200 * SCALE, deadline=None)
@given(st.text(min_size=1, max_size=200), st.binary(min_size=1, max_size=20))
def test_written_key_uris_read_back(label: str, key_id: bytes) -> None:
    uri = (
        "pkcs11:token=card1;object="
        + urllib.parse.quote(label.encode("utf-8", "surrogatepass"), safe="")
        + ";id="
        + urllib.parse.quote_from_bytes(key_id, safe="")
        + ";type=private"
    )
    assert read_uri_pem(uri_pem(uri)) == uri
