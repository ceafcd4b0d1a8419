"""Proof of possession: registrations and calls signed with the nodes' Ed25519 keys.

- **Registration** is a challenge-response: the coordinator's `Challenge` gives a fresh nonce
  (single use, CHALLENGE_TTL_S) and its public key; `Register` carries the nonce and the node's
  signature over `registration_message` (coordinator key ‖ nonce ‖ NodeInfo, deterministic
  serialization), checked against the NodeInfo's own public key.
- **Every later call** (a node's heartbeats, the coordinator's orders to a worker, a client's
  calls) carries AUTH_HEADER = signer key ‖ time (ms) ‖ random nonce ‖ signature over
  `call_message` (the recipient's key ‖ the gRPC method ‖ time ‖ nonce ‖ SHA-256 of the request).
  The recipient (`Gate`) refuses a bad signature, one made for another recipient or method,
  one outside ±WINDOW_S of its clock, and one it has seen before; the servicer then decides
  whether that key may make the call (`signed`, `authorize`).
- **Channel keys**: the coordinator's calls to a worker (two per hop, every token) carry
  MAC_HEADER = key id ‖ time ‖ nonce ‖ HMAC-SHA256 of the same `call_message` instead, under a
  secret the worker gave it (`OpenChannel`, itself a signed call, answered over TLS only). The
  gate checks it as a signature, in ~2 us instead of ~60, and the call counts as the key's owner's.
  A worker that restarted knows no key: the coordinator opens another and calls again.

The signatures cover requests; responses are authenticated by the TLS channel pinned to the
peer's certificate (identity/tls.py), which `--insecure` gives up.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import logging
import os
import threading
import time
from collections import OrderedDict, namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message

from consortium.identity.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, NodeIdentity, verify_signature
from consortium.identity.tls import PinStore, TrustError, check_binding
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import PermissionDeniedError, UnauthenticatedError, fetch_cert, make_channel

log = logging.getLogger(__name__)

AUTH_HEADER = "consortium-auth-bin"
WINDOW_S = 60.0  # a call's signature is valid this long either side of the recipient's clock
CHALLENGE_TTL_S = 60.0
CALL_CONTEXT, REGISTER_CONTEXT = b"consortium-call-v1\0", b"consortium-register-v1\0"
NONCE_BYTES = 8
HEADER_BYTES = PUBLIC_KEY_BYTES + 8 + NONCE_BYTES + SIGNATURE_BYTES
MAC_HEADER = "consortium-mac-bin"
KEY_ID_BYTES, SECRET_BYTES, TAG_BYTES = 16, 32, 32
MAC_HEADER_BYTES = KEY_ID_BYTES + 8 + NONCE_BYTES + TAG_BYTES
OPEN_CHANNEL = "OpenChannel"  # always signed: it hands out the keys


def service_name(service: str) -> str:
    """The full gRPC name of a service of the schema: 'Worker' -> 'consortium.v1.Worker'."""
    return pb.DESCRIPTOR.services_by_name[service].full_name


def _payload(request: Message | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString(deterministic=True)


def call_message(audience: bytes, method: str, time_ms: int, nonce: bytes, request: Message | bytes) -> bytes:
    """What a call's signature covers: the recipient's key, the method, time, nonce and request."""
    digest = hashlib.sha256(_payload(request)).digest()
    return b"".join(
        (CALL_CONTEXT, audience, method.encode(), b"\0", time_ms.to_bytes(8, "big"), nonce, digest)
    )


@dataclass(frozen=True)
class ChannelKey:
    key_id: bytes
    secret: bytes


def call_mac(secret: bytes, audience: bytes, method: str, time_ms: int, nonce: bytes, request) -> bytes:
    return hmac.digest(secret, call_message(audience, method, time_ms, nonce, request), "sha256")


def registration_message(coordinator_key: bytes, nonce: bytes, info: pb.NodeInfo) -> bytes:
    return REGISTER_CONTEXT + coordinator_key + nonce + info.SerializeToString(deterministic=True)


def signed_registration(identity: NodeIdentity, challenge: pb.ChallengeResponse, info: pb.NodeInfo):
    sig = identity.sign(registration_message(challenge.coordinator_key, challenge.nonce, info))
    return pb.RegisterRequest(node=info, nonce=challenge.nonce, signature=sig)


def check_registration(coordinator_key: bytes, req: pb.RegisterRequest) -> None:
    """The registration is signed by the key its NodeInfo names (UnauthenticatedError)."""
    msg = registration_message(coordinator_key, req.nonce, req.node)
    if not verify_signature(req.node.public_key, req.signature, msg):
        raise UnauthenticatedError(
            f"registration of {req.node.node_id!r} is not signed by the key it names (proof of possession failed)"
        )


# --- the caller's side -----------------------------------------------------------------------


class _Details(
    namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class CallSigner(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Signs every call of a channel (grpc.intercept_channel) for the recipient whose public key
    is `audience`; calls go unsigned while it is None (before the coordinator's key is known).
    Once the recipient opened a `channel_key`, calls carry its MAC instead (but OpenChannel)."""

    def __init__(self, identity: NodeIdentity, audience: bytes | None = None):
        self.identity, self.audience = identity, audience
        self.channel_key: ChannelKey | None = None

    def header(self, method: str, request: Message | bytes, time_ms: int | None = None) -> bytes:
        assert self.audience is not None
        t = int(time.time() * 1000) if time_ms is None else time_ms
        nonce = os.urandom(NONCE_BYTES)
        sig = self.identity.sign(call_message(self.audience, method, t, nonce, request))
        return self.identity.public_key + t.to_bytes(8, "big") + nonce + sig

    def mac_header(
        self, key: ChannelKey, method: str, request: Message | bytes, time_ms: int | None = None
    ) -> bytes:
        assert self.audience is not None
        t = int(time.time() * 1000) if time_ms is None else time_ms
        nonce = os.urandom(NONCE_BYTES)
        tag = call_mac(key.secret, self.audience, method, t, nonce, request)
        return key.key_id + t.to_bytes(8, "big") + nonce + tag

    def _sign(self, details: grpc.ClientCallDetails, request) -> grpc.ClientCallDetails:
        if self.audience is None:
            return details
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        key = self.channel_key
        if key is not None and not method.endswith("/" + OPEN_CHANNEL):
            auth = (MAC_HEADER, self.mac_header(key, method, request))
        else:
            auth = (AUTH_HEADER, self.header(method, request))
        metadata = [*(details.metadata or ()), auth]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._sign(client_call_details, request), request)

    intercept_unary_stream = intercept_unary_unary


# --- the recipient's side --------------------------------------------------------------------


@dataclass(frozen=True)
class SignedCall:
    key: bytes  # the signer's public key
    signature: bytes
    time_ms: int


class Gate:
    """Verifies call signatures and channel MACs made for `audience` (this process's public
    key), keeps the channel keys it opened, and remembers the signatures and MACs it accepted
    until they are stale, so none is accepted twice."""

    def __init__(
        self,
        audience: bytes,
        window_s: float = WINDOW_S,
        remember: int = 1 << 16,
        clock=time.time,
        channels: int = 64,
    ):
        self.audience, self.window_ms, self.clock = audience, int(window_s * 1000), clock
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # signature -> when it goes stale (ms)
        self._remember = remember
        self._channels: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()  # key id -> secret, owner
        self._max_channels = channels
        self._lock = threading.Lock()

    def open_channel(self, owner: bytes) -> ChannelKey:
        """A fresh channel key whose MACs count as calls by `owner` (a public key the servicer
        authorized). At most `channels` are kept; the least recently used goes first (its holder
        is refused and opens another)."""
        key = ChannelKey(os.urandom(KEY_ID_BYTES), os.urandom(SECRET_BYTES))
        with self._lock:
            self._channels[key.key_id] = (key.secret, owner)
            while len(self._channels) > self._max_channels:
                self._channels.popitem(last=False)
        return key

    def verify(self, method: str, request: Message, metadata) -> SignedCall | None:
        """The call's valid, fresh signature or channel MAC; None if it carries neither;
        UnauthenticatedError if it is malformed, stale, or not one of this call for this recipient."""
        header = mac = None
        for k, v in metadata or ():
            if k == AUTH_HEADER:
                header = v
            elif k == MAC_HEADER:
                mac = v
        if mac is not None:
            return self._verify_mac(method, request, mac)
        if header is None:
            return None
        if not isinstance(header, bytes) or len(header) != HEADER_BYTES:
            raise UnauthenticatedError(f"malformed call signature ({AUTH_HEADER})")
        key, t = (
            header[:PUBLIC_KEY_BYTES],
            int.from_bytes(header[PUBLIC_KEY_BYTES : PUBLIC_KEY_BYTES + 8], "big"),
        )
        nonce, sig = header[PUBLIC_KEY_BYTES + 8 : -SIGNATURE_BYTES], header[-SIGNATURE_BYTES:]
        self._check_time(t)
        if not verify_signature(key, sig, call_message(self.audience, method, t, nonce, request)):
            raise UnauthenticatedError("bad call signature (not this call, or made for another recipient)")
        return SignedCall(key, sig, t)

    def _verify_mac(self, method: str, request: Message, header) -> SignedCall:
        if not isinstance(header, bytes) or len(header) != MAC_HEADER_BYTES:
            raise UnauthenticatedError(f"malformed call MAC ({MAC_HEADER})")
        key_id, t = header[:KEY_ID_BYTES], int.from_bytes(header[KEY_ID_BYTES : KEY_ID_BYTES + 8], "big")
        nonce, tag = header[KEY_ID_BYTES + 8 : -TAG_BYTES], header[-TAG_BYTES:]
        self._check_time(t)
        with self._lock:
            entry = self._channels.get(key_id)
            if entry is not None:
                self._channels.move_to_end(key_id)
        if entry is None:
            raise UnauthenticatedError(
                "unknown channel key (this node restarted or dropped it): open another"
            )
        secret, owner = entry
        if not hmac.compare_digest(tag, call_mac(secret, self.audience, method, t, nonce, request)):
            raise UnauthenticatedError("bad call MAC (not this call, or made for another recipient)")
        return SignedCall(owner, tag, t)

    def _check_time(self, time_ms: int) -> None:
        skew = int(self.clock() * 1000) - time_ms
        if abs(skew) > self.window_ms:
            raise UnauthenticatedError(
                f"stale call signature: made {skew / 1000:+.0f} s from this node's clock (the window is "
                f"±{self.window_ms / 1000:g} s: are the clocks synchronised?)"
            )

    def consume(self, call: SignedCall) -> None:
        """Records an accepted call's signature; UnauthenticatedError if it was used before.
        Called once the signer is authorized, so strangers cannot fill the memory."""
        now = int(self.clock() * 1000)
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if call.signature in self._seen:
                raise UnauthenticatedError("replayed call signature")
            self._seen[call.signature] = call.time_ms + self.window_ms
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)


class Challenges:
    """Registration nonces: random, single use, valid for `ttl_s`, at most `capacity` at once
    (the oldest is dropped: a flood of challenges only delays registrations, which retry)."""

    def __init__(self, ttl_s: float = CHALLENGE_TTL_S, capacity: int = 4096, clock=time.monotonic):
        self.ttl_s, self.capacity, self.clock = ttl_s, capacity, clock
        self._nonces: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        nonce, now = os.urandom(32), self.clock()
        with self._lock:
            while self._nonces and (
                len(self._nonces) >= self.capacity or next(iter(self._nonces.values())) < now
            ):
                self._nonces.popitem(last=False)
            self._nonces[nonce] = now + self.ttl_s
        return nonce

    def redeem(self, nonce: bytes) -> None:
        with self._lock:
            expires = self._nonces.pop(bytes(nonce), None)
        if expires is None or expires < self.clock():
            raise UnauthenticatedError("unknown or expired registration challenge (call Challenge first)")


_last_logged: dict[str, float] = {}


def _log_refusal(name: str, context: grpc.ServicerContext, e: Exception) -> None:
    """One warning per method per 10 s: a stranger cannot flood the log."""
    now = time.monotonic()
    if now - _last_logged.get(name, -10.0) >= 10.0:
        _last_logged[name] = now
        log.warning("refused %s from %s: %s", name, context.peer(), e)


def signed(method: Callable) -> Callable:
    """Decorates a servicer method (under @maps_errors): verifies the call's signature with
    `self.gate`, asks `self.authorize(name, request, key or None)` (raises to refuse), then
    consumes the signature (a replay is refused). The servicer names its service `SERVICE`; a
    method with a `signer` parameter gets the verified key (or None)."""
    name = method.__name__
    wants_key = "signer" in inspect.signature(method).parameters

    def check(self, request, context) -> dict:
        try:
            call = self.gate.verify(f"/{self.SERVICE}/{name}", request, context.invocation_metadata())
            key = call.key if call else None
            self.authorize(name, request, key)
            if call is not None:
                self.gate.consume(call)
        except (UnauthenticatedError, PermissionDeniedError) as e:
            _log_refusal(name, context, e)
            raise
        return {"signer": key} if wants_key else {}

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            kw = check(self, request, context)
            yield from method(self, request, context, **kw)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        kw = check(self, request, context)
        return method(self, request, context, **kw)

    return unary


# --- a node or client reaching the coordinator ----------------------------------------------


class CoordinatorLink:
    """A channel to the coordinator at `address`: TLS pinned to its certificate (`pin`:
    --coordinator-cert, else the data directory's pin, else trust on first use), or plain text
    when `insecure`. Calls are signed by `identity` once `challenge()` learnt the coordinator's
    key, which it pins: a coordinator that later shows another key is refused."""

    def __init__(
        self,
        address: str,
        identity: NodeIdentity,
        insecure: bool,
        pin: str | None,
        data_dir: str | Path | None,
        max_message_bytes: int,
        timeout_s: float,
    ):
        self.address, self.peer = address, f"coordinator at {address}"
        self.signer = CallSigner(identity)
        self.cert: bytes | None = None
        if not insecure:
            self.cert = fetch_cert(address, self.peer, timeout_s)
            store = PinStore(data_dir)
            if store.check(address, self.cert, pin):
                log.warning(
                    "trusting the coordinator at %s on first use: TLS certificate sha256 %s (pinned in %s)",
                    address,
                    store.get(address),
                    store.path,
                )
        self.channel = make_channel(address, max_message_bytes, pin=self.cert, interceptors=(self.signer,))
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    @property
    def key(self) -> bytes | None:
        return self.signer.audience

    def challenge(self, timeout_s: float = 10.0) -> pb.ChallengeResponse:
        """A registration challenge; checks the coordinator's key against its TLS certificate
        and the key pinned before (TrustError), and pins it. grpc.RpcError if unreachable."""
        ch = self.stub.Challenge(pb.ChallengeRequest(), timeout=timeout_s)
        key = bytes(ch.coordinator_key)
        if len(key) != PUBLIC_KEY_BYTES:
            raise TrustError(f"{self.peer} sent no valid public key")
        if self.cert is not None and not check_binding(key, self.cert, ch.tls_binding):
            raise TrustError(f"{self.peer}: its key does not vouch for the TLS certificate it serves")
        if self.key is not None and key != self.key:
            raise TrustError(
                f"{self.peer} now has public key {key.hex()[:16]}…, not {self.key.hex()[:16]}… as before: refused"
            )
        self.signer.audience = key
        return ch

    def close(self) -> None:
        self.channel.close()
