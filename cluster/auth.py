"""Shared-secret authentication for pdserve's own TCP channels: an HMAC challenge-response.

Every pdserve socket that carries prompt data (the KV transfer server, the dist rendezvous,
the worker channel) opens with this handshake before any payload byte moves. Both ends
hold the deployment secret K; `label` names the channel, so a proof made for one channel
is worthless on another::

    server ─▶ client   MAGIC (8) | nonce_s (32)
    client ─▶ server   nonce_c (32) | HMAC-SHA256(K, label | "client" | nonce_s | nonce_c)
    server ─▶ client   ACCEPTED (1) | HMAC-SHA256(K, label | "server" | nonce_s | nonce_c)
                    or DENIED (1) | 32 zero bytes, and the server closes

Fresh nonces on both sides make every proof single-use (no replay); the proofs are
compared with `hmac.compare_digest` (constant time); the secret itself never crosses the
wire and is never logged. The client checks the server's proof too, so a rogue listener
cannot feed a decode forged KV. Frames have fixed sizes: nothing to parse, nothing to
unpickle. This authenticates the peer; it does not encrypt (see docs/security.md).

Where the secret comes from (`resolve_secret`): the deployment config, else an environment
variable, else a secret generated once per user and host (`<cache dir>/secret`, mode 0600),
which is what lets a local deployment authenticate with nothing configured. Hosts of a
multi-host deployment must share the configured secret; with different generated ones
every handshake between them is refused, loudly.

Stdlib (and pydantic's SecretStr) only, so the router, which imports no kvtransfer, and
the workers share it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

MAGIC = b"PDSAUTH1"
NONCE_BYTES = 32
MAC_BYTES = 32  # SHA-256
ACCEPTED = b"\x01"
DENIED = b"\x00"
CHALLENGE_BYTES = len(MAGIC) + NONCE_BYTES
RESPONSE_BYTES = NONCE_BYTES + MAC_BYTES
VERDICT_BYTES = 1 + MAC_BYTES
SECRET_FILE = "secret"
MIN_SECRET_BYTES = 16
MASKED = "**********"  # how pydantic prints a SecretStr; never a usable secret


class AuthError(RuntimeError):
    """The peer could not prove the shared secret (or refused ours). Safe to log: it never
    contains the secret."""


# -- the secret ----------------------------------------------------------------------------
def check_secret(value: str) -> str:
    """Validation shared by the config fields that hold secrets."""
    if value == MASKED:
        raise ValueError("is a masked value (as --print-config shows secrets); give the real one")
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes long")
    return value


def generated_secret_path(cache_dir: Path | None = None) -> Path:
    """`<cache dir>/secret`: the cache dir is pdserve's (`PDSERVE_CACHE_DIR`, else
    `$XDG_CACHE_HOME/pdserve`, else `~/.cache/pdserve`), as `cluster.tiny_model` has it;
    not imported from there, which would pull torch into the router."""
    if cache_dir is None:
        env = os.environ.get("PDSERVE_CACHE_DIR")
        cache_dir = Path(env) if env else Path(
            os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"
    return Path(cache_dir) / SECRET_FILE


def _generated_secret(path: Path) -> bytes:
    """This user's secret on this host, created on first use (0600, atomically)."""
    try:
        data = path.read_bytes().strip()
        if len(data) >= MIN_SECRET_BYTES:
            return data
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process won the race: use its secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    data = path.read_bytes().strip()
    if len(data) < MIN_SECRET_BYTES:
        raise AuthError(f"the generated secret file {path} is damaged; delete it")
    return data


def resolve_secret(configured: object | None, env_var: str,
                   cache_dir: Path | None = None) -> bytes:
    """The secret to use: `configured` (a str, bytes or pydantic SecretStr), else the
    environment variable `env_var`, else this user's generated secret on this host."""
    if configured is not None:
        value = configured.get_secret_value() if isinstance(configured, SecretStr) else configured
        return value if isinstance(value, bytes) else str(value).encode()
    env = os.environ.get(env_var)
    if env:
        return check_secret(env).encode()
    return _generated_secret(generated_secret_path(cache_dir))


# -- proofs (pure) ---------------------------------------------------------------------------
def _proof(secret: bytes, label: bytes, side: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(secret, b"|".join((label, side, nonce_s, nonce_c)), hashlib.sha256).digest()


def challenge() -> bytes:
    return MAGIC + secrets.token_bytes(NONCE_BYTES)


def respond(secret: bytes, label: bytes, challenge_frame: bytes) -> tuple[bytes, bytes]:
    """Client: (response frame, the server's expected proof) for a challenge frame."""
    if len(challenge_frame) != CHALLENGE_BYTES or not challenge_frame.startswith(MAGIC):
        raise AuthError("the peer did not start a pdserve authentication handshake")
    nonce_s = challenge_frame[len(MAGIC):]
    nonce_c = secrets.token_bytes(NONCE_BYTES)
    return (nonce_c + _proof(secret, label, b"client", nonce_s, nonce_c),
            _proof(secret, label, b"server", nonce_s, nonce_c))


def judge(secret: bytes, label: bytes, challenge_frame: bytes, response: bytes) -> bytes | None:
    """Server: the verdict frame to send when the response proves the secret, else None."""
    if len(response) != RESPONSE_BYTES:
        return None
    nonce_s = challenge_frame[len(MAGIC):]
    nonce_c, mac = response[:NONCE_BYTES], response[NONCE_BYTES:]
    if not hmac.compare_digest(mac, _proof(secret, label, b"client", nonce_s, nonce_c)):
        return None
    return ACCEPTED + _proof(secret, label, b"server", nonce_s, nonce_c)


def check_verdict(verdict: bytes, expected_proof: bytes) -> None:
    """Client: raise AuthError unless the server accepted us and proved the secret too."""
    if len(verdict) != VERDICT_BYTES or verdict[:1] != ACCEPTED:
        raise AuthError("the peer refused our credentials: the deployment secrets differ "
                        "(set the same secret on every node)")
    if not hmac.compare_digest(verdict[1:], expected_proof):
        raise AuthError("the peer failed to prove the deployment secret")


DENIED_VERDICT = DENIED + bytes(MAC_BYTES)
DENIED_REASON = "the client failed to prove the deployment secret"


# -- blocking sockets ------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AuthError("the peer closed the connection during authentication")
        buf += chunk
    return bytes(buf)


def server_handshake(sock: socket.socket, secret: bytes, label: bytes,
                     on_denied: Callable[[str], None] | None = None) -> None:
    """Authenticate the client on `sock` (its timeout bounds each wait); AuthError if not.
    `on_denied(reason)` runs before the client is told it was denied, so that whoever
    counts refusals has counted this one by the time the client knows of it."""
    frame = challenge()
    sock.sendall(frame)
    verdict = judge(secret, label, frame, _recv_exact(sock, RESPONSE_BYTES))
    if verdict is None:
        if on_denied is not None:
            on_denied(DENIED_REASON)
        try:
            sock.sendall(DENIED_VERDICT)
        except OSError:
            pass
        raise AuthError(DENIED_REASON)
    sock.sendall(verdict)


def client_handshake(sock: socket.socket, secret: bytes, label: bytes) -> None:
    response, expected = respond(secret, label, _recv_exact(sock, CHALLENGE_BYTES))
    sock.sendall(response)
    check_verdict(_recv_exact(sock, VERDICT_BYTES), expected)


# -- asyncio streams ---------------------------------------------------------------------------
async def _read_exact(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise AuthError("the peer closed the connection during authentication") from e


async def server_handshake_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 secret: bytes, label: bytes, timeout_s: float) -> None:
    frame = challenge()
    writer.write(frame)
    await writer.drain()
    try:
        response = await asyncio.wait_for(_read_exact(reader, RESPONSE_BYTES), timeout_s)
    except asyncio.TimeoutError as e:
        raise AuthError("the client sent no authentication in time") from e
    verdict = judge(secret, label, frame, response)
    if verdict is None:
        writer.write(DENIED_VERDICT)
        raise AuthError(DENIED_REASON)
    writer.write(verdict)
    await writer.drain()


async def client_handshake_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 secret: bytes, label: bytes, timeout_s: float) -> None:
    try:
        frame = await asyncio.wait_for(_read_exact(reader, CHALLENGE_BYTES), timeout_s)
        response, expected = respond(secret, label, frame)
        writer.write(response)
        await writer.drain()
        verdict = await asyncio.wait_for(_read_exact(reader, VERDICT_BYTES), timeout_s)
    except asyncio.TimeoutError as e:
        raise AuthError("the peer did not complete authentication in time") from e
    check_verdict(verdict, expected)
