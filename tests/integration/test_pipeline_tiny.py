"""A real 3-process pipeline on the tiny model: equality with single-node generation,
concurrent sessions, status, and every kind of bad input a worker or coordinator can get."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from click.testing import CliRunner
from helpers.cli import REPORT_KEYS
from helpers.cluster import coordinator_link, signed_register, worker_stub

from consortium.cli.main import cli
from consortium.core.config import SessionRequest
from consortium.errors import ConsortiumError
from consortium.identity import NodeIdentity
from consortium.model.generate import generate, load_single_node
from consortium.model.gguf_file import GGUFModel
from consortium.model.sampling import SamplingParams
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import free_port
from consortium.transport.tensors import WireTensor

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=2.0, top_k=100, top_p=0.95, seed=11)


@pytest.fixture(scope="module")
def single_node(tiny_gguf):
    gguf, stage, tok = load_single_node(str(tiny_gguf))

    def run(req: SessionRequest) -> list[int]:
        ids = tok.encode_prompt(req.prompt, chat=req.chat)
        return generate(stage, tok, ids, req.max_tokens, req.sampling).tokens

    return run


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_pipeline_equals_single_node(tiny_cluster, client_for, single_node, sampling):
    req = SessionRequest("the cat sat on the", max_tokens=24, sampling=sampling)
    deltas: list[str] = []
    report = client_for(tiny_cluster).run(req, on_text=deltas.append)
    assert report.tokens == single_node(req)
    assert "".join(deltas) == report.text
    assert [s.layers for s in report.stages] == [[0, 1], [1, 2], [2, 4]]
    assert [s.node_id for s in report.stages] == ["worker-0", "worker-1", "coordinator"]
    assert report.stages[2].local and not report.stages[0].local


def test_no_chat_prompt_equals_single_node(tiny_cluster, client_for, single_node):
    req = SessionRequest("hello world", max_tokens=8, chat=False)
    assert client_for(tiny_cluster).run(req).tokens == single_node(req)


def test_four_concurrent_sessions_equal_alone(tiny_cluster, client_for):
    reqs = [
        SessionRequest(p, max_tokens=20, sampling=s)
        for p, s in [
            ("one two", GREEDY),
            ("three four", SAMPLED),
            ("five", SamplingParams(1.0, seed=3)),
            ("the six and seven", SamplingParams(0.7, top_p=0.8, seed=4)),
        ]
    ]
    client = client_for(tiny_cluster)
    alone = [client.run(r).tokens for r in reqs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: client_for(tiny_cluster).run(r), reqs))
    assert [r.tokens for r in together] == alone
    assert len({r.session_id for r in together}) == 4


def test_session_status_and_stats(tiny_cluster, client_for, tiny_gguf):
    client = client_for(tiny_cluster)
    report = client.run(SessionRequest("status please", max_tokens=6))
    st = client.session_status(report.session_id)
    assert st["state"] == "finished" and st["generated_tokens"] == len(report.tokens)
    assert st["position"] == report.prompt_tokens + len(report.tokens) - 1 or report.tokens == []
    s0, s1, s2 = st["stages"]
    steps = s0["steps"]
    assert steps == len(report.tokens) and s2["mean_step_ms"] > 0
    args = GGUFModel(tiny_gguf).args
    dim = args.dim
    # activations between stages: fp32 [positions, dim] each way, no other bytes
    assert s1["bytes_sent"] == st["position"] * dim * 4 == s0["bytes_received"]
    assert s0["bytes_sent"] == st["position"] * 8  # int64 token ids
    assert s2["bytes_received"] == steps * 4 * args.vocab_size  # fp32 logits [1, vocab] per step


def test_session_cli_text_json_and_status(tiny_cluster):
    def run(*extra: str):
        args = [
            "session",
            "run",
            "--coordinator",
            tiny_cluster.address,
            "--prompt",
            "hi there",
            "--max-tokens",
            "5",
        ]
        return CliRunner().invoke(cli, [*args, *extra])

    r = run()
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr and "stage 2: coordinator" in r.stderr
    out = json.loads(run("--json").stdout)
    assert set(out) >= REPORT_KEYS
    assert {"node_id", "layers", "device", "mean_step_ms"} <= set(out["stages"][0])
    r = CliRunner().invoke(
        cli,
        [
            "session",
            "status",
            "--coordinator",
            tiny_cluster.address,
            "--session-id",
            out["session_id"],
            "--json",
        ],
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["state"] == "finished"
    r = CliRunner().invoke(cli, ["coordinator", "status", "--coordinator", tiny_cluster.address])
    assert r.exit_code == 0 and "pipeline: worker-0 0-1 -> worker-1 1-2 -> coordinator 2-4" in r.stdout
    assert "disk for remote logits: 0.00 of" in r.stdout  # the last stage is the coordinator's own


def _one_line_error(result, match: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]


def test_cli_errors_are_one_line(tiny_cluster):
    r = CliRunner().invoke(
        cli, ["session", "status", "--coordinator", tiny_cluster.address, "--session-id", "nope"]
    )
    _one_line_error(r, "unknown session 'nope' [NOT_FOUND]")
    dead = f"127.0.0.1:{free_port()}"
    r = CliRunner().invoke(
        cli, ["session", "run", "--coordinator", dead, "--prompt", "x", "--connect-timeout", "1"]
    )
    _one_line_error(r, f"cannot reach coordinator at {dead}")
    r = CliRunner().invoke(cli, ["session", "run", "--coordinator", "nohost", "--prompt", "x"])
    _one_line_error(r, "expected host:port")
    r = CliRunner().invoke(
        cli, ["session", "run", "--coordinator", tiny_cluster.address, "--prompt", "x", "--top-p", "0"]
    )
    _one_line_error(r, "top-p must be in (0, 1]")
    r = CliRunner().invoke(
        cli, ["session", "run", "--coordinator", tiny_cluster.address, "--prompt", "x " * 300]
    )
    _one_line_error(r, "does not fit the model's context of 128 [INVALID_ARGUMENT]")


# --- talking to a worker directly -------------------------------------------------------


@pytest.fixture
def worker1(tiny_cluster):
    """A stub for worker-1 (layers 1-2) signing as the coordinator does, with a client-side
    limit above the worker's 1 MiB."""
    channel, stub = worker_stub(tiny_cluster, "worker-1", max_message_bytes=8 * 2**20)
    yield stub
    channel.close()


def _order(sid: str, pos: int, x: pb.Tensor, layers=(1, 2)) -> pb.WorkOrder:
    return pb.WorkOrder(
        session_id=sid, layers=pb.LayerRange(start=layers[0], end=layers[1]), start_position=pos, input=x
    )


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_worker_answers_bad_work_orders_with_status_codes(worker1):
    C = grpc.StatusCode
    h = WireTensor.from_torch(torch.ones(3, 256)).to_proto()
    assert _code(lambda: worker1.Execute(_order("ghost", 0, h))) == (
        C.NOT_FOUND,
        "unknown session 'ghost' on this stage",
    )
    worker1.OpenSession(
        pb.OpenSessionRequest(session_id="direct", capacity=8, layers=pb.LayerRange(start=1, end=2))
    )
    code, msg = _code(lambda: worker1.Execute(_order("direct", 5, h)))
    assert code == C.FAILED_PRECONDITION and "expected position 0" in msg
    code, msg = _code(lambda: worker1.Execute(_order("direct", 0, h, layers=(0, 1))))
    assert code == C.FAILED_PRECONDITION and "holding layers 1-2" in msg
    malformed = [
        pb.Tensor(dtype=pb.DTYPE_FP32, shape=[3, 256], data=b"\0" * 100),  # byte length != shape x itemsize
        pb.Tensor(dtype=99, shape=[3, 256], data=b"\0" * 3072),  # dtype not on the whitelist
        WireTensor.from_torch(torch.ones(3, 255)).to_proto(),  # hidden size != model's
        WireTensor.from_torch(torch.full((3, 256), float("inf"))).to_proto(),
        WireTensor.from_tokens([1, 2, 3]).to_proto(),  # tokens to a middle stage
        pb.Tensor(dtype=pb.DTYPE_FP32, shape=[3, 256, 1], data=b"\0" * 3072),
    ]
    for t in malformed:
        code, msg = _code(lambda t=t: worker1.Execute(_order("direct", 0, t)))
        assert code == C.INVALID_ARGUMENT, msg
    code, msg = _code(
        lambda: worker1.Execute(_order("direct", 0, WireTensor.from_torch(torch.ones(9, 256)).to_proto()))
    )
    assert code == C.INVALID_ARGUMENT and "at most 8 fit" in msg
    # nothing was lost: the session is intact at position 0 and runs
    out = worker1.Execute(_order("direct", 0, h))
    assert list(out.output.shape) == [3, 256] and out.start_position == 0
    assert worker1.CloseSession(pb.CloseSessionRequest(session_id="direct")).existed


def test_oversized_messages_get_a_status_not_a_crash(tiny_cluster, worker1, client_for):
    big = WireTensor.from_torch(torch.ones(2048, 256)).to_proto()  # 2 MiB > the worker's 1 MiB limit
    code, _ = _code(lambda: worker1.Execute(_order("direct", 0, big)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    link = coordinator_link(tiny_cluster, max_message_bytes=8 * 2**20)
    try:
        stub = link.stub
        code, _ = _code(
            lambda: list(stub.Generate(pb.GenerateRequest(prompt="x" * (2 * 2**20), max_tokens=1)))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, msg = _code(lambda: list(stub.Generate(pb.GenerateRequest(prompt="", max_tokens=1))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty prompt" in msg
        # signed, by a key no node registered with
        code, _ = _code(lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="stranger")))
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        link.close()
    assert worker1.GetStatus(pb.WorkerStatusRequest()).node.node_id == "worker-1"  # still serving
    assert client_for(tiny_cluster).run(SessionRequest("still fine", max_tokens=3)).tokens


def test_coordinator_refuses_bad_registrations(tiny_cluster, client_for):
    digest = client_for(tiny_cluster).cluster_status()["model_digest"]
    link = coordinator_link(tiny_cluster)
    stub, identity = link.stub, NodeIdentity.generate()

    def node(**kw) -> pb.RegisterRequest:  # each properly signed: refused for what it says
        base = dict(
            node_id="intruder",
            address="127.0.0.1:9",
            dtype="fp32",
            model_digest=digest,
            layers=pb.LayerRange(start=0, end=1),
            public_key=identity.public_key,
        )
        return signed_register(link, identity, **{**base, **kw})

    try:
        code, msg = _code(lambda: stub.Register(node(public_key=b"")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "public key" in msg
        # an id stays bound to the key it first registered with
        code, msg = _code(lambda: stub.Register(node(node_id="worker-0")))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "bound to another public key" in msg
        code, msg = _code(lambda: stub.Register(node(model_digest="0" * 64)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "model digest mismatch" in msg
        code, msg = _code(lambda: stub.Register(node(layers=pb.LayerRange(start=2, end=9))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "beyond the model's 4 layers" in msg
        code, msg = _code(lambda: stub.Register(node(node_id="coordinator")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        code, msg = _code(lambda: stub.Register(node(address="nowhere")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        link.close()
    ids = sorted(n["node_id"] for n in client_for(tiny_cluster).cluster_status()["nodes"])
    assert ids == ["coordinator", "worker-0", "worker-1"]


def test_client_errors_raise_consortium_errors(tiny_cluster, client_for):
    with pytest.raises(ConsortiumError, match="max-tokens must be positive"):
        client_for(tiny_cluster).run(SessionRequest("x", max_tokens=0))
