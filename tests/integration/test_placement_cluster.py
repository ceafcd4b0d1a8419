"""Placement with real processes: a gap or an overlap is a clear error at session start,
and workers started without --layers get ranges by capacity and compute the same tokens."""

from __future__ import annotations

import signal

import grpc
import pytest
from helpers.cluster import STARTUP_S, add_worker, start_cluster, wait_for, worker_stub

from consortium.coordinator.client import Client
from consortium.core.config import ClientConfig, LayerRange, SessionRequest
from consortium.errors import ConsortiumError
from consortium.model.generate import generate, load_single_node
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor


def _alive(client: Client) -> dict[str, bool]:
    return {n["node_id"]: n["alive"] for n in client.cluster_status()["nodes"]}


def test_gap_then_overlap_is_an_error_listing_the_ranges(request, tiny_gguf, tmp_path):
    cluster = start_cluster(
        request,
        tiny_gguf,
        tmp_path,
        LayerRange(3, 4),
        [LayerRange(0, 2)],
        complete=False,
        coordinator_args=["--node-timeout", "2", "--heartbeat-interval", "0.5"],
        worker_args=[["--session-idle-timeout", "1"]],
    )
    client = Client(ClientConfig(cluster.address))
    request.addfinalizer(client.close)
    assert "gap 2-3" in client.cluster_status()["placement_error"]
    with pytest.raises(ConsortiumError) as e:
        client.run(SessionRequest("x", max_tokens=2))
    msg = str(e.value)
    assert "layer ranges do not tile [0, 4): gap 2-3 (no node holds these layers)" in msg
    assert "ranges: worker-0 0-2, coordinator 3-4" in msg and "[FAILED_PRECONDITION]" in msg

    extra = add_worker(cluster, "extra", tiny_gguf, tmp_path / "extra.log", "--layers", "1-3")
    wait_for(lambda: sum(_alive(client).values()) >= 3, STARTUP_S, lambda: f"3 nodes alive: {_alive(client)}")
    addresses = {n["node_id"]: n["address"] for n in client.cluster_status()["nodes"]}
    assert (
        addresses["extra"] == f"127.0.0.1:{extra.wait_port(30)}"
    )  # the port it bound is the one it reported
    assert cluster.address == addresses["coordinator"]
    with pytest.raises(ConsortiumError, match=r"overlap 1-2 \(worker-0 0-2 and extra 1-3\)"):
        client.run(SessionRequest("x", max_tokens=2))

    # a node that stops heartbeating is dead within --node-timeout, and the error says so
    extra.signal_group(signal.SIGKILL)
    wait_for(lambda: not _alive(client)["extra"], 30, "the killed node to count as dead")
    assert _alive(client) == {"coordinator": True, "worker-0": True, "extra": False}
    with pytest.raises(ConsortiumError, match=r"gap 2-3 .*; not alive: extra 1-3"):
        client.run(SessionRequest("x", max_tokens=2))

    # a KV cache of a session the coordinator does not run (opened here behind its back) is freed:
    # by the heartbeat reply (drop_sessions), or at the latest after --session-idle-timeout (1 s)
    channel, stub = worker_stub(cluster, "worker-0")  # signing as the coordinator
    request.addfinalizer(channel.close)
    stub.OpenSession(
        pb.OpenSessionRequest(session_id="idle", capacity=4, layers=pb.LayerRange(start=0, end=2))
    )
    assert stub.GetStatus(pb.WorkerStatusRequest()).active_sessions == 1
    wait_for(
        lambda: stub.GetStatus(pb.WorkerStatusRequest()).active_sessions == 0, 2.5, "the idle cache to go"
    )
    order = pb.WorkOrder(
        session_id="idle", layers=pb.LayerRange(start=0, end=2), input=WireTensor.from_tokens([1]).to_proto()
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.Execute(order)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    log_text = (tmp_path / "worker-0.log").read_text()
    assert "session idle expired" in log_text or "dropped the KV cache of session idle" in log_text


def test_workers_without_layers_get_ranges_by_capacity(request, tiny_gguf, tmp_path):
    # worker-1 offers 1 MiB: one layer of the tiny model in the default engine (packed fp32: 0.81 MB
    # by placement's estimate) fits, two do not
    cluster = start_cluster(
        request,
        tiny_gguf,
        tmp_path,
        LayerRange(3, 4),
        [None, None],
        worker_args=[[], ["--max-memory-mb", "1"]],
    )
    client = Client(ClientConfig(cluster.address))
    request.addfinalizer(client.close)
    st = client.cluster_status()
    assert st["flexible_pending"] and not st["route"]
    req = SessionRequest("the cat sat", max_tokens=12)
    report = client.run(req)
    # sizes follow memory here; which worker goes first follows measured speed (noisy)
    sizes = {s.node_id: s.layers[1] - s.layers[0] for s in report.stages}
    assert sizes == {"worker-0": 2, "worker-1": 1, "coordinator": 1}
    route = client.cluster_status()["route"]
    assert [r["layers"] for r in route] in ([[0, 2], [2, 3], [3, 4]], [[0, 1], [1, 3], [3, 4]])
    assert [r["node_id"] for r in route] == [s.node_id for s in report.stages]
    _, stage, tok = load_single_node(str(tiny_gguf))
    assert (
        report.tokens
        == generate(stage, tok, tok.encode_prompt(req.prompt, chat=True), 12, req.sampling).tokens
    )
