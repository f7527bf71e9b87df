"""Who may talk to the engine's internal ports, and on which address they listen.

Note [Control-plane authentication]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every launch has a secret of at least 16 bytes, known to its ranks only:
- `gfdit serve` makes one per launch and hands it to the ranks in their environment (GFDIT_SECRET;
  a process's environment is readable by its user only). With plain torchrun, set GFDIT_SECRET
  (at least 32 hex digits, e.g. `openssl rand -hex 32`) or GFDIT_SECRET_FILE (a file only its owner
  may read or write, mode 0600 or stricter) in every rank's environment.
- When neither is set and every rank is on one node, rank 0 makes one and hands it to the other
  ranks over gfcoll (shared memory that only this job's ranks mapped); ranks on several nodes need
  one of the two variables, and the engine refuses to start without it.
From the secret, HMAC-SHA256 derives independent keys: the ZeroMQ CURVE key pairs of rank 0's
ROUTER (server) and of the workers' DEALERs (client), and the key of the liveness handshake.
- ZeroMQ: the ROUTER is a CURVE server whose ZAP handler admits the workers' public key only; a peer
  that does not hold the secret fails the handshake before any frame of its messages is read (libzmq
  drops it; a socket monitor logs the failure with the endpoint). The traffic is encrypted, too.
- Liveness (Note [Worker liveness] in gfdit.runtime.channel): rank 0 sends a fresh random nonce on
  every accepted connection; the peer answers with its rank and HMAC(key, nonce, rank) within
  kLivenessAuthTimeoutS. Until it has, the connection counts for nothing: a stranger's connection,
  its bytes and its closing never touch the liveness bookkeeping, and it is closed and logged.

Note [Internal addresses]
~~~~~~~~~~~~~~~~~~~~~~~~~
The internal ports (ZeroMQ, liveness) listen on 127.0.0.1 when every rank is on one node, and on
the local address of MASTER_ADDR when they span nodes (rank 0 runs where MASTER_ADDR points under
torchrun's static rendezvous). `control_host` (gfdit.serve --control-host) overrides both; a wildcard
(0.0.0.0, ::) is accepted only there, explicitly, since it exposes the ports on every interface
(still authenticated as above, but reachable by anyone who can route to the machine).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import stat
import struct

import zmq
import zmq.auth.thread

__all__ = [
    "SecretError",
    "Keys",
    "kLivenessAuthTimeoutS",
    "kLivenessNonceBytes",
    "kLivenessProofBytes",
    "control_bind_host",
    "control_connect_host",
    "check_liveness_proof",
    "is_wildcard",
    "derive_keys",
    "liveness_proof",
    "load_secret",
    "make_secret",
    "start_zap",
]

log = logging.getLogger("gfdit.auth")

kSecretEnv = "GFDIT_SECRET"  # the launch secret itself (hex, or any string of at least 16 bytes)
kSecretFileEnv = "GFDIT_SECRET_FILE"  # a file holding it, mode 0600 or stricter
kMinSecretBytes = 16
kLivenessNonceBytes = 32
kLivenessProofBytes = 8 + 32  # rank (int64, network order) + HMAC-SHA256
kZapDomain = "gfdit"  # the ZAP domain of the ROUTER; the handler admits clients in it only
kLivenessAuthTimeoutS = 10.0  # a liveness connection that has not proven itself by then is closed


class SecretError(ValueError):
    """The launch secret is missing where it is needed, too short, or its file is not private."""


def make_secret() -> str:
    """A fresh launch secret (64 hex digits), for GFDIT_SECRET."""
    return secrets.token_hex(32)


def _secret_bytes(text: str, where: str) -> bytes:
    raw = text.strip().encode()
    if len(raw) < kMinSecretBytes:
        raise SecretError(f"{where}: the secret must be at least {kMinSecretBytes} bytes, got {len(raw)}")
    return raw


def load_secret(environ=None) -> bytes | None:
    """The launch secret from GFDIT_SECRET or GFDIT_SECRET_FILE, or None when neither is set.
    SecretError when the value is too short or the file may be read or written by others."""
    env = os.environ if environ is None else environ
    if env.get(kSecretEnv):
        return _secret_bytes(env[kSecretEnv], kSecretEnv)
    path = env.get(kSecretFileEnv)
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise SecretError(f"{kSecretFileEnv}={path!r}: cannot open it: {e}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{kSecretFileEnv}={path!r} is not a regular file")
        if st.st_uid != os.getuid():
            raise SecretError(f"{kSecretFileEnv}={path!r} belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & 0o077:
            raise SecretError(
                f"{kSecretFileEnv}={path!r} has mode {stat.S_IMODE(st.st_mode):04o}: others may read or "
                "write it; chmod 600 it"
            )
        return _secret_bytes(f.read(4096), f"{kSecretFileEnv}={path!r}")


class Keys:
    """The keys derived from one launch secret (Note [Control-plane authentication])."""

    def __init__(self, secret: bytes):
        def derive(label: str) -> bytes:
            return hmac.new(secret, b"gfdit/" + label.encode(), hashlib.sha256).digest()

        self.server_secret = zmq.utils.z85.encode(derive("curve-server"))
        self.server_public = zmq.curve_public(self.server_secret)
        self.client_secret = zmq.utils.z85.encode(derive("curve-client"))
        self.client_public = zmq.curve_public(self.client_secret)
        self.liveness = derive("liveness")

    def __repr__(self) -> str:  # never print key material
        return "Keys(<derived from the launch secret>)"

    def make_server(self, sock: zmq.Socket) -> None:
        """Makes `sock` (before bind) a CURVE server; start_zap() decides which clients it admits."""
        sock.zap_domain = kZapDomain.encode()
        sock.curve_server = True
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public

    def make_client(self, sock: zmq.Socket) -> None:
        """Makes `sock` (before connect) a CURVE client of the server."""
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public


def derive_keys(secret: bytes) -> Keys:
    return Keys(secret)


class _AllowWorkers:
    """ZAP credentials provider: admits the workers' CURVE public key only, logs the rest."""

    def __init__(self, public: bytes):
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(key, self._public)
        if not ok:
            log.warning("control socket: refused a CURVE client with an unknown key")
        return ok


def start_zap(ctx: zmq.Context, keys: Keys) -> zmq.auth.thread.ThreadAuthenticator:
    """Starts the ZAP handler of `ctx` (a thread) that admits only the workers' key; stop() it when
    the sockets are closed."""
    auth = zmq.auth.thread.ThreadAuthenticator(ctx, log=logging.getLogger("gfdit.auth.zap"))
    auth.start()
    auth.configure_curve_callback(domain=kZapDomain, credentials_provider=_AllowWorkers(keys.client_public))
    return auth


def liveness_proof(key: bytes, nonce: bytes, rank: int) -> bytes:
    """What a rank sends on its liveness connection after rank 0's nonce: its rank and the MAC."""
    head = struct.pack("!q", rank)
    return head + hmac.new(key, b"liveness" + nonce + head, hashlib.sha256).digest()


def check_liveness_proof(key: bytes, nonce: bytes, proof: bytes) -> int | None:
    """The rank `proof` proves, or None if it proves nothing."""
    if len(proof) != kLivenessProofBytes:
        return None
    (rank,) = struct.unpack("!q", proof[:8])
    return rank if hmac.compare_digest(liveness_proof(key, nonce, rank), proof) else None


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def _local_address(host: str) -> str | None:
    """The address of `host` if it is one of this machine's, else None (resolved, then bound to)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
            return sockaddr[0]
        except OSError:
            continue
    return None


def control_bind_host(one_node: bool, control_host: str | None, master_addr: str | None) -> str:
    """Rank 0's address for the internal ports (Note [Internal addresses]); ValueError when there is
    no safe choice."""
    if control_host:
        if is_wildcard(control_host):
            log.warning(
                "internal ports listen on every interface (%s), as asked: anyone who can reach this "
                "machine can connect to them (they still must prove the launch secret)",
                control_host,
            )
            return "0.0.0.0" if control_host in ("*", "") else control_host
        return control_host
    if one_node:
        return "127.0.0.1"
    if master_addr:
        local = _local_address(master_addr)
        if local is not None and not is_wildcard(local):
            return local
    raise ValueError(
        f"ranks span nodes and MASTER_ADDR={master_addr!r} is not an address of rank 0's machine: "
        "give the address the other ranks reach rank 0 on (gfdit.serve --control-host)"
    )


def control_connect_host(one_node: bool, control_host: str | None, master_addr: str | None) -> str:
    """The address the ranks connect to for rank 0's internal ports."""
    if control_host and not is_wildcard(control_host):
        return control_host
    if one_node:
        return "127.0.0.1"
    return master_addr or "127.0.0.1"
