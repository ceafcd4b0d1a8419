"""Limits that fail fast (issue 10): unparseable messages, integer ranges, prompt sizes."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest

from consortium.transport.handlers import add_servicer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc


class _Echo(pb_grpc.WorkerServicer):
    def Execute(self, request, context):
        return pb.WorkResult(session_id=request.session_id, step=request.step)


@pytest.fixture
def echo_channel():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    add_servicer(server, _Echo(), "Worker")
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    server.stop(None)


def test_an_unparseable_message_is_invalid_argument_in_one_log_line(echo_channel, caplog):
    raw = echo_channel.unary_unary("/consortium.v1.Worker/Execute")  # bytes in, bytes out
    ok = pb.WorkResult.FromString(raw(pb.WorkOrder(session_id="s", step=3).SerializeToString(), timeout=10))
    assert (ok.session_id, ok.step) == ("s", 3)
    with caplog.at_level(logging.WARNING, logger="consortium.transport.handlers"):
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as e:
                raw(b"\xff\xff\xff\xff garbage", timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unparseable Execute request" in e.value.details()
    lines = [r for r in caplog.records if "unparseable" in r.getMessage()]
    assert len(lines) == 1 and "Traceback" not in caplog.text  # rate-limited, no traceback
    # an unimplemented method stays UNIMPLEMENTED (the servicer's own answer)
    with pytest.raises(grpc.RpcError) as e:
        echo_channel.unary_unary("/consortium.v1.Worker/Rollback")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_step_beyond_what_a_receipt_can_sign_is_refused_before_any_work(tiny_gguf):
    import torch

    from consortium.core.config import EngineConfig, LayerRange
    from consortium.errors import InvalidRequestError
    from consortium.identity import NodeIdentity
    from consortium.model.gguf_file import GGUFModel
    from consortium.transport.tensors import WireTensor
    from consortium.worker.runner import StageRunner

    g = GGUFModel(tiny_gguf)
    r = StageRunner(g, LayerRange(1, 2), EngineConfig(), 2**20, 60.0, NodeIdentity.generate(), "w")
    lr = pb.LayerRange(start=1, end=2)
    r.open(pb.OpenSessionRequest(session_id="s", capacity=8, layers=lr))
    h = WireTensor.from_torch(torch.zeros(2, g.args.dim)).to_proto()
    with pytest.raises(InvalidRequestError, match="step 9223372036854775808 outside"):
        r.execute(pb.WorkOrder(session_id="s", step=2**63, layers=lr, start_position=0, input=h))
    ok = r.execute(pb.WorkOrder(session_id="s", step=2**63 - 1, layers=lr, start_position=0, input=h))
    assert ok.start_position == 0  # the refused order changed nothing: the cache was still at 0


def test_client_limits_count_running_sessions_and_the_start_rate():
    from consortium.coordinator.limits import ClientLimits, TooManySessionsError, peer_host

    now = [0.0]
    limits = ClientLimits(max_running=2, per_minute=4.0, clock=lambda: now[0])
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(TooManySessionsError, match="2 sessions running"):
        limits.admit("a")
    limits.admit("b")  # another client is not affected
    limits.release("a")
    limits.release("a")
    with pytest.raises(TooManySessionsError, match="too fast"):  # the bucket (2) is empty
        limits.admit("a")
    now[0] += 15.0  # 4 a minute: one more every 15 s
    limits.admit("a")
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1" and peer_host("ipv6:[::1]:5000") == "::1"
