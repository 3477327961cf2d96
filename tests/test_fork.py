"""A card key in forked processes: os.fork(), multiprocessing (fork and
spawn) and a pre-fork server whose own key is on the token.

PKCS#11 modules must be initialised again in a child, and that logs the
token out: pkcs11-provider does it (C_Finalize, C_Initialize) at its first
call in the child; libp11's engine calls C_Initialize, which SoftHSM2
answers with "already initialised", keeping the parent's login.
mtls_engine's fork hook (mtls_engine/_fork.py) wakes the provider, then
logs in again with the PIN source that logged in before.  The PKCS#11 shim
logs every call with its process id, so each child's C_Login count is
measured, not assumed.

Each scenario runs in a fresh interpreter (its own login state, its own
shim configuration), from a script file so that multiprocessing's spawn
method can import it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mtls_engine._softhsm import KeyKind, run_on_tty

from . import p11shim
from .conftest import BACKEND_STATUS, SHIM_PIN, Pki, ShimCard, need
from .helpers import ROOT

SUBJECT = "commonName=card-holder shimcard"

CLIENT_SCRIPT = """
import json, multiprocessing, os, sys
import mtls_engine
from tests.servers import echo_server, server_context, talk

CTX = None  # the parent's context; a spawned child has none and makes its own
SPAWN_LOCK = None


def init_spawned(lock):
    global SPAWN_LOCK
    SPAWN_LOCK = lock


def make_context():
    if SPAWN_LOCK is not None:  # see test_spawned_children_open_their_own_card_key
        with SPAWN_LOCK:
            return _make_context()
    return _make_context()


def _make_context():
    return mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"],
                                      module=os.environ["T_MODULE"], pin=mtls_engine.pin_source("env:T_PIN"),
                                      backend=os.environ["T_BACKEND"])


def work(port):
    ctx = CTX if CTX is not None else make_context()
    return {"pid": os.getpid(), "subjects": [talk(ctx, port)["subject"] for _ in range(2)]}


def forked(port):
    kids = []
    for _ in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = work(port)
            except BaseException as exc:
                out = {"pid": os.getpid(), "error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        kids.append((pid, r))
    results = []
    for pid, r in kids:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        results.append({"status": status, **json.loads(data or b"{}")})
    return results


def main():
    global CTX
    mode = os.environ["T_MODE"]
    srv_ctx = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
    with echo_server(srv_ctx) as srv:
        CTX = make_context()
        parent = talk(CTX, srv.port)["subject"]
        if mode == "fork":
            children = forked(srv.port)
        else:
            mp = multiprocessing.get_context(mode.removeprefix("mp-"))
            init = (init_spawned, (mp.Lock(),)) if mode == "mp-spawn" else (None, ())
            with mp.Pool(3, *init) as pool:
                children = [{"status": 0, **r} for r in pool.map(work, [srv.port] * 3, chunksize=1)]
        after = talk(CTX, srv.port)["subject"]
    print(json.dumps({"pid": os.getpid(), "parent": parent, "after": after, "children": children}))


if __name__ == "__main__":
    main()
"""

PREFORK_SCRIPT = """
import json, os, socket, ssl, sys
import mtls_engine

WORKERS, PER_WORKER = 3, 3
srv_ctx = mtls_engine.server_context(os.environ["T_SCERT"], os.environ["T_SKEY_URI"], os.environ["T_CA"],
                                     module=os.environ["T_MODULE"], pin=mtls_engine.pin_source("env:T_PIN"),
                                     backend=os.environ["T_BACKEND"])
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
kids = []
for _ in range(WORKERS):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            listener.settimeout(60)
            for _ in range(PER_WORKER):
                conn, _ = listener.accept()
                with srv_ctx.wrap_socket(conn, server_side=True) as tls:
                    subject = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
                    tls.sendall(json.dumps({"pid": os.getpid(), "client": subject}).encode())
        except BaseException as exc:
            print(f"worker {os.getpid()}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    kids.append(pid)

client = ssl.create_default_context(cafile=os.environ["T_CA"])
client.load_cert_chain(os.environ["T_CCERT"], os.environ["T_CKEY"])
answers = []
for _ in range(WORKERS * PER_WORKER):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with client.wrap_socket(raw, server_hostname="localhost") as tls:
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
            answers.append(json.loads(data))
statuses = [os.waitpid(pid, 0)[1] for pid in kids]
print(json.dumps({"workers": kids, "statuses": statuses, "answers": answers}))
"""


def _run(script: str, tmp_path: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "scenario.py"
    path.write_text(textwrap.dedent(script))
    full = {**os.environ, **env}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=full, timeout=timeout,
                          cwd=str(ROOT), stdin=subprocess.DEVNULL)  # fmt: skip


def _result(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Enter PIN" not in proc.stderr  # no backend prompted on its own
    assert "after fork" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _client_env(card: ShimCard, pki: Pki, tmp_path: Path, backend: str, mode: str) -> dict[str, str]:
    return {**card.env(tmp_path / "shim"), "T_URI": card.key_uri, "T_CA": str(pki.ca_file), "T_PIN": SHIM_PIN,
            "T_BACKEND": backend, "T_MODE": mode, "T_SCERT": str(pki.server_cert),
            "T_SKEY": str(pki.server_key)}  # fmt: skip


CKR_GENERAL_ERROR = 0x5


def _logins(env: dict[str, str]) -> dict[int, list[int]]:
    """Each process's C_Login return values, from the shim log."""
    out: dict[int, list[int]] = {}
    for pid, name, rv, _ in p11shim.read_log_pids(env["MTLS_SHIM_LOG"]):
        if name == "C_Login":
            out.setdefault(pid, []).append(rv)
    return out


def _logged_in_again(rvs: list[int]) -> bool:
    """One accepted C_Login, after at most a few CKR_GENERAL_ERRORs.

    SoftHSM2 writes its token file at every good login, and a process
    reading it at that moment (several children logging in at once) may get
    CKR_GENERAL_ERROR: no PIN verdict, so the child tries the PIN that
    logged in before the fork again (mtls_engine/_p11.py, after_fork)."""
    return bool(rvs) and rvs[-1] == 0 and all(rv == CKR_GENERAL_ERROR for rv in rvs[:-1])


@pytest.mark.parametrize("mode", ["fork", "mp-fork"])
def test_forked_children_use_the_parents_card_key(
    shim_card: ShimCard, pki: Pki, tmp_path: Path, backend: str, mode: str
) -> None:
    env = _client_env(shim_card, pki, tmp_path, backend, mode)
    out = _result(_run(CLIENT_SCRIPT, tmp_path, env))
    assert out["parent"] == out["after"] == SUBJECT
    children = out["children"]
    assert len(children) == 3
    for child in children:
        assert child["status"] == 0 and "error" not in child, child
        assert child["subjects"] == [SUBJECT, SUBJECT]
    logins = _logins(env)
    assert logins.pop(out["pid"]) == [0]  # the parent: one login, accepted
    if backend == "engine":
        assert logins == {}, logins  # SoftHSM2 kept the parent's login in every child
    else:  # pkcs11-provider re-initialised the module: each child logged in again
        pids = {c["pid"] for c in children}
        # (a pool worker that got no task logged in too)
        assert pids <= set(logins) and len(logins) == 3, (logins, pids)
        assert all(_logged_in_again(rvs) for rvs in logins.values()), logins


def test_spawned_children_open_their_own_card_key(shim_card: ShimCard, pki: Pki, tmp_path: Path, backend: str) -> None:
    env = _client_env(shim_card, pki, tmp_path, backend, "mp-spawn")
    out = _result(_run(CLIENT_SCRIPT, tmp_path, env))
    children = out["children"]
    assert [c["subjects"] for c in children] == [[SUBJECT, SUBJECT]] * 3
    logins = _logins(env)
    assert logins.pop(out["pid"]) == [0]
    # a spawned worker is a new interpreter: it loads the key and logs in once
    assert logins and all(rvs == [0] for rvs in logins.values()), logins
    assert {c["pid"] for c in children} <= set(logins)
    # (The workers load their keys one at a time, SPAWN_LOCK: SoftHSM2
    # processes that read its token file while another logs in and rewrites
    # it fail at random with CKR_GENERAL_ERROR; a real card's middleware
    # serialises access itself.)


def test_prefork_server_with_its_key_on_the_token(
    pki: Pki, backend: str, token_server_cert: Path, tmp_path: Path
) -> None:
    ccert, ckey = pki.ca.issue_client_files(tmp_path, "prefork client")
    env = {"T_SCERT": str(token_server_cert), "T_SKEY_URI": pki.key_uri(KeyKind.P256, pki.card2),
           "T_CA": str(pki.ca_file), "T_MODULE": pki.module, "T_PIN": pki.card2.pin, "T_BACKEND": backend,
           "T_CCERT": str(ccert), "T_CKEY": str(ckey)}  # fmt: skip
    out = _result(_run(PREFORK_SCRIPT, tmp_path, env))
    assert out["statuses"] == [0, 0, 0]
    assert [a["client"] for a in out["answers"]] == ["prefork client"] * 9
    served = [a["pid"] for a in out["answers"]]
    # every worker signed its handshakes with the token key, three each
    assert sorted(served.count(pid) for pid in out["workers"]) == [3, 3, 3]


CHANGED_PIN_SCRIPT = """
import json, os
import mtls_engine
from tests.servers import echo_server, server_context, talk

srv_ctx = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
with echo_server(srv_ctx) as srv:
    ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"],
                                     module=os.environ["T_MODULE"], pin=mtls_engine.pin_source("env:T_PIN"),
                                     backend=os.environ["T_BACKEND"])
    talk(ctx, srv.port)
    os.environ["T_PIN"] = os.environ["T_OTHER_PIN"]  # the source now gives another PIN
    pid = os.fork()
    if pid == 0:
        try:
            talk(ctx, srv.port)
            os._exit(0)
        except Exception as exc:
            print(f"child: {type(exc).__name__}", flush=True)
            os._exit(3)
    print(json.dumps({"pid": os.getpid(), "child": pid, "status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}))
"""


def test_child_never_tries_a_pin_other_than_the_one_that_worked(shim_card: ShimCard, pki: Pki, tmp_path: Path) -> None:
    """pkcs11-provider's child must log in again.  If the PIN source now
    gives a different PIN, it is not tried: a pre-fork server with many
    workers would otherwise spend one try per worker."""
    env = {**_client_env(shim_card, pki, tmp_path, "provider", "fork"), "T_OTHER_PIN": "27182818"}
    proc = _run(CHANGED_PIN_SCRIPT, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["status"] == 3  # the child's handshake failed, cleanly
    assert "another PIN than the one that logged it in before; mtls_engine did not try it" in proc.stderr
    assert "Enter PIN" not in proc.stderr
    logins = _logins(env)
    assert logins == {out["pid"]: [0]}  # no C_Login at all in the child


PEM_PROMPT_SCRIPT = """
import os, ssl
import mtls_engine
ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"], module=os.environ["T_MODULE"],
                                 pin=mtls_engine.pin_source("env:T_PIN"), backend=os.environ["T_BACKEND"])
plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
plain.load_cert_chain(os.environ["T_CCERT"], os.environ["T_CKEY"])  # no password=: OpenSSL asks the terminal
print("loaded", flush=True)
"""


def test_other_openssl_prompts_still_reach_the_terminal(
    shim_card: ShimCard, pki: Pki, tmp_path: Path, backend: str
) -> None:
    """mtls_engine takes PKCS#11 PIN prompts out of OpenSSL's default UI;
    any other prompt (an encrypted PEM key's pass phrase) still works."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = pki.ca.issue(pub, "encrypted key holder")
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    passphrase = b"pem-pass-phrase-42"
    enc = serialization.BestAvailableEncryption(passphrase)
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    )
    env = {**_client_env(shim_card, pki, tmp_path, backend, "none"), "T_CCERT": str(tmp_path / "c.pem"),
           "T_CKEY": str(tmp_path / "k.pem")}  # fmt: skip
    (tmp_path / "prompt.py").write_text(textwrap.dedent(PEM_PROMPT_SCRIPT))
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    asked = []

    def answer(prompt: bytes) -> bytes | None:
        asked.append(prompt)
        return passphrase if b"pass phrase" in prompt else None

    status, seen = run_on_tty([sys.executable, str(tmp_path / "prompt.py")], full, answer)
    assert status == 0, seen[-2000:]
    assert [p.strip() for p in asked] == [b"Enter PEM pass phrase:"]
    assert "loaded" in seen


PINPAD_SCRIPT = """
import json, os
import mtls_engine
from tests.servers import echo_server, server_context, talk

srv_ctx = server_context(os.environ["T_SCERT"], os.environ["T_SKEY"], os.environ["T_CA"])
with echo_server(srv_ctx) as srv:
    ctx = mtls_engine.client_context(key=os.environ["T_URI"], cafile=os.environ["T_CA"],
                                     module=os.environ["T_MODULE"], backend=os.environ["T_BACKEND"])
    parent = talk(ctx, srv.port)["subject"]
    os.unlink(os.environ["MTLS_SHIM_PINPAD_PIN_FILE"])  # from now on nobody types on the reader
    pid = os.fork()
    if pid == 0:
        try:
            talk(ctx, srv.port)
            os._exit(0)
        except Exception as exc:
            print(f"child: {type(exc).__name__}: {exc}", flush=True)
            os._exit(3)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps({"pid": os.getpid(), "child": pid, "status": status, "parent": parent}))
"""

CKR_FUNCTION_CANCELED = 0x50


def test_child_asks_a_pinpad_reader_once(shim_card: ShimCard, pki: Pki, tmp_path: Path) -> None:
    """pkcs11-provider's child must log in again; on a pinpad reader that is
    a C_Login without a PIN, which the reader answers after the user typed
    (or not).  A failed pinpad login is not retried: it is not the known
    PIN that worked before, and each try is one more PIN entry on the reader
    (a wrong one costs a try).  Nor may the backend try: pkcs11-provider
    logs in by itself on a pinpad reader at every signature attempt (five
    C_Logins in one handshake, measured), so the child's card is stopped
    before any handshake reaches it."""
    need(*BACKEND_STATUS["provider"]())  # only the provider logs the child out (SoftHSM2 keeps the engine's login)
    env = {**_client_env(shim_card, pki, tmp_path, "provider", "fork"),
           **p11shim.shim_env(shim_card.store.module, tmp_path / "shim", token_flags=["pinpad"],
                              pinpad_pin=SHIM_PIN)}  # fmt: skip
    proc = _run(PINPAD_SCRIPT, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["parent"] == SUBJECT
    assert out["status"] == 3  # the child's handshake failed, cleanly
    logins = _logins(env)
    assert logins == {out["pid"]: [0], out["child"]: [CKR_FUNCTION_CANCELED]}, proc.stderr[-3000:]
    assert all("pin=null" in rest for name, _, rest in p11shim.read_log(env["MTLS_SHIM_LOG"]) if name == "C_Login")
    assert "child: TokenUnavailable: the card key 'ec256' on token 'shimcard'" in proc.stdout
    assert "cannot sign in this forked process: logging in to the token again after the fork failed" in proc.stdout
