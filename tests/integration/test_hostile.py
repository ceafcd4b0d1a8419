"""Hostile clients against real processes (issue 10, items 1 and 2): no node message without
its key, orders only from the pinned coordinator, TLS by default, clients by their keys.

Each attack is written as an attacker would write it, with a hand-made gRPC client on
127.0.0.1: it knows what GetStatus shows (ids, addresses, public keys, certificates), holds
keys of its own, and can fetch any server's certificate."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from helpers.cli import assert_one_line_error, consortium
from helpers.cluster import coordinator_link, node_info, signed_register, start_cluster, worker_stub

from consortium.coordinator.client import Client
from consortium.core.config import ClientConfig, LayerRange, SessionRequest
from consortium.errors import ConsortiumError
from consortium.identity import NodeIdentity
from consortium.identity.tls import KNOWN_FILE, PinStore, TlsIdentity, TrustError, check_binding
from consortium.model.generate import generate, load_single_node
from consortium.transport.auth import AUTH_HEADER, MAC_HEADER, CallSigner, ChannelKey, signed_registration
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import fetch_cert, free_port, make_channel
from consortium.transport.tensors import WireTensor

C = grpc.StatusCode
REQ = SessionRequest("the cat sat on the", max_tokens=6)


@pytest.fixture(scope="module")
def cluster(request, tiny_gguf, tmp_path_factory):
    """TLS (the default): workers 0-1 and 1-2, a standby, the coordinator 2-4."""
    return start_cluster(
        request,
        tiny_gguf,
        tmp_path_factory.mktemp("hostile"),
        LayerRange(2, 4),
        [LayerRange(0, 1), LayerRange(1, 2), None],
        worker_args=[[], [], ["--standby"]],
    )


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def _single_node(model, req: SessionRequest) -> list[int]:
    _, stage, tok = load_single_node(str(model))
    return generate(
        stage, tok, tok.encode_prompt(req.prompt, chat=req.chat), req.max_tokens, req.sampling
    ).tokens


def test_tls_is_on_by_default(cluster):
    for address in (cluster.address, node_info(cluster, "worker-0").address):
        plain = make_channel(address)
        code, _ = _code(
            lambda ch=plain: pb_grpc.CoordinatorStub(ch).GetStatus(pb.ClusterStatusRequest(), timeout=10)
        )
        assert code == C.UNAVAILABLE  # a plain-text client gets nothing from a TLS server
        plain.close()
    served = fetch_cert(cluster.address, "coordinator", 10)
    assert served == TlsIdentity.load(cluster.coordinator_dir / "tls.pem").cert_der
    link = coordinator_link(cluster)  # checks the coordinator's key vouches for that certificate
    link.close()
    for name in ("worker-0", "worker-1", "worker-2"):
        info = node_info(cluster, name)  # what each registered is what it serves, bound to its key
        assert fetch_cert(info.address, name, 10) == info.tls_cert
        assert check_binding(info.public_key, info.tls_cert, info.tls_binding)


def test_a_stranger_cannot_register_as_an_honest_node(cluster, tiny_gguf):
    """'Banning an honest node': a stranger registers under worker-1's id and public key (both
    in GetStatus) with its own address, so that stage 1 is routed to it and its bad receipts are
    charged to worker-1. Without worker-1's private key, no registration gets through."""
    honest = node_info(cluster, "worker-1")
    stranger = NodeIdentity.generate()
    link = coordinator_link(cluster, stranger)
    forged = pb.NodeInfo()
    forged.CopyFrom(honest)
    forged.address = f"127.0.0.1:{free_port()}"
    code, msg = _code(lambda: link.stub.Register(pb.RegisterRequest(node=forged), timeout=10))
    assert code == C.UNAUTHENTICATED, msg  # no challenge answered
    signed_by_stranger = signed_registration(stranger, link.challenge(), forged)
    code, msg = _code(lambda: link.stub.Register(signed_by_stranger, timeout=10))
    assert code == C.UNAUTHENTICATED and "not signed by the key it names" in msg
    # a challenge answers one registration: a captured one cannot be replayed
    own = signed_register(
        link,
        stranger,
        node_id="stranger",
        address=forged.address,
        dtype="fp32",
        model_digest="0" * 64,
        public_key=stranger.public_key,
    )
    code, msg = _code(lambda: link.stub.Register(own, timeout=10))
    assert code == C.FAILED_PRECONDITION and "model digest mismatch" in msg  # proof accepted, node refused
    code, msg = _code(lambda: link.stub.Register(own, timeout=10))
    assert code == C.UNAUTHENTICATED and "unknown or expired registration challenge" in msg
    link.close()
    # worker-1 was never charged: same address, still serving, and a session runs through it
    assert node_info(cluster, "worker-1").address == honest.address
    with Client(cluster.client_config()) as client:
        report = client.run(REQ)
        roles = {n["node_id"]: n["role"] for n in client.cluster_status()["nodes"]}
    assert [s.node_id for s in report.stages] == ["worker-0", "worker-1", "coordinator"]
    assert report.banned_nodes == [] and report.audits.failed == 0 and roles["worker-1"] == "serving"
    assert report.tokens == _single_node(tiny_gguf, REQ)


def test_a_stranger_cannot_order_a_worker(cluster, tiny_gguf):
    """'Hijacking a standby' and every other order: only the coordinator a worker registered
    with may give it orders, and an order signed for one worker is no good at another."""
    digest = node_info(cluster, "worker-0").model_digest
    h = WireTensor.from_torch(torch.ones(1, 256)).to_proto()
    orders = {
        "AssignLayers": pb.AssignLayersRequest(layers=pb.LayerRange(start=0, end=4), model_digest=digest),
        "OpenSession": pb.OpenSessionRequest(
            session_id="x", capacity=4, layers=pb.LayerRange(start=1, end=2)
        ),
        "Execute": pb.WorkOrder(session_id="x", layers=pb.LayerRange(start=1, end=2), input=h),
        "ExecuteBatch": pb.WorkBatch(
            orders=[pb.WorkOrder(session_id="x", layers=pb.LayerRange(start=1, end=2), input=h)]
        ),
        "Rollback": pb.RollbackRequest(session_id="x", position=0),
        "CloseSession": pb.CloseSessionRequest(session_id="x"),
        "GetStatus": pb.WorkerStatusRequest(),
    }
    for name in ("worker-1", "worker-2"):  # a serving worker and the standby
        channel, stub = worker_stub(cluster, name, identity=NodeIdentity.generate())
        for method, req in orders.items():
            code, msg = _code(lambda m=method, r=req, s=stub: getattr(s, m)(r, timeout=10))
            assert code == C.PERMISSION_DENIED and "not signed by the coordinator" in msg, (name, method)
        channel.close()
    info = node_info(cluster, "worker-1")
    unsigned = pb_grpc.WorkerStub(make_channel(info.address, pin=info.tls_cert))
    assert _code(lambda: unsigned.Execute(orders["Execute"], timeout=10))[0] == C.UNAUTHENTICATED
    assert _code(lambda: unsigned.ExecuteBatch(orders["ExecuteBatch"], timeout=10))[0] == C.UNAUTHENTICATED
    # an order the coordinator signed for worker-0, relayed by worker-0 to worker-1
    coordinator = NodeIdentity.load(cluster.coordinator_dir / "node.key")
    for_w0 = CallSigner(coordinator, node_info(cluster, "worker-0").public_key)
    header = for_w0.header("/consortium.v1.Worker/GetStatus", orders["GetStatus"])
    code, msg = _code(
        lambda: unsigned.GetStatus(orders["GetStatus"], metadata=[(AUTH_HEADER, header)], timeout=10)
    )
    assert code == C.UNAUTHENTICATED and "another recipient" in msg
    standby = node_info(cluster, "worker-2")  # still holds nothing: ready for a failover
    assert standby.standby and not standby.HasField("layers")
    with Client(cluster.client_config()) as client:
        assert {n["node_id"]: n["role"] for n in client.cluster_status()["nodes"]}["worker-2"] == "standby"
        assert client.run(REQ).tokens == _single_node(tiny_gguf, REQ)


def test_replayed_and_stale_signatures_are_refused(cluster):
    info = node_info(cluster, "worker-1")
    channel = make_channel(info.address, pin=info.tls_cert)  # signatures by hand
    worker = pb_grpc.WorkerStub(channel)
    as_coordinator = CallSigner(NodeIdentity.load(cluster.coordinator_dir / "node.key"), info.public_key)
    req, method = pb.WorkerStatusRequest(), "/consortium.v1.Worker/GetStatus"
    header = as_coordinator.header(method, req)
    assert worker.GetStatus(req, metadata=[(AUTH_HEADER, header)], timeout=10).node.node_id == "worker-1"
    code, msg = _code(lambda: worker.GetStatus(req, metadata=[(AUTH_HEADER, header)], timeout=10))
    assert code == C.UNAUTHENTICATED and "replayed" in msg
    stale = as_coordinator.header(method, req, time_ms=int((time.time() - 120) * 1000))
    code, msg = _code(lambda: worker.GetStatus(req, metadata=[(AUTH_HEADER, stale)], timeout=10))
    assert code == C.UNAUTHENTICATED and "stale call signature" in msg
    channel.close()
    # heartbeats: only by the node's own key, once each ('Blocking every session' kept a stranger
    # registered through key-less heartbeats)
    link = coordinator_link(cluster)
    hb, hb_method = pb.HeartbeatRequest(node_id="worker-0"), "/consortium.v1.Coordinator/Heartbeat"
    code, msg = _code(lambda: link.stub.Heartbeat(hb, timeout=10))  # signed by a stranger
    assert code == C.PERMISSION_DENIED and "not signed by its key" in msg
    worker0 = NodeIdentity.load(cluster.log_dir / "worker-0.identity" / "node.key")
    header = CallSigner(worker0, link.key).header(hb_method, hb)
    plain = pb_grpc.CoordinatorStub(make_channel(cluster.address, pin=fetch_cert(cluster.address, "c", 10)))
    plain.Heartbeat(hb, metadata=[(AUTH_HEADER, header)], timeout=10)
    code, msg = _code(lambda: plain.Heartbeat(hb, metadata=[(AUTH_HEADER, header)], timeout=10))
    assert code == C.UNAUTHENTICATED and "replayed" in msg
    assert _code(lambda: plain.Heartbeat(hb, timeout=10))[0] == C.UNAUTHENTICATED
    link.close()


def test_channel_keys_go_to_the_coordinator_only_and_their_macs_count_once(cluster):
    """The hot path's call MACs: only the pinned coordinator gets a key (a signed OpenChannel),
    a key works at the worker that gave it only, a MAC is good for its call once, and one under
    a key nobody was given is refused (the real coordinator's own keys keep working throughout)."""
    w1, w0 = node_info(cluster, "worker-1"), node_info(cluster, "worker-0")
    for identity, want in ((NodeIdentity.generate(), C.PERMISSION_DENIED), (None, None)):
        channel, stub = worker_stub(cluster, "worker-1", identity=identity)
        if want is not None:  # a stranger, signing with its own key
            assert _code(lambda s=stub: s.OpenChannel(pb.OpenChannelRequest(), timeout=10))[0] == want
        else:  # the coordinator's key (read from its data directory, as an attacker cannot)
            key = stub.OpenChannel(pb.OpenChannelRequest(), timeout=10)
        channel.close()
    unsigned = pb_grpc.WorkerStub(make_channel(w1.address, pin=w1.tls_cert))
    assert _code(lambda: unsigned.OpenChannel(pb.OpenChannelRequest(), timeout=10))[0] == C.UNAUTHENTICATED
    coordinator = NodeIdentity.load(cluster.coordinator_dir / "node.key")
    req, method = pb.WorkerStatusRequest(), "/consortium.v1.Worker/GetStatus"
    signer = CallSigner(coordinator, w1.public_key)
    mac = signer.mac_header(ChannelKey(key.key_id, key.secret), method, req)
    assert unsigned.GetStatus(req, metadata=[(MAC_HEADER, mac)], timeout=10).node.node_id == "worker-1"
    code, msg = _code(lambda: unsigned.GetStatus(req, metadata=[(MAC_HEADER, mac)], timeout=10))
    assert code == C.UNAUTHENTICATED and "replayed" in msg
    other = signer.mac_header(ChannelKey(key.key_id, key.secret), "/consortium.v1.Worker/Rollback", req)
    code, msg = _code(lambda: unsigned.GetStatus(req, metadata=[(MAC_HEADER, other)], timeout=10))
    assert code == C.UNAUTHENTICATED and "bad call MAC" in msg  # made for another method
    at_w0 = pb_grpc.WorkerStub(make_channel(w0.address, pin=w0.tls_cert))
    for_w0 = CallSigner(coordinator, w0.public_key).mac_header(
        ChannelKey(key.key_id, key.secret), method, req
    )
    code, msg = _code(lambda: at_w0.GetStatus(req, metadata=[(MAC_HEADER, for_w0)], timeout=10))
    assert code == C.UNAUTHENTICATED and "unknown channel key" in msg  # worker-1's key at worker-0
    made_up = signer.mac_header(ChannelKey(bytes(16), bytes(32)), method, req)
    code, msg = _code(lambda: unsigned.GetStatus(req, metadata=[(MAC_HEADER, made_up)], timeout=10))
    assert code == C.UNAUTHENTICATED and "unknown channel key" in msg
    with Client(cluster.client_config()) as client:
        assert len(client.run(REQ).tokens) > 0


def test_a_coordinator_whose_certificate_changed_is_refused(cluster, tiny_gguf, tmp_path):
    # a worker that pinned another certificate for this address (trust on first use) refuses it
    data = tmp_path / "worker"
    PinStore(data).add(cluster.address, "0" * 64)
    done = consortium(
        "worker",
        "start",
        "--coordinator",
        cluster.address,
        "--model",
        str(tiny_gguf),
        "--layers",
        "0-1",
        "--data-dir",
        str(data),
        "--log-file",
        str(tmp_path / "w.log"),
        "--register-timeout",
        "10",
        timeout=180,
    )
    line = assert_one_line_error(done, f"the coordinator at {cluster.address} presents TLS certificate")
    assert "not the one pinned (0000000000000000…" in line and str(data / KNOWN_FILE) in line
    # so does a client given another pin; one with none trusts it on first use and pins it
    with pytest.raises(TrustError, match="not the one pinned"):
        Client(ClientConfig(cluster.address, coordinator_cert="ab" * 32)).cluster_status()
    with Client(ClientConfig(cluster.address, data_dir=tmp_path / "client")) as client:
        assert len(client.cluster_status()["nodes"]) == 4
    fingerprint = TlsIdentity.load(cluster.coordinator_dir / "tls.pem").fingerprint
    assert PinStore(tmp_path / "client").get(cluster.address) == fingerprint


def test_insecure_cluster_warns_and_client_keys_are_enforced(request, tiny_gguf, tmp_path):
    logs = tmp_path / "insecure"
    listed = NodeIdentity.load_or_create(logs / "client")  # the key LocalCluster.client_config signs with
    keys = tmp_path / "client-keys.txt"
    keys.write_text(f"# the one client\n{listed.public_key.hex()}\n")
    cluster = start_cluster(
        request,
        tiny_gguf,
        logs,
        LayerRange(1, 4),
        [LayerRange(0, 1)],
        coordinator_args=["--client-keys", str(keys)],
        insecure=True,
    )
    for name in ("coordinator", "worker-0"):
        assert "WARNING: --insecure: plain-text gRPC" in (logs / f"{name}.log").read_text()
    with Client(cluster.client_config()) as client:
        report = client.run(REQ)
        assert report.tokens == _single_node(tiny_gguf, REQ)
        assert client.cluster_status()["nodes"][1]["node_id"] == "worker-0"
    stranger = Client(ClientConfig(cluster.address, insecure=True, data_dir=tmp_path / "stranger"))
    request.addfinalizer(stranger.close)
    with pytest.raises(ConsortiumError, match=r"not in this coordinator's client keys \[PERMISSION_DENIED\]"):
        stranger.run(REQ)
    with pytest.raises(ConsortiumError, match="PERMISSION_DENIED"):
        stranger.session_status(report.session_id)
    st = stranger.cluster_status()  # counts and coverage only
    assert [(n["node_id"], n["address"], n["alive"]) for n in st["nodes"]] == [("", "", True)] * 2
    assert [(r["node_id"], r["layers"]) for r in st["route"]] == [("", [0, 1]), ("", [1, 4])]
    plain = pb_grpc.CoordinatorStub(make_channel(cluster.address))
    code, msg = _code(lambda: list(plain.Generate(pb.GenerateRequest(prompt="x", max_tokens=1), timeout=10)))
    assert code == C.UNAUTHENTICATED and "--client-keys" in msg
    with pytest.raises(TrustError, match="does not speak TLS"):
        Client(ClientConfig(cluster.address, data_dir=tmp_path / "tls-client")).cluster_status()
    # without TLS, orders are still signed: a stranger's Execute is refused
    channel, worker = worker_stub(cluster, "worker-0", identity=NodeIdentity.generate())
    order = pb.WorkOrder(
        session_id="x", layers=pb.LayerRange(start=0, end=1), input=WireTensor.from_tokens([1]).to_proto()
    )
    assert _code(lambda: worker.Execute(order, timeout=10))[0] == C.PERMISSION_DENIED
    channel.close()
    # and no channel key goes over plain text, not even to the coordinator: its calls stay signed
    channel, worker = worker_stub(cluster, "worker-0")
    code, msg = _code(lambda: worker.OpenChannel(pb.OpenChannelRequest(), timeout=10))
    assert code == C.FAILED_PRECONDITION and "plain text" in msg
    channel.close()
    done = consortium(
        "session",
        "run",
        "--insecure",
        "--coordinator",
        cluster.address,
        "--data-dir",
        str(logs / "client"),
        "--prompt",
        REQ.prompt,
        "--max-tokens",
        "6",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING: --insecure" in done.stderr and '"tokens": ' in done.stdout
