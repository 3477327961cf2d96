"""A process that used a card key exits cleanly (status 0, no crash)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtls_engine._softhsm import KeyKind

from . import p11shim
from .conftest import SHIM_PIN, Pki, ShimCard
from .helpers import run_python

SCRIPT = """
import gc, os
import mtls_engine
from tests.servers import echo_server, server_context, talk

srv_ctx = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
keep = []
with echo_server(srv_ctx) as srv:
    for uri in os.environ["T_URIS"].split(","):
        ctx = mtls_engine.client_context(key=uri, cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                         pin=os.environ["T_PIN"], backend=os.environ["T_BACKEND"])
        for _ in range(3):
            print(talk(ctx, srv.port)["subject"])
        keep.append(ctx)
if os.environ["T_MODE"] == "drop":
    keep.clear()
    gc.collect()
print("done")
"""


@pytest.mark.parametrize("mode", ["keep-contexts-alive", "drop"])
def test_exit_status_zero_after_handshakes(pki: Pki, mode: str, backend: str) -> None:
    uris = [pki.key_uri(k) for k in KeyKind]
    proc = run_python(
        SCRIPT,
        env={"T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key),
             "T_CA": str(pki.ca_file), "T_URIS": ",".join(uris), "T_MODULE": pki.module,
             "T_PIN": pki.card1.pin, "T_MODE": mode, "T_BACKEND": backend},
    )  # fmt: skip
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "done"
    assert lines.count("commonName=card-holder rsa2048") == 3
    assert lines.count("commonName=card-holder ec384") == 3


FORK_SCRIPT = """
import os, sys
import mtls_engine
from tests.servers import EchoServer, server_context, talk

srv = EchoServer(server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"]))
ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                 pin=os.environ["T_PIN"], backend=os.environ["T_BACKEND"])
print(os.getpid(), "parent", talk(ctx, srv.port)["subject"], flush=True)
child = os.fork()
if child:
    status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    print(os.getpid(), "child exited with", status, flush=True)
    srv.close()
else:
    print(os.getpid(), "child", talk(ctx, srv.port)["subject"], flush=True)
    # the child leaves through the interpreter's normal exit (atexit, module
    # teardown, OpenSSL's and the backend's cleanup), with the context alive
"""


def test_exit_status_zero_in_a_forked_child_and_its_parent(pki: Pki, backend: str) -> None:
    proc = run_python(
        FORK_SCRIPT,
        env={"T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key), "T_CA": str(pki.ca_file),
             "T_URI": pki.key_uri(KeyKind.P256), "T_MODULE": pki.module, "T_PIN": pki.card1.pin,
             "T_BACKEND": backend},
    )  # fmt: skip
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-2000:]}"
    words = [line.split(" ", 1)[1] for line in proc.stdout.splitlines()]
    assert words == ["parent commonName=card-holder ec256", "child commonName=card-holder ec256",
                     "child exited with 0"], proc.stdout  # fmt: skip
    assert "after fork" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", ["keep-contexts-alive", "drop"])
def test_module_is_finalized_once_at_exit(
    pki: Pki, shim_card: ShimCard, mode: str, backend: str, tmp_path: Path
) -> None:
    """Each process C_Finalizes its module at exit (a TPM reached with no
    resource manager keeps whatever a process leaves loaded), after its
    handshakes, with the backend still holding keys, and exits with status 0
    (pkcs11-provider loaded: its own finalisation at exit crashes)."""
    env = shim_card.env(tmp_path)
    proc = run_python(
        SCRIPT,
        env={**env, "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key), "T_CA": str(pki.ca_file),
             "T_URIS": shim_card.key_uri, "T_PIN": SHIM_PIN, "T_MODE": mode, "T_BACKEND": backend},
    )  # fmt: skip
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.splitlines() == ["commonName=card-holder shimcard"] * 3 + ["done"]
    calls = p11shim.read_log(env["MTLS_SHIM_LOG"])
    finals = [rv for name, rv, _ in calls if name == "C_Finalize"]
    assert finals[:1] == [0], calls[-5:]  # the first one succeeded: the module was still initialised
    assert [rv for n, rv, _ in calls if n == "C_Initialize"].count(0) == 1
    assert p11shim.count(env["MTLS_SHIM_LOG"], "C_Login") == 1
