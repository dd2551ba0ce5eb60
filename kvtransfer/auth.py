"""Authenticated KV channels: the deployment secret's challenge-response on each transport.

Any process that can reach a prefill node's transfer port could otherwise fetch any staged
prompt's KV (prompt data). Both KV transports therefore prove the deployment secret
(`cluster.auth`, HMAC-SHA256 challenge-response, mutual) before a byte of a segment moves:

- **tcp**: `accept` runs on the server right after `accept()`, before the fetch request is
  even read; `connect` runs on the client right after `connect()`. A peer that fails is
  refused (the server sends DENIED and closes), counted (`RefusalCounter`) and logged at
  warning level with its address, never with the secret or anything it sent.
- **dist**: a fetch request in the rendezvous store carries an HMAC over its fields (the
  store is readable and writable by anyone who reaches it), so the prefill drops forged
  requests before tying up a sender thread; then, over the pair's process group itself,
  `dist_prove_prefill` / `dist_prove_decode` run the same challenge-response as
  fixed-size uint8 messages before the segment is sent (the store alone cannot vouch for
  who joined the group).

The secret: `kv_transfer.secret`, else `PDSERVE_KV_SECRET`, else this user's generated
secret on this host (see `cluster.auth.resolve_secret`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable

from pydantic import SecretStr

from cluster import auth
from cluster.config import KVTransferSettings
from cluster.wire import KVTransferError

log = logging.getLogger(__name__)

ENV_SECRET = "PDSERVE_KV_SECRET"
TCP_LABEL = b"pdserve-kv-tcp/1"
DIST_LABEL = b"pdserve-kv-dist/1"
REQUEST_LABEL = b"pdserve-kv-dist-request/1"


def kv_secret(settings: KVTransferSettings | None = None) -> bytes:
    """The deployment's KV secret (config, environment, or this host's generated one)."""
    return auth.resolve_secret(settings.secret if settings is not None else None, ENV_SECRET)


def with_deployment_secret(settings: KVTransferSettings) -> KVTransferSettings:
    """`settings` with the secret all instances of one deployment share: the configured
    one, else PDSERVE_KV_SECRET, else a fresh random one. The composition root (launcher,
    Serve app builder) calls this once and hands the result to every worker, so the hosts
    of a deployment agree with nothing configured and two deployments never share one."""
    if settings.secret is not None:
        return settings
    value = os.environ.get(ENV_SECRET) or secrets.token_hex(32)
    return settings.model_copy(update={"secret": SecretStr(auth.check_secret(value))})


class RefusalCounter:
    """Peers refused for failing authentication, by transport (thread-safe)."""

    def __init__(self, parent: RefusalCounter | None = None) -> None:
        self._lock = threading.Lock()
        self._parent = parent  # also counts there (a server's counter feeds the process's)
        self.counts: dict[str, int] = {}

    def add(self, transport: str, peer: str, reason: str) -> None:
        with self._lock:
            self.counts[transport] = self.counts.get(transport, 0) + 1
        if self._parent is not None:
            with self._parent._lock:
                self._parent.counts[transport] = self._parent.counts.get(transport, 0) + 1
        log.warning("refused an unauthenticated KV %s peer %s: %s", transport, peer, reason)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


# Process-wide: every transfer server and responder in this process counts here, so a
# worker's stats can report one number whatever transports it runs.
REFUSALS = RefusalCounter()


# -- tcp -------------------------------------------------------------------------------------
def accept(sock: socket.socket, secret: bytes, counter: RefusalCounter = REFUSALS) -> bool:
    """Server side, right after accept(): True if the client proved the secret. On False
    the client has been told DENIED, and the caller closes the socket."""
    peer = _peer(sock)
    counted = []

    def count_denied(reason: str) -> None:  # before the client hears DENIED
        counted.append(reason)
        counter.add("tcp", peer, reason)

    try:
        auth.server_handshake(sock, secret, TCP_LABEL, on_denied=count_denied)
    except auth.AuthError as e:
        if not counted:
            counter.add("tcp", peer, str(e))
        return False
    except OSError as e:  # the peer vanished or stalled past the socket timeout
        counter.add("tcp", peer, f"no authentication ({e or type(e).__name__})")
        return False
    return True


def connect(sock: socket.socket, secret: bytes) -> None:
    """Client side, right after connect(): KVTransferError unless both sides proved it."""
    try:
        auth.client_handshake(sock, secret, TCP_LABEL)
    except auth.AuthError as e:
        raise KVTransferError(f"KV transfer authentication failed: {e}") from e


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "(gone)"


# -- dist ------------------------------------------------------------------------------------
def sign_request(secret: bytes, *fields: str) -> bytes:
    """MAC of a dist fetch request's fields (the store carries it next to them)."""
    return hmac.new(secret, REQUEST_LABEL + b"|" + "|".join(fields).encode(), hashlib.sha256).digest()


def verify_request(secret: bytes, mac: bytes, *fields: str) -> bool:
    return hmac.compare_digest(mac, sign_request(secret, *fields))


SendBytes = Callable[[bytes], None]
RecvBytes = Callable[[int], bytes]


def dist_prove_prefill(send: SendBytes, recv: RecvBytes, secret: bytes, peer: str,
                       counter: RefusalCounter = REFUSALS) -> None:
    """Prefill (the side that holds the KV) over a pair group, before sending a segment:
    the decode must prove the secret. Raises KVTransferError (counted) if it does not."""
    frame = auth.challenge()
    send(frame)
    verdict = auth.judge(secret, DIST_LABEL, frame, recv(auth.RESPONSE_BYTES))
    if verdict is None:
        send(auth.DENIED_VERDICT)
        counter.add("dist", peer, "the decode failed to prove the deployment secret")
        raise KVTransferError(f"refused KV transfer to {peer}: authentication failed")
    send(verdict)


def dist_prove_decode(send: SendBytes, recv: RecvBytes, secret: bytes) -> None:
    """Decode side of `dist_prove_prefill` (and it checks the prefill's proof in turn)."""
    try:
        response, expected = auth.respond(secret, DIST_LABEL, recv(auth.CHALLENGE_BYTES))
        send(response)
        auth.check_verdict(recv(auth.VERDICT_BYTES), expected)
    except auth.AuthError as e:
        raise KVTransferError(f"KV transfer authentication failed: {e}") from e
