"""How the HTTP API serves: address, API keys, release mode and request limits."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from consortium.errors import ConsortiumError

VERIFIED, OPTIMISTIC = "verified", "optimistic"


@dataclass(frozen=True)
class ServeConfig:
    """`coordinator start --http-port N` (field names are the flags': they share the CLI's namespace)."""

    http_port: int | None = None  # None: no HTTP API; 0: any free port
    http_host: str = "127.0.0.1"
    api_keys: frozenset[str] | None = None  # Bearer keys; None: no auth (loopback only unless no_auth)
    no_auth: bool = False  # serve without keys on any interface (a trusted network only)
    release: str = VERIFIED  # verified: a token goes out once no audit can roll it back
    default_max_tokens: int = 256  # a request that names no max_tokens
    max_body_bytes: int = 1 * 2**20  # larger request bodies: 413
    http_tls_cert: Path | None = None  # PEM: serve HTTPS (with http_tls_key)
    http_tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.release not in (VERIFIED, OPTIMISTIC):
            raise ConsortiumError(f"release must be {VERIFIED} or {OPTIMISTIC}, got {self.release!r}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ConsortiumError(f"http port {self.http_port} outside 0..65535")
        if self.default_max_tokens < 1 or self.max_body_bytes < 1:
            raise ConsortiumError("default max tokens and max body bytes must be positive")
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ConsortiumError("--http-tls-cert and --http-tls-key go together")

    def check_exposure(self) -> None:
        """Without keys the API serves only on loopback, unless --no-auth says otherwise."""
        if self.api_keys is None and not self.no_auth and not is_loopback(self.http_host):
            raise ConsortiumError(
                f"refusing to serve the HTTP API on {self.http_host} without --api-keys "
                "(or --no-auth, for a network you trust)"
            )

    def cli_args(self, api_keys_file: Path | None) -> list[str]:
        """The flags of `coordinator start` that serve this (the demo's coordinator is a child)."""
        args = [
            "--http-port",
            str(self.http_port or 0),
            "--http-host",
            self.http_host,
            "--release",
            self.release,
        ]
        args += ["--default-max-tokens", str(self.default_max_tokens)]
        args += ["--api-keys", str(api_keys_file)] if api_keys_file is not None else []
        if self.http_tls_cert is not None:
            args += ["--http-tls-cert", str(self.http_tls_cert), "--http-tls-key", str(self.http_tls_key)]
        return args + (["--no-auth"] if self.no_auth else [])

    @property
    def auth(self) -> bool:
        return self.api_keys is not None

    def tls_context(self) -> ssl.SSLContext | None:
        """The HTTPS context, checked now (a bad certificate or key is one error at start)."""
        if self.http_tls_cert is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.http_tls_cert, self.http_tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ConsortiumError(
                f"cannot use {self.http_tls_cert} / {self.http_tls_key} for HTTPS: {e}"
            ) from e
        return ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_keys(path: str | Path) -> frozenset[str]:
    """One key per line; blank lines and # comments are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConsortiumError(f"cannot read API keys {path}: {e.strerror}") from e
    keys = frozenset(k for k in (line.split("#", 1)[0].strip() for line in lines) if k)
    if not keys:
        raise ConsortiumError(f"{path}: no API key in the file")
    for k in keys:
        if len(k) < 16 or any(c.isspace() for c in k):
            raise ConsortiumError(f"{path}: an API key must be at least 16 characters, without spaces")
    return keys
