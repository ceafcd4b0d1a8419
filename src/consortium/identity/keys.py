"""Ed25519 node keys, kept under a data directory with file mode 0600.

A node id is derived from the public key, so an id can never be claimed with another key.
Signing and verifying go through libsodium (PyNaCl): every hop signs and verifies twice (the
call, the receipt), and here its Ed25519 takes ~20/54 us against OpenSSL's ~31/104 us. It is
also the stricter verifier (it refuses small-order keys and non-canonical signatures). The key
file and TLS stay with `cryptography`; both produce the same deterministic signatures.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from consortium.errors import ConsortiumError

KEY_FILE = "node.key"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(ConsortiumError):
    """Unreadable, malformed or badly protected key, or a bad public key / signature."""


def default_data_dir() -> Path:
    env = os.environ.get("CONSORTIUM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "consortium"


def node_id_for(public_key: bytes) -> str:
    """'n' + the first 20 hex digits of SHA-256(public key): short, and bound to the key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return "n" + hashlib.sha256(public_key).hexdigest()[:20]


@functools.lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> VerifyKey:
    """The key object of raw bytes, kept: every hop verifies the same few keys (bounded: a
    stranger's keys only evict)."""
    return VerifyKey(raw)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `message` under `public_key`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _public_key(bytes(public_key)).verify(message, bytes(signature))
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False


class NodeIdentity:
    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None):
        self.path = path
        self._key = SigningKey(
            private_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        )
        self.public_key = bytes(self._key.verify_key)
        self.node_id = node_id_for(self.public_key)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | Path | None = None) -> NodeIdentity:
        """The key in data_dir/node.key, created (mode 0600) on first use."""
        d = Path(data_dir).expanduser() if data_dir else default_data_dir()
        path = d / KEY_FILE
        if not path.exists():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = Ed25519PrivateKey.generate()
            raw = key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            try:  # O_EXCL: two nodes started at once on one data dir cannot both write a key
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.load(path)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            return cls(key, path)
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> NodeIdentity:
        path = Path(path)
        try:
            mode = path.stat().st_mode
            raw = path.read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read node key {path}: {e.strerror}") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"node key {path} is accessible by others (mode {oct(mode & 0o777)}); chmod 600 it"
            )
        if len(raw) != 32:
            raise IdentityError(f"node key {path} is malformed ({len(raw)} bytes, expected 32)")
        return cls(Ed25519PrivateKey.from_private_bytes(raw), path)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature
