"""Continuous batching: a stage's forward over several sessions gives each session what it
would get alone, a runner answers each order of a batch on its own, and the coordinator's
Batcher sends whatever waits in one call while a call runs."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from consortium.coordinator.batching import Batcher, BatchPolicy
from consortium.core.config import CoordinatorConfig, EngineConfig, LayerRange
from consortium.errors import ConsortiumError, InvalidRequestError
from consortium.identity import NodeIdentity
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import status_for
from consortium.transport.tensors import WireTensor
from consortium.verification.misbehave import Misbehaviour, make_runner
from consortium.verification.receipts import check_work_receipt, input_digest
from consortium.worker.runner import MAX_BATCH, StageRunner

PROMPTS = [[5, 9, 200, 17], [3], [44, 45], [7, 8, 9, 10, 11, 12]]


def _decode_alone(stage: Stage, prompt: list[int], steps: int) -> torch.Tensor:
    cache = stage.new_cache(32)
    outs = [stage(torch.tensor(prompt), cache)]
    for _ in range(steps):
        outs.append(stage(torch.tensor([int(outs[-1][-1].argmax())]), cache))
    return torch.cat(outs)


@pytest.mark.parametrize(("dtype", "packed"), [("fp16", False), ("bf16", True)])
def test_a_batched_forward_equals_each_session_alone(smollm_path, dtype, packed):
    """Prefills of different lengths and decode rows in one forward: bit-identical per session
    (these kernels are batch-invariant on CPU, which the stage checks on its own weights)."""
    g = GGUFModel(smollm_path)
    stage = Stage(g, StageSpec(0, g.args.n_layers, dtype=dtype, packed=packed))
    assert stage.batch_invariant
    caches = [stage.new_cache(32) for _ in PROMPTS]
    outs = [[y] for y in stage.forward_batch([torch.tensor(p) for p in PROMPTS], caches)]
    for _ in range(3):
        ids = [torch.tensor([int(o[-1][-1].argmax())]) for o in outs]
        for o, y in zip(outs, stage.forward_batch(ids, caches), strict=True):
            o.append(y)
    for prompt, o in zip(PROMPTS, outs, strict=True):
        assert torch.equal(torch.cat(o), _decode_alone(stage, prompt, 3))


def test_a_forward_refuses_one_cache_twice_and_empty_rows(tiny_gguf):
    stage = Stage(GGUFModel(tiny_gguf), StageSpec(0, 4))
    c = stage.new_cache(8)
    with pytest.raises(InvalidRequestError, match="twice"):
        stage.forward_batch([torch.tensor([1]), torch.tensor([2])], [c, c])
    with pytest.raises(InvalidRequestError, match="no positions"):
        stage.forward_batch([torch.tensor([1]), torch.tensor([], dtype=torch.long)], [c, stage.new_cache(8)])
    assert c.length == 0  # nothing half-computed


# --- the runner: one call, one signed result or one error per order ----------------------------


def _lr(r: LayerRange) -> pb.LayerRange:
    return pb.LayerRange(start=r.start, end=r.end)


def _order(runner: StageRunner, sid: str, pos: int, ids: list[int], step: int = 0) -> pb.WorkOrder:
    x = WireTensor.from_tokens(ids)
    return pb.WorkOrder(
        session_id=sid, step=step, layers=_lr(runner.layers), start_position=pos, input=x.to_proto()
    )


def _runner(gguf_path, dtype="fp32", identity=None, misbehave=None) -> StageRunner:
    g = GGUFModel(gguf_path)
    engine = EngineConfig(dtype=dtype)
    return make_runner(g, LayerRange(0, 4), engine, 64 * 2**20, 600.0, identity, "w", misbehaviour=misbehave)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_batch_of_orders_equals_the_orders_one_by_one(tiny_gguf, dtype):
    """fp32's gemm is not batch-invariant (MKL's one-row path differs): the runner then runs the
    batch's sessions one by one in the same call, so the results are the same either way."""
    key = NodeIdentity.generate()
    batched, alone = _runner(tiny_gguf, dtype, key), _runner(tiny_gguf, dtype, key)
    assert batched.stage.batch_invariant == (dtype == "bf16")
    for r in (batched, alone):
        for i in range(len(PROMPTS)):
            r.open(pb.OpenSessionRequest(session_id=f"s{i}", capacity=32, layers=_lr(r.layers)))
    orders = [_order(batched, f"s{i}", 0, p) for i, p in enumerate(PROMPTS)]
    reply = batched.execute_batch(pb.WorkBatch(orders=orders))
    for order, item in zip(orders, reply.items, strict=True):
        assert item.code == 0 and item.result.batch_size == len(PROMPTS)
        one = alone.execute(order)
        assert item.result.output == one.output  # the same bytes
        out = WireTensor.from_proto(item.result.output)
        expected_in = input_digest(order.session_id, 0, 0, WireTensor.from_proto(order.input))
        check_work_receipt(
            item.result.receipt, order, key.public_key, batched.layers_digest, expected_in, out
        )


def test_one_bad_order_fails_alone(tiny_gguf):
    r = _runner(tiny_gguf)
    for sid in ("a", "b"):
        r.open(pb.OpenSessionRequest(session_id=sid, capacity=4, layers=_lr(r.layers)))
    orders = [
        _order(r, "a", 0, [1, 2]),
        _order(r, "nobody", 0, [1]),  # unknown session
        _order(r, "b", 3, [1]),  # out of sync (the cache is empty)
        _order(r, "a", 0, [1]),  # the same session twice
        _order(r, "b", 0, [1, 2, 3, 4, 5]),  # more positions than it reserved
    ]
    items = r.execute_batch(pb.WorkBatch(orders=orders)).items
    codes = [grpc.StatusCode.OK.value[0] if not it.code else it.code for it in items]
    want = [grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION]
    want += [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT]
    assert codes == [c.value[0] for c in want]
    assert "twice" in items[3].error and "expected position 0" in items[2].error
    assert items[0].result.output.shape == [1, r.args.vocab_size]  # the last row's logits
    assert r.pool.get("a").length == 2 and r.pool.get("b").length == 0  # the bad ones did nothing
    with pytest.raises(InvalidRequestError, match="orders in a batch"):
        r.execute_batch(pb.WorkBatch(orders=[orders[0]] * (MAX_BATCH + 1)))
    with pytest.raises(InvalidRequestError):
        r.execute_batch(pb.WorkBatch())


def test_a_cheat_on_one_session_leaves_the_others_alone(tiny_gguf, monkeypatch):
    """`steer=0.5@2` corrupts only the second session opened on the node, inside a batch."""
    cheat = Misbehaviour.parse("steer=0.5@2", enabled=True)
    bad, good = _runner(tiny_gguf, "bf16", misbehave=cheat), _runner(tiny_gguf, "bf16")
    for r in (bad, good):
        for sid in ("first", "second", "third"):
            r.open(pb.OpenSessionRequest(session_id=sid, capacity=8, layers=_lr(r.layers)))
    orders = [_order(bad, sid, 0, [4, 5]) for sid in ("first", "second", "third")]
    got = bad.execute_batch(pb.WorkBatch(orders=orders)).items
    want = good.execute_batch(pb.WorkBatch(orders=orders)).items
    same = [g.result.output == w.result.output for g, w in zip(got, want, strict=True)]
    assert same == [True, False, True]


# --- the coordinator's Batcher ------------------------------------------------------------------


class _Stage:
    """A batch call that blocks the first call until released, recording every batch."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_whole: Exception | None = None

    def __call__(self, orders: list[pb.WorkOrder], timeout_s: float):
        self.batches.append([o.session_id for o in orders])
        self.entered.set()
        self.release.wait(10)
        if self.fail_whole is not None:
            raise self.fail_whole
        return [
            ValueError(f"bad {o.session_id}")
            if o.session_id.startswith("bad")
            else pb.WorkResult(step=o.step)
            for o in orders
        ]


def _submit(
    batcher: Batcher, sid: str, step: int, results: dict, then: Batcher | None = None
) -> threading.Thread:
    def run():
        try:
            results[sid] = batcher.execute(pb.WorkOrder(session_id=sid, step=step), 5.0, then)
        except Exception as e:
            results[sid] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_queued(batcher: Batcher, n: int) -> None:
    for _ in range(500):
        with batcher._lock:
            if len(batcher._waiting) == n:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{n} orders never queued")


def test_orders_arriving_during_a_call_go_together_in_the_next():
    stage, results = _Stage(), {}
    b = Batcher(stage, BatchPolicy(max_batch=3))
    first = _submit(b, "a", 1, results)
    assert stage.entered.wait(5)
    threads = [_submit(b, sid, i, results) for i, sid in enumerate(["b", "bad-c", "d", "e"], 2)]
    _wait_queued(b, 4)
    stage.release.set()
    for t in [first, *threads]:
        t.join(10)
    assert stage.batches == [["a"], ["b", "bad-c", "d"], ["e"]]  # at most max_batch per call
    assert results["a"].step == 1 and results["d"].step == 4 and results["e"].step == 5
    assert isinstance(results["bad-c"], ValueError)  # its own error, nobody else's
    assert (b.batches, b.orders) == (3, 5)


def test_a_failed_call_fails_every_order_in_it():
    stage, results = _Stage(), {}
    stage.fail_whole = ConnectionError("node down")
    stage.release.set()
    b = Batcher(stage, BatchPolicy(max_batch=8))
    for t in [_submit(b, s, 0, results) for s in ("x", "y")]:
        t.join(10)
    assert all(isinstance(results[s], ConnectionError) for s in ("x", "y"))
    assert status_for(results["x"]) == grpc.StatusCode.INTERNAL  # not mistaken for a node's answer


@pytest.mark.parametrize("n", [0, MAX_BATCH + 1])
def test_max_batch_outside_what_a_node_takes_is_refused(tmp_path, n):
    with pytest.raises(ConsortiumError, match="max-batch must be 1 to 64"):
        CoordinatorConfig(model=tmp_path / "m.gguf", max_batch=n)


def test_a_free_stage_waits_for_the_sessions_announced_to_it():
    """Sessions that left one call together reach the next stage a little apart: the first
    waits for the others (up to the gathering window) so that they stay one batch."""
    first, second = _Stage(), _Stage()
    first.release.set()
    second.release.set()
    a = Batcher(first, BatchPolicy(16, gather_s=5.0))
    b = Batcher(second, BatchPolicy(16, gather_s=5.0))
    results: dict = {}
    for t in [_submit(a, s, 1, results, then=b) for s in ("x", "y")]:
        t.join(10)
    assert sorted(b._expected) == ["x", "y"]  # announced by the call at the first stage
    tx = _submit(b, "x", 2, results)
    _wait_queued(b, 1)
    threading.Event().wait(0.2)
    assert second.batches == []  # x waits for y
    ty = _submit(b, "y", 2, results)
    for t in (tx, ty):
        t.join(10)
    assert [sorted(batch) for batch in second.batches] == [["x", "y"]]
    assert results["x"].step == 2 and results["y"].step == 2


def test_an_announced_session_that_never_comes_delays_a_stage_only_the_gathering_window():
    stage, results = _Stage(), {}
    stage.release.set()
    b = Batcher(stage, BatchPolicy(16, gather_s=0.05))
    b.expect("gone")
    t = _submit(b, "x", 1, results)
    t.join(10)
    assert stage.batches == [["x"]] and results["x"].step == 1
    b.expect("ended")
    b.forget("ended")  # a session that ends says so: no wait at all
    assert b._expected == {}


def test_sessions_split_into_the_batches_in_flight():
    """With 2 batches in flight, 4 sessions at a stage go 2 by 2 (then the next stage works on
    one pair while this one works on the other), never more than max_batch."""
    stage, results = _Stage(), {}
    b = Batcher(stage, BatchPolicy(max_batch=16, in_flight=2))
    first = _submit(b, "a", 1, results)
    assert stage.entered.wait(5)
    threads = [_submit(b, sid, 1, results) for sid in ("b", "c", "d")]
    _wait_queued(b, 3)
    stage.release.set()
    for t in [first, *threads]:
        t.join(10)
    assert [len(batch) for batch in stage.batches] == [1, 2, 1]
    assert all(results[s].step == 1 for s in "abcd")


@pytest.mark.parametrize(("field", "value"), [("batches_in_flight", 0), ("batch_gather_ms", -1.0)])
def test_batch_policy_outside_its_range_is_refused(tmp_path, field, value):
    with pytest.raises(ConsortiumError, match=field.replace("_", "-")):
        CoordinatorConfig(model=tmp_path / "m.gguf", **{field: value})
