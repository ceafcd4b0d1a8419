"""A node's TLS certificate, bound to its Ed25519 identity, and the pins of coordinators.

gRPC's TLS (BoringSSL) does not accept Ed25519 certificates, so every node also has an
ECDSA P-256 key and a self-signed certificate, created once and kept (mode 0600) next to
node.key; its Ed25519 key signs the certificate's SHA-256 (`bind_cert`), which travels with the
registration. Nobody trusts a CA: a channel's only root is the exact certificate expected of
its peer, and every certificate carries the same name (SERVER_NAME), which clients check.

A coordinator's certificate is pinned by `--coordinator-cert` (its tls.crt, or its SHA-256
fingerprint) or else on first use, in `known_coordinators` under the data directory, keyed
by host:port; a later mismatch is refused (`PinStore.check`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from consortium.identity.keys import IdentityError, NodeIdentity, default_data_dir, verify_signature

SERVER_NAME = "consortium-node"
PAIR_FILE, CERT_FILE, KNOWN_FILE = "tls.pem", "tls.crt", "known_coordinators"
MAX_CERT_BYTES = 4096
BINDING_CONTEXT = b"consortium-tls-binding-v1\0"


class TrustError(IdentityError):
    """A peer whose certificate or key is not the one pinned, or that does not speak TLS."""


def fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def binding_message(cert_der: bytes) -> bytes:
    return BINDING_CONTEXT + hashlib.sha256(cert_der).digest()


def bind_cert(identity: NodeIdentity, cert_der: bytes) -> bytes:
    """The Ed25519 signature by which `identity` vouches for the TLS certificate `cert_der`."""
    return identity.sign(binding_message(cert_der))


def check_binding(public_key: bytes, cert_der: bytes, signature: bytes) -> bool:
    return verify_signature(public_key, signature, binding_message(cert_der))


def check_cert(cert_der: bytes) -> bytes:
    """`cert_der` if it is one X.509 certificate of at most MAX_CERT_BYTES; IdentityError otherwise."""
    if not 0 < len(cert_der) <= MAX_CERT_BYTES:
        raise IdentityError(f"TLS certificate of {len(cert_der)} bytes (1 to {MAX_CERT_BYTES})")
    try:
        x509.load_der_x509_certificate(cert_der)
    except ValueError as e:
        raise IdentityError(f"malformed TLS certificate: {e}") from None
    return cert_der


def der_to_pem(cert_der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(cert_der).encode()


@dataclass(frozen=True)
class TlsIdentity:
    key_pem: bytes
    cert_der: bytes

    @property
    def cert_pem(self) -> bytes:
        return der_to_pem(self.cert_der)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_der)

    @classmethod
    def generate(cls) -> TlsIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))  # tolerates a peer's clock behind ours
            .not_valid_after(
                datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc)
            )  # pinned, never rotated
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(pem, cert.public_bytes(serialization.Encoding.DER))

    @classmethod
    def load_or_create(cls, data_dir: str | Path | None = None) -> TlsIdentity:
        """The pair in data_dir/tls.pem (key and certificate in one file, mode 0600, created
        whole on first use), and its certificate in tls.crt for operators to hand out."""
        d = Path(data_dir).expanduser() if data_dir else default_data_dir()
        path = d / PAIR_FILE
        if not path.exists():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            new = cls.generate()
            tmp = d / f".{PAIR_FILE}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(new.key_pem + new.cert_pem)
            try:  # link fails if another process created the pair meanwhile: theirs wins
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        tls = cls.load(path)
        cert = d / CERT_FILE
        if not cert.is_file() or cert.read_bytes() != tls.cert_pem:
            tmp = d / f".{CERT_FILE}.{os.getpid()}.tmp"
            tmp.write_bytes(tls.cert_pem)
            os.replace(tmp, cert)
        return tls

    @classmethod
    def load(cls, path: str | Path) -> TlsIdentity:
        path = Path(path)
        try:
            mode, text = path.stat().st_mode, path.read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read TLS key {path}: {e.strerror}") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"TLS key {path} is accessible by others (mode {oct(mode & 0o777)}); chmod 600 it"
            )
        key, sep, cert = text.partition(b"-----BEGIN CERTIFICATE-----")
        try:
            serialization.load_pem_private_key(key, None)
            der = ssl.PEM_cert_to_DER_cert((sep + cert).decode())
            return cls(key, check_cert(der))
        except (ValueError, UnicodeDecodeError) as e:
            raise IdentityError(f"TLS key {path} is malformed: {e}") from None


def read_pin(text: str) -> tuple[bytes | None, str]:
    """`--coordinator-cert`: a certificate file (PEM or DER) or a SHA-256 fingerprint (64 hex
    digits, optionally `sha256:` and colons). Returns (the certificate or None, fingerprint)."""
    digits = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(digits) == 64 and all(c in "0123456789abcdef" for c in digits):
        return None, digits
    try:
        data = Path(text).expanduser().read_bytes()
    except OSError as e:
        raise TrustError(f"cannot read the coordinator certificate {text}: {e.strerror}") from e
    try:
        der = ssl.PEM_cert_to_DER_cert(data.decode()) if b"-----BEGIN" in data else data
    except (ValueError, UnicodeDecodeError) as e:
        raise TrustError(f"{text}: not a certificate ({e})") from None
    return check_cert(der), fingerprint(der)


class PinStore:
    """Certificates of coordinators trusted on first use: `host:port fingerprint` lines."""

    def __init__(self, data_dir: str | Path | None = None):
        self.path = (Path(data_dir).expanduser() if data_dir else default_data_dir()) / KNOWN_FILE

    def get(self, address: str) -> str | None:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:  # the first pin of an address stands
            addr, _, fp = line.partition(" ")
            if addr == address:
                return fp.strip()
        return None

    def add(self, address: str, fp: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:  # one short append: atomic among concurrent writers
            f.write(f"{address} {fp}\n")

    def check(self, address: str, cert_der: bytes, pin: str | None) -> bool:
        """Accepts the certificate `address` presented if it matches `pin` (--coordinator-cert),
        else the stored pin, else stores it (trust on first use: returns True). TrustError on a
        mismatch."""
        got = fingerprint(cert_der)
        expected = read_pin(pin)[1] if pin else self.get(address)
        if expected is None:
            self.add(address, got)
            return True
        if got != expected:
            where = f"--coordinator-cert {pin}" if pin else f"{self.path}"
            hint = "" if pin else f"; if it was replaced on purpose, remove its line from {self.path}"
            raise TrustError(
                f"the coordinator at {address} presents TLS certificate sha256 {got[:16]}…, not the "
                f"one pinned ({expected[:16]}…, {where}): refused{hint}"
            )
        return False
