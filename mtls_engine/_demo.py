"""The README's demo: a SoftHSM2 demo token, a local server that requires a
client certificate, and a stdlib ``ssl`` handshake signed by the token.

    python -m mtls_engine._demo [--dir demo-token]

Re-running reuses the demo token; ``--fresh`` makes a new one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from ._softhsm import CA, DEMO_PIN, KeyKind, TokenStore, missing_tools

LABEL = "card1"
KEY_LABEL = "clientkey"
KEY_ID = "01"


def make_demo(directory: Path) -> dict[str, str]:
    if directory.exists():
        shutil.rmtree(directory)
    store = TokenStore.create(directory / "softhsm")
    os.environ.update(store.env)
    token = store.init_token(LABEL)
    ca = CA.create("mtls_engine demo CA")
    (directory / "ca.pem").write_bytes(ca.pem)
    pub = token.generate_key(KeyKind.P256, KEY_LABEL, KEY_ID)
    cert = ca.issue(pub, "Demo Card-Holder")
    token.store_certificate(cert, KEY_LABEL, KEY_ID, directory)
    (directory / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = ca.issue_server_files(directory, "localhost")
    state = {
        "module": store.module,
        "softhsm2_conf": str(store.conf),
        "key": f"pkcs11:token={LABEL};object={KEY_LABEL};type=private",
        "ca": str(directory / "ca.pem"),
        "server_cert": str(server_cert),
        "server_key": str(server_key),
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2))
    return state


def load_demo(directory: Path) -> dict[str, str] | None:
    try:
        state: dict[str, str] = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not all(os.path.exists(state[k]) for k in ("module", "softhsm2_conf", "ca", "server_cert")):
        return None
    return state


def serve_once(ctx: ssl.SSLContext, sock: socket.socket, seen: list[str]) -> None:
    raw, _ = sock.accept()
    with ctx.wrap_socket(raw, server_side=True) as tls:
        peer: Any = tls.getpeercert() or {}
        subject = ", ".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
        issuer = ", ".join(f"{k}={v}" for rdn in peer.get("issuer", ()) for k, v in rdn)
        seen.append(f"{subject} (issued by {issuer}, serial {peer.get('serialNumber')}, {tls.version()})")
        tls.sendall(b"hello, " + subject.encode() + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtls_engine._demo")
    parser.add_argument("--dir", default="demo-token", type=Path)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args(argv)
    args.dir = args.dir.resolve()
    missing = missing_tools()
    if missing:
        print(f"demo needs: {', '.join(missing)} (run bash ci/demo.sh)", file=sys.stderr)
        return 1
    state = None if args.fresh else load_demo(args.dir)
    if state is None:
        print(f"making a SoftHSM2 demo token in {args.dir}/ ...")
        state = make_demo(args.dir)
    else:
        print(f"reusing the SoftHSM2 demo token in {args.dir}/")
    os.environ["SOFTHSM2_CONF"] = state["softhsm2_conf"]

    import mtls_engine
    from mtls_engine._backends import BACKENDS, STATUS

    # The server side is mtls_engine's too: it requires and checks the card.
    server = mtls_engine.server_context(state["server_cert"], state["server_key"], state["ca"])
    print(f"card key: {state['key']} (module {state['module']})")
    done = 0
    for backend in BACKENDS:
        ok, why = STATUS[backend]()
        if not ok:
            print(f"[{backend}] skipped: {why}")
            continue
        sock = socket.create_server(("127.0.0.1", 0))
        seen: list[str] = []
        thread = threading.Thread(target=serve_once, args=(server, sock, seen), daemon=True)
        thread.start()
        # The demo token's PIN is the documented demo PIN; real cards need yours.
        ctx = mtls_engine.client_context(
            key=state["key"], cafile=state["ca"], module=state["module"], pin=DEMO_PIN, backend=backend
        )
        with socket.create_connection(("127.0.0.1", sock.getsockname()[1])) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                reply = tls.recv(200).decode().strip()
                version = tls.version()
        thread.join(10)
        sock.close()
        print(f"[{backend}] handshake completed ({version}); the card signed it inside OpenSSL")
        print(f"[{backend}] server saw client certificate: {seen[0] if seen else '?'}")
        print(f"[{backend}] server replied: {reply}")
        done += 1
    if not done:
        return 1
    # The diagnostic a user runs on their own card, here on the demo token.
    from mtls_engine._cli import main as cli

    os.environ["MTLS_DEMO_PIN"] = DEMO_PIN
    command = ["check", "--module", state["module"], "--key", state["key"], "--pin-source", "env:MTLS_DEMO_PIN"]
    print(f"\n$ python -m mtls_engine {' '.join(command)}")
    return cli(command)


if __name__ == "__main__":
    sys.exit(main())
