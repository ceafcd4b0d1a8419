"""The StageRunner behind every worker and the coordinator's own stage: it validates each
work order and, chained over a split of the layers, reproduces the single-stage output."""

from __future__ import annotations

import pytest
import torch

from consortium.core.config import EngineConfig, LayerRange
from consortium.core.session import StageHistory, StageRef, StepRecord
from consortium.errors import InvalidRequestError
from consortium.identity import NodeIdentity
from consortium.model.gguf_file import GGUFModel
from consortium.model.kv_pool import UnknownSessionError
from consortium.model.model import Stage, StageSpec
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import OutOfRangeError, PreconditionError
from consortium.transport.tensors import TensorError, WireTensor
from consortium.verification.misbehave import MisbehavingRunner, Misbehaviour, make_runner
from consortium.verification.receipts import ReceiptError, from_proto
from consortium.worker.runner import OutOfSyncError, StageRunner


@pytest.fixture(scope="module")
def runners(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    ranges = [LayerRange(0, 1), LayerRange(1, 3), LayerRange(3, 4)]
    return g, [StageRunner(g, r, EngineConfig(), 64 * 2**20, 600.0) for r in ranges]


def _lr(r: LayerRange) -> pb.LayerRange:
    return pb.LayerRange(start=r.start, end=r.end)


def _order(runner, sid, pos, x: WireTensor, step=0) -> pb.WorkOrder:
    return pb.WorkOrder(
        session_id=sid, step=step, layers=_lr(runner.layers), start_position=pos, input=x.to_proto()
    )


def _open(runner, sid, capacity=32):
    runner.open(pb.OpenSessionRequest(session_id=sid, capacity=capacity, layers=_lr(runner.layers)))


def test_chained_runners_equal_one_stage(runners):
    g, rs = runners
    e = EngineConfig()
    full = Stage(g, StageSpec(0, 4, dtype=e.dtype, packed=e.packed))  # the runners' engine
    cache = full.new_cache(32)
    for r in rs:
        _open(r, "s1")
    ids = [5, 9, 200, 17]
    x, pos = WireTensor.from_tokens(ids), 0
    for step in range(3):
        for r in rs:
            x = WireTensor.from_proto(r.execute(_order(r, "s1", pos, x, step)).output)
        want = full(torch.tensor(ids), cache)
        assert torch.equal(x.to_torch(), want)  # bit-identical logits
        pos += len(ids)
        ids = [int(want[-1].argmax())]
        x = WireTensor.from_tokens(ids)
    for r in rs:
        assert r.close(pb.CloseSessionRequest(session_id="s1")).existed


def test_work_orders_are_validated(runners):
    g, (first, mid, last) = runners
    _open(mid, "s2", capacity=4)
    h = WireTensor.from_torch(torch.zeros(2, g.args.dim))
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        mid.execute(_order(mid, "nope", 0, h))
    with pytest.raises(PreconditionError, match="work for layers 0-1 sent to the node holding layers 1-3"):
        mid.execute(pb.WorkOrder(session_id="s2", layers=_lr(LayerRange(0, 1)), input=h.to_proto()))
    with pytest.raises(OutOfSyncError, match="expected position 0, work order starts at 3") as e:
        mid.execute(_order(mid, "s2", 3, h))
    assert e.value.expected == 0
    with pytest.raises(TensorError, match="hidden size 7"):
        mid.execute(_order(mid, "s2", 0, WireTensor.from_torch(torch.zeros(2, 7))))
    with pytest.raises(TensorError, match="float"):
        mid.execute(_order(mid, "s2", 0, WireTensor.from_tokens([1, 2])))
    with pytest.raises(TensorError, match="at most 4 fit"):
        mid.execute(_order(mid, "s2", 0, WireTensor.from_torch(torch.zeros(5, g.args.dim))))
    with pytest.raises(InvalidRequestError, match="all_logits"):
        o = _order(mid, "s2", 0, h)
        o.all_logits = True
        mid.execute(o)
    with pytest.raises(InvalidRequestError, match="bad session id"):
        mid.execute(_order(mid, "", 0, h))
    # nothing was lost: the session still starts at position 0
    mid.execute(_order(mid, "s2", 0, h))
    with pytest.raises(OutOfRangeError, match="exceed the 4 positions"):
        mid.execute(_order(mid, "s2", 2, WireTensor.from_torch(torch.zeros(3, g.args.dim))))
    mid.execute(_order(mid, "s2", 2, h))
    with pytest.raises(TensorError, match="token id"):
        _open(first, "s3")
        first.execute(_order(first, "s3", 0, WireTensor.from_tokens([g.args.vocab_size])))


def test_idle_sessions_expire(tiny_gguf):
    r = StageRunner(GGUFModel(tiny_gguf), LayerRange(0, 1), EngineConfig(), 2**20, idle_timeout_s=0.0)
    _open(r, "old")
    assert r.expire() == ["old"] and len(r.pool) == 0


def test_history_must_be_contiguous():
    ref = StageRef(0, "n", "a:1", LayerRange(0, 1), "cpu", "fp32", False)
    h = StageHistory(ref)
    t3, t1 = WireTensor.from_tokens([1, 2, 3]), WireTensor.from_tokens([4])
    h.append(StepRecord(0, 0, t3, t3, "n", 1.0, 0.5))
    h.append(StepRecord(1, 3, t1, t1, "n", 2.0, 1.5))
    with pytest.raises(ValueError):
        h.append(StepRecord(2, 5, t1, t1, "n", 2.0, 1.5))
    assert [r.step for r in h.inputs_until(3)] == [0]
    s = h.stats()
    assert (s.prefill_ms, s.mean_step_ms, s.mean_compute_ms, s.steps) == (1.0, 2.0, 1.5, 2)


def _two_steps(runner, sid: str, hidden: torch.Tensor) -> list[pb.WorkResult]:
    """A 3-row prefill (step 0) and one decode row (step 1) through a middle stage."""
    _open(runner, sid)
    first = runner.execute(_order(runner, sid, 0, WireTensor.from_torch(hidden[:3]), 0))
    return [first, runner.execute(_order(runner, sid, 3, WireTensor.from_torch(hidden[3:]), 1))]


def test_cheats_live_in_a_subclass_through_the_runners_hooks(tiny_gguf):
    """StageRunner holds no cheat; make_runner builds the misbehaving subclass only when asked,
    and each cheat changes what its hook says: the stage, the output rows, or the receipt."""
    g, ident, mid = GGUFModel(tiny_gguf), NodeIdentity.generate(), LayerRange(1, 3)

    def build(kind: str | None, **kw):
        m = None if kind is None else Misbehaviour(kind, **kw)
        return make_runner(g, mid, EngineConfig(), 2**22, 600.0, identity=ident, node_id="n", misbehaviour=m)

    honest = build(None)
    assert type(honest) is StageRunner and not hasattr(honest, "misbehaviour")
    hidden = torch.randn(4, g.args.dim)
    want = _two_steps(honest, "s", hidden)
    for r in want:
        from_proto(r.receipt).check_signature(ident.public_key)
    cheats = [("skip-layer", {}), ("wrong-weights", {}), ("int4-weights", {}), ("flip-max", {})]
    for kind, kw in cheats + [("noise", {"sigma": 0.01})]:
        runner = build(kind, **kw)
        assert isinstance(runner, MisbehavingRunner)
        got = _two_steps(runner, "s", hidden)
        for a, b in zip(got, want, strict=True):
            assert not torch.equal(
                WireTensor.from_proto(a.output).to_torch(), WireTensor.from_proto(b.output).to_torch()
            )
            from_proto(a.receipt).check_signature(ident.public_key)  # an honest signature over a wrong result
    bad = _two_steps(build("bad-signature"), "s", hidden)
    assert bad[0].output == want[0].output
    with pytest.raises(ReceiptError, match="bad signature"):
        from_proto(bad[0].receipt).check_signature(ident.public_key)
    replay = _two_steps(build("replay"), "s", hidden)
    assert replay[1].output == want[1].output
    assert replay[0].receipt.step == 0 and replay[1].receipt == replay[0].receipt  # step 1 resends step 0's
    from_proto(replay[1].receipt).check_signature(ident.public_key)
