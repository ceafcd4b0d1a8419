"""Proof of possession and pinned TLS (transport/auth.py, identity/tls.py) without processes:
call signatures and their refusals, registration signatures, challenges, TLS material and
pins, and a real gRPC server over TLS in this process."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from consortium.coordinator.admission import public_status
from consortium.identity import NodeIdentity
from consortium.identity.keys import IdentityError, verify_signature
from consortium.identity.tls import (
    CERT_FILE,
    KNOWN_FILE,
    PAIR_FILE,
    PinStore,
    TlsIdentity,
    TrustError,
    bind_cert,
    check_binding,
    read_pin,
)
from consortium.transport.auth import (
    AUTH_HEADER,
    MAC_HEADER,
    CallSigner,
    Challenges,
    ChannelKey,
    CoordinatorLink,
    Gate,
    check_registration,
    service_name,
    signed,
    signed_registration,
)
from consortium.transport.handlers import add_servicer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import (
    PermissionDeniedError,
    RemoteError,
    UnauthenticatedError,
    bind,
    fetch_cert,
    free_port,
    make_channel,
    make_server,
    maps_errors,
)

METHOD = "/consortium.v1.Coordinator/Heartbeat"
HB = pb.HeartbeatRequest(node_id="n1", active_sessions=2)


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _metadata(signer: CallSigner, request=HB, method=METHOD, time_ms=None):
    return [(AUTH_HEADER, signer.header(method, request, time_ms))]


# --- keys ------------------------------------------------------------------------------------


def test_node_signatures_are_plain_ed25519_and_verification_refuses_what_is_not():
    """libsodium signs and verifies (identity/keys.py); OpenSSL's Ed25519 must agree both ways,
    and a key of the wrong size, a small-order key or a tampered signature must be refused."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    me = NodeIdentity.generate()
    msg = b"receipt bytes"
    sig = me.sign(msg)
    Ed25519PublicKey.from_public_bytes(me.public_key).verify(sig, msg)  # raises if not
    other = Ed25519PrivateKey.generate()
    other_pub = other.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert verify_signature(other_pub, other.sign(msg), msg)
    assert NodeIdentity(other).public_key == other_pub
    assert verify_signature(me.public_key, sig, msg)
    assert not verify_signature(me.public_key, sig, msg + b"!")
    assert not verify_signature(me.public_key, bytes([sig[0] ^ 1]) + sig[1:], msg)
    assert not verify_signature(other_pub, sig, msg)
    assert not verify_signature(me.public_key[:31], sig, msg)
    assert not verify_signature(me.public_key, sig[:63], msg)
    small_order = bytes(32)  # the identity point's neighbour: y = 0 has order 4
    assert not verify_signature(small_order, sig, msg)
    assert not verify_signature(bytes([1]) + bytes(31), bytes(64), msg)  # the identity point


# --- call signatures ---------------------------------------------------------------------


def test_a_signed_call_is_accepted_once_and_names_its_signer():
    me, node = NodeIdentity.generate(), NodeIdentity.generate()
    gate = Gate(me.public_key)
    md = _metadata(CallSigner(node, me.public_key))
    call = gate.verify(METHOD, HB, md)
    assert call.key == node.public_key
    gate.consume(call)
    again = gate.verify(METHOD, HB, md)  # still a valid signature ...
    with pytest.raises(UnauthenticatedError, match="replayed"):
        gate.consume(again)  # ... but used before
    assert gate.verify(METHOD, HB, []) is None  # unsigned: the servicer decides


@pytest.mark.parametrize(
    "change",
    ["request", "method", "audience", "signer key", "signature", "truncated"],
)
def test_a_signature_of_anything_else_is_refused(change):
    me, node = NodeIdentity.generate(), NodeIdentity.generate()
    gate = Gate(me.public_key)
    signer = CallSigner(node, NodeIdentity.generate().public_key if change == "audience" else me.public_key)
    header = signer.header(METHOD, HB)
    request, method = HB, METHOD
    if change == "request":
        request = pb.HeartbeatRequest(node_id="n1", active_sessions=3)
    elif change == "method":
        method = "/consortium.v1.Worker/Execute"
    elif change == "signer key":  # claims another key (e.g. an honest node's) for its own signature
        header = NodeIdentity.generate().public_key + header[32:]
    elif change == "signature":
        header = header[:-1] + bytes([header[-1] ^ 1])
    elif change == "truncated":
        header = header[:-1]
    with pytest.raises(UnauthenticatedError, match="bad call signature|malformed"):
        gate.verify(method, request, [(AUTH_HEADER, header)])


@pytest.mark.parametrize("offset_s", [-61, 61, -3600])
def test_stale_or_future_signatures_are_refused(offset_s):
    me, clock = NodeIdentity.generate(), Clock()
    gate = Gate(me.public_key, clock=clock)
    md = _metadata(
        CallSigner(NodeIdentity.generate(), me.public_key), time_ms=int((clock.t + offset_s) * 1000)
    )
    with pytest.raises(UnauthenticatedError, match="stale call signature"):
        gate.verify(METHOD, HB, md)
    ok = _metadata(CallSigner(NodeIdentity.generate(), me.public_key), time_ms=int((clock.t - 59) * 1000))
    assert gate.verify(METHOD, HB, ok) is not None  # within ±60 s


def test_the_replay_memory_is_bounded_and_forgets_stale_signatures():
    me, clock = NodeIdentity.generate(), Clock()
    gate = Gate(me.public_key, remember=4, clock=clock)
    signer = CallSigner(NodeIdentity.generate(), me.public_key)
    for _ in range(6):
        gate.consume(gate.verify(METHOD, HB, _metadata(signer, time_ms=int(clock.t * 1000))))
    assert len(gate._seen) == 4
    clock.t += 61  # every remembered signature is stale now: forgotten, and refused anyway
    gate.consume(gate.verify(METHOD, HB, _metadata(signer, time_ms=int(clock.t * 1000))))
    assert len(gate._seen) == 1


def _keyed(gate: Gate, owner: NodeIdentity, audience: bytes) -> CallSigner:
    signer = CallSigner(owner, audience)
    signer.channel_key = gate.open_channel(owner.public_key)
    return signer


def _mac(signer: CallSigner, request=HB, method=METHOD, time_ms=None):
    assert signer.channel_key is not None
    return [(MAC_HEADER, signer.mac_header(signer.channel_key, method, request, time_ms))]


def test_a_channel_key_mac_counts_as_a_call_by_its_owner_once():
    me, coordinator, clock = NodeIdentity.generate(), NodeIdentity.generate(), Clock()
    gate = Gate(me.public_key, clock=clock)
    signer = _keyed(gate, coordinator, me.public_key)
    md = _mac(signer, time_ms=int(clock.t * 1000))
    call = gate.verify(METHOD, HB, md)
    assert call is not None and call.key == coordinator.public_key and len(call.signature) == 32
    gate.consume(call)
    with pytest.raises(UnauthenticatedError, match="replayed"):
        gate.consume(gate.verify(METHOD, HB, md))
    # a MAC wins over a signature in the same call: a forged MAC cannot ride on a good signature
    forged = CallSigner(coordinator, me.public_key)
    forged.channel_key = ChannelKey(os.urandom(16), os.urandom(32))
    now = int(clock.t * 1000)
    bad = [*_mac(forged, time_ms=now), *_metadata(CallSigner(coordinator, me.public_key), time_ms=now)]
    with pytest.raises(UnauthenticatedError, match="unknown channel key"):
        gate.verify(METHOD, HB, bad)


@pytest.mark.parametrize(
    "change", ["request", "method", "recipient", "secret", "key id", "stale", "malformed"]
)
def test_a_mac_of_anything_else_or_under_an_unknown_key_is_refused(change):
    me, coordinator, clock = NodeIdentity.generate(), NodeIdentity.generate(), Clock()
    gate = Gate(me.public_key, clock=clock)
    signer = _keyed(gate, coordinator, me.public_key)
    now = int(clock.t * 1000)
    req, method, audience, md = HB, METHOD, me.public_key, None
    if change == "request":
        req = pb.HeartbeatRequest(node_id="n1", active_sessions=3)
    elif change == "method":
        method = "/consortium.v1.Coordinator/Register"
    elif change == "recipient":  # a MAC made for another recipient (the key is the same)
        signer.audience = NodeIdentity.generate().public_key
    elif change == "secret":
        signer.channel_key = ChannelKey(signer.channel_key.key_id, os.urandom(32))
    elif change == "key id":
        signer.channel_key = ChannelKey(os.urandom(16), signer.channel_key.secret)
    elif change == "stale":
        now -= 61_000
    elif change == "malformed":
        md = [(MAC_HEADER, b"short")]
    md = md or _mac(signer, req, method, now)
    signer.audience = audience
    want = {"key id": "unknown channel key", "stale": "stale", "malformed": "malformed"}.get(
        change, "bad call MAC"
    )
    with pytest.raises(UnauthenticatedError, match=want):
        gate.verify(METHOD, HB, md)


def test_channel_keys_are_bounded_and_the_least_recently_used_goes_first():
    me, coordinator = NodeIdentity.generate(), NodeIdentity.generate()
    gate = Gate(me.public_key, channels=2)
    a, b = _keyed(gate, coordinator, me.public_key), _keyed(gate, coordinator, me.public_key)
    gate.verify(METHOD, HB, _mac(a))  # a is used: b is now the least recent
    c = _keyed(gate, coordinator, me.public_key)
    for signer, alive in ((a, True), (b, False), (c, True)):
        if alive:
            assert gate.verify(METHOD, HB, _mac(signer)).key == coordinator.public_key
        else:
            with pytest.raises(UnauthenticatedError, match="unknown channel key"):
                gate.verify(METHOD, HB, _mac(signer))


def test_signing_covers_streaming_and_raw_requests():
    me = NodeIdentity.generate()
    signer = CallSigner(NodeIdentity.generate(), me.public_key)
    gen = pb.GenerateRequest(prompt="p", max_tokens=3)
    method = "/consortium.v1.Coordinator/Generate"
    assert Gate(me.public_key).verify(method, gen, _metadata(signer, gen, method)) is not None
    assert Gate(me.public_key).verify("/x/y", b"raw", _metadata(signer, b"raw", "/x/y")) is not None


# --- registration ------------------------------------------------------------------------


def _challenge(coordinator: NodeIdentity, challenges: Challenges) -> pb.ChallengeResponse:
    return pb.ChallengeResponse(nonce=challenges.issue(), coordinator_key=coordinator.public_key)


def test_registration_proves_possession_of_the_key_it_names():
    coordinator, node, stranger = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    challenges = Challenges()
    info = pb.NodeInfo(node_id="w", address="127.0.0.1:9", public_key=node.public_key)
    req = signed_registration(node, _challenge(coordinator, challenges), info)
    challenges.redeem(req.nonce)
    check_registration(coordinator.public_key, req)
    # a stranger names the honest node's key (as GetStatus shows it) with its own address
    forged = pb.NodeInfo(node_id="w", address="127.0.0.1:666", public_key=node.public_key)
    for bad in (
        signed_registration(stranger, _challenge(coordinator, challenges), forged),  # its own signature
        pb.RegisterRequest(node=forged, nonce=req.nonce, signature=req.signature),  # the honest one, reused
        pb.RegisterRequest(node=forged),  # none
    ):
        with pytest.raises(UnauthenticatedError, match="not signed by the key it names"):
            check_registration(coordinator.public_key, bad)
    with pytest.raises(UnauthenticatedError):  # signed for another coordinator
        check_registration(NodeIdentity.generate().public_key, req)


def test_challenges_are_single_use_expire_and_are_bounded():
    clock = Clock()
    challenges = Challenges(ttl_s=60, capacity=3, clock=clock)
    nonce = challenges.issue()
    challenges.redeem(nonce)
    with pytest.raises(UnauthenticatedError, match="unknown or expired"):
        challenges.redeem(nonce)
    late = challenges.issue()
    clock.t += 61
    with pytest.raises(UnauthenticatedError, match="unknown or expired"):
        challenges.redeem(late)
    with pytest.raises(UnauthenticatedError):
        challenges.redeem(os.urandom(32))
    first = challenges.issue()
    for _ in range(3):
        challenges.issue()
    assert len(challenges._nonces) == 3
    with pytest.raises(UnauthenticatedError):  # the oldest was dropped
        challenges.redeem(first)


# --- TLS material and pins ---------------------------------------------------------------


def test_tls_pair_is_created_once_0600_and_bound_to_the_key(tmp_path):
    tls = TlsIdentity.load_or_create(tmp_path)
    assert (tmp_path / PAIR_FILE).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / CERT_FILE).read_bytes() == tls.cert_pem
    assert TlsIdentity.load_or_create(tmp_path) == tls
    assert TlsIdentity.generate().cert_der != tls.cert_der
    node = NodeIdentity.generate()
    binding = bind_cert(node, tls.cert_der)
    assert check_binding(node.public_key, tls.cert_der, binding)
    assert not check_binding(NodeIdentity.generate().public_key, tls.cert_der, binding)
    assert not check_binding(node.public_key, TlsIdentity.generate().cert_der, binding)
    (tmp_path / PAIR_FILE).chmod(0o644)
    with pytest.raises(IdentityError, match="accessible by others"):
        TlsIdentity.load_or_create(tmp_path)


def test_pins_from_files_fingerprints_and_first_use(tmp_path):
    tls, other = TlsIdentity.load_or_create(tmp_path / "c"), TlsIdentity.generate()
    assert read_pin(str(tmp_path / "c" / CERT_FILE)) == (tls.cert_der, tls.fingerprint)
    (tmp_path / "c.der").write_bytes(tls.cert_der)
    assert read_pin(str(tmp_path / "c.der"))[1] == tls.fingerprint
    colons = ":".join(tls.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert read_pin(f"sha256:{colons}") == (None, tls.fingerprint)
    with pytest.raises(TrustError, match="cannot read"):
        read_pin(str(tmp_path / "missing.crt"))
    store = PinStore(tmp_path / "d")
    assert store.check("h:1", tls.cert_der, None)  # first use: pinned
    assert not store.check("h:1", tls.cert_der, None)
    assert (tmp_path / "d" / KNOWN_FILE).read_text() == f"h:1 {tls.fingerprint}\n"
    with pytest.raises(TrustError, match=f"remove its line from {tmp_path / 'd' / KNOWN_FILE}"):
        store.check("h:1", other.cert_der, None)  # the coordinator's certificate changed
    assert store.check("h:2", other.cert_der, None)  # another address, another pin
    with pytest.raises(TrustError, match="--coordinator-cert"):
        store.check("h:3", other.cert_der, tls.fingerprint)  # an explicit pin wins, nothing stored
    assert store.get("h:3") is None


# --- a real server over TLS -------------------------------------------------------------


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    """Challenge and a heartbeat signed by one known node, through the product's decorators."""

    SERVICE = service_name("Coordinator")

    def __init__(self, identity: NodeIdentity, tls: TlsIdentity | None, node_key: bytes):
        self.identity, self.tls, self.node_key = identity, tls, node_key
        self.gate, self.challenges = Gate(identity.public_key), Challenges()

    def authorize(self, name: str, request, key: bytes | None) -> None:
        if key is None:
            raise UnauthenticatedError("unsigned")
        if key != self.node_key:
            raise PermissionDeniedError("not the node's key")

    @maps_errors
    def Challenge(self, request, context):
        binding = bind_cert(self.identity, self.tls.cert_der) if self.tls else b""
        return pb.ChallengeResponse(
            nonce=self.challenges.issue(), coordinator_key=self.identity.public_key, tls_binding=binding
        )

    @maps_errors
    @signed
    def Heartbeat(self, request, context, signer):
        return pb.HeartbeatResponse(drop_sessions=[signer.hex()])


@pytest.fixture
def served():
    started = []

    def serve(servicer: FakeCoordinator) -> str:
        server = make_server(4)
        add_servicer(server, servicer, "Coordinator")
        port = bind(server, "127.0.0.1", 0, servicer.tls)
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}"

    yield serve
    for s in started:
        s.stop(0)


def test_tls_channels_are_pinned_and_calls_signed(served, tmp_path):
    me, node, tls = NodeIdentity.generate(), NodeIdentity.generate(), TlsIdentity.generate()
    address = served(FakeCoordinator(me, tls, node.public_key))
    assert fetch_cert(address, "it", 5) == tls.cert_der
    link = CoordinatorLink(address, node, False, None, tmp_path, 2**20, 5)
    assert link.challenge().coordinator_key == me.public_key and link.key == me.public_key
    assert link.stub.Heartbeat(HB, timeout=5).drop_sessions == [node.public_key.hex()]
    stranger = CoordinatorLink(address, NodeIdentity.generate(), False, tls.fingerprint, None, 2**20, 5)
    stranger.challenge()
    with pytest.raises(grpc.RpcError) as e:
        stranger.stub.Heartbeat(HB, timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for channel, code in (
        (make_channel(address, pin=tls.cert_der), grpc.StatusCode.UNAUTHENTICATED),  # TLS, unsigned
        (
            make_channel(address, pin=TlsIdentity.generate().cert_der),
            grpc.StatusCode.UNAVAILABLE,
        ),  # other cert
        (make_channel(address), grpc.StatusCode.UNAVAILABLE),  # plain text to a TLS server
    ):
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.CoordinatorStub(channel).Heartbeat(HB, timeout=5)
        assert e.value.code() == code
        channel.close()
    link.close()
    stranger.close()


def test_a_coordinator_is_refused_when_its_certificate_or_key_changes(served, tmp_path):
    me, node = NodeIdentity.generate(), NodeIdentity.generate()
    first = served(FakeCoordinator(me, TlsIdentity.generate(), node.public_key))
    CoordinatorLink(first, node, False, None, tmp_path, 2**20, 5).close()  # pinned on first use
    (tmp_path / KNOWN_FILE).write_text((tmp_path / KNOWN_FILE).read_text().replace(first, "127.0.0.1:1"))
    second = served(FakeCoordinator(me, TlsIdentity.generate(), node.public_key))
    with open(tmp_path / KNOWN_FILE, "a") as f:  # as if `second` had had the first certificate
        f.write(f"{second} {(tmp_path / KNOWN_FILE).read_text().split()[1]}\n")
    with pytest.raises(TrustError, match="presents TLS certificate sha256 .* not the one pinned"):
        CoordinatorLink(second, node, False, None, tmp_path, 2**20, 5)
    # the key it answers with must vouch for its certificate, and stay the same
    tls = TlsIdentity.generate()
    liar = FakeCoordinator(me, tls, node.public_key)
    address = served(liar)
    liar.tls = TlsIdentity.generate()  # its challenge binds another certificate than the one it serves
    link = CoordinatorLink(address, node, False, tls.fingerprint, None, 2**20, 5)
    with pytest.raises(TrustError, match="does not vouch for the TLS certificate"):
        link.challenge()
    link.close()
    honest = FakeCoordinator(me, tls, node.public_key)
    link = CoordinatorLink(served(honest), node, False, tls.fingerprint, None, 2**20, 5)
    link.challenge()
    honest.identity = NodeIdentity.generate()  # same certificate, bound by another key
    with pytest.raises(TrustError, match="now has public key"):
        link.challenge()
    link.close()


class FakeNode:
    """What WorkerServicer reads of its node, without a model: every call that passes the gate
    ends in FAILED_PRECONDITION (no layers yet); one refused at the gate in its own code."""

    def __init__(self, identity: NodeIdentity, tls: TlsIdentity | None, coordinator_key: bytes):
        self.node_id, self.identity, self.tls = "w0", identity, tls
        self.coordinator_key, self.runner = coordinator_key, None
        self.gate = Gate(identity.public_key)


@pytest.fixture
def worker_served():
    started = []

    def serve(node: FakeNode) -> tuple[str, grpc.Server]:
        from consortium.worker.server import WorkerServicer

        server = make_server(4)
        add_servicer(server, WorkerServicer(node), "Worker")
        port = bind(server, "127.0.0.1", 0, node.tls)
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}", server

    yield serve
    for s in started:
        s.stop(0)


def _remote_stage(address: str, node: FakeNode, coordinator: NodeIdentity, insecure: bool = False):
    from consortium.coordinator.batching import BatchPolicy
    from consortium.coordinator.registry import Node
    from consortium.coordinator.stages import Dialer, RemoteStage

    info = Node(
        "w0", address, "cpu", "cpu", "fp32", True, 1, 1.0, None, "d",
        public_key=node.identity.public_key, tls_cert=b"" if insecure else node.tls.cert_der,
    )  # fmt: skip
    return RemoteStage(info, Dialer(coordinator, insecure), BatchPolicy(1))


def _no_layers(stage) -> None:
    """A call that passes the worker's gate: it finds no layers (FAILED_PRECONDITION)."""
    with pytest.raises(RemoteError) as e:
        stage.close("s" * 16, 5)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION, e.value


def test_the_coordinator_calls_a_worker_under_a_channel_key_and_opens_another_after_a_restart(worker_served):
    coordinator, me = NodeIdentity.generate(), NodeIdentity.generate()
    node = FakeNode(me, TlsIdentity.generate(), coordinator.public_key)
    address, _ = worker_served(node)
    stage = _remote_stage(address, node, coordinator)
    _no_layers(stage)
    first = stage.signer.channel_key
    assert first is not None and len(node.gate._channels) == 1
    seen = []
    verify = node.gate.verify
    node.gate.verify = lambda m, r, md: (
        seen.append({k for k, _ in md} & {AUTH_HEADER, MAC_HEADER}) or verify(m, r, md)
    )
    _no_layers(stage)
    assert seen == [{MAC_HEADER}]  # the hot path carries a MAC, not a signature
    node.gate._channels.clear()  # a restart: the worker knows no key
    _no_layers(stage)  # refused once, a new key, the call again
    assert stage.signer.channel_key not in (None, first) and len(node.gate._channels) == 1
    # a stranger gets no key, and a MAC under a key nobody opened is refused
    stranger = _remote_stage(address, node, NodeIdentity.generate())
    with pytest.raises(RemoteError) as e:
        stranger.close("s" * 16, 5)
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and stranger.signer.channel_key is None
    forger = CallSigner(coordinator, me.public_key)
    forger.channel_key = ChannelKey(os.urandom(16), os.urandom(32))
    channel = make_channel(address, pin=node.tls.cert_der, interceptors=(forger,))
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.WorkerStub(channel).CloseSession(pb.CloseSessionRequest(session_id="s" * 16), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown channel key" in e.value.details()
    channel.close()
    for s in (stage, stranger):
        s.shutdown()


def test_over_plain_text_a_worker_gives_no_channel_key_and_calls_stay_signed(worker_served):
    coordinator, me = NodeIdentity.generate(), NodeIdentity.generate()
    node = FakeNode(me, None, coordinator.public_key)
    address, _ = worker_served(node)
    keyed = _remote_stage(address, node, coordinator, insecure=True)
    keyed.keyed = True  # a coordinator that asks anyway
    _no_layers(keyed)
    assert keyed.signer.channel_key is None and not keyed.keyed and not node.gate._channels
    plain = _remote_stage(address, node, coordinator, insecure=True)
    assert not plain.keyed
    _no_layers(plain)
    assert plain.signer.channel_key is None
    for s in (keyed, plain):
        s.shutdown()


def test_plain_text_and_unreachable_coordinators(served, tmp_path):
    me, node = NodeIdentity.generate(), NodeIdentity.generate()
    plain = served(FakeCoordinator(me, None, node.public_key))
    with pytest.raises(TrustError, match="does not speak TLS.*--insecure"):
        CoordinatorLink(plain, node, False, None, tmp_path, 2**20, 5)
    link = CoordinatorLink(plain, node, True, None, tmp_path, 2**20, 5)  # --insecure: still signed
    link.challenge()
    assert link.stub.Heartbeat(HB, timeout=5).drop_sessions == [node.public_key.hex()]
    link.close()
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=f"cannot reach coordinator at {dead} \\(connection refused\\)"):
        CoordinatorLink(dead, node, False, None, tmp_path, 2**20, 0.5)
    assert time.monotonic() - t0 < 5


def test_public_status_shows_no_ids_addresses_or_keys():
    node = pb.NodeInfo(
        node_id="w0", address="10.0.0.1:5", public_key=b"k" * 32, tls_cert=b"c", layers=pb.LayerRange(end=2)
    )
    st = pb.ClusterStatus(
        model_digest="d",
        n_layers=4,
        nodes=[pb.NodeStatus(node=node, alive=True, role="serving")],
        route=[pb.StageInfo(index=0, node_id="w0", address="10.0.0.1:5", layers=pb.LayerRange(end=2))],
        placement_error="overlap (w0 0-2 and w1 1-3)",
        active_sessions=1,
        spill_held_bytes=7 << 30,
        spill_limit_bytes=9 << 30,
    )
    out = public_status(st)
    text = str(out)
    assert "w0" not in text and "10.0.0.1" not in text and "kkkk" not in text
    assert out.nodes[0].alive and out.nodes[0].node.layers.end == 2 and out.route[0].layers.end == 2
    assert out.placement_error == "no complete pipeline" and out.active_sessions == 1
    assert (
        out.spill_held_bytes == out.spill_limit_bytes == 0
    )  # the coordinator's disk is not a stranger's business
