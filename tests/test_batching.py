"""Continuous batching: a stage's forward over several sessions gives each session what it
would get alone, a runner answers each order of a batch on its own, and the coordinator's
Batcher sends whatever waits in one call while a call runs."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from consortium.coordinator.batching import Batcher, BatchPolicy, Queued, cohort, later, take
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
    """A batch call that blocks until released, recording every batch."""

    def __init__(self, released: bool = False):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_whole: Exception | None = None
        if released:
            self.release.set()

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


class _Results:
    """Callbacks that collect each session's result and say when all are in."""

    def __init__(self, n: int):
        self.got: dict[str, object] = {}
        self.threads: set[str] = set()
        self.n, self.all_in = n, threading.Event()

    def done(self, sid: str):
        def cb(r) -> None:
            self.got[sid] = r
            self.threads.add(threading.current_thread().name)
            if len(self.got) == self.n:
                self.all_in.set()

        return cb


def _submit(b: Batcher, sid: str, step: int, results: _Results) -> None:
    b.submit(pb.WorkOrder(session_id=sid, step=step), 5.0, results.done(sid))


def _wait_queued(batcher: Batcher, n: int) -> None:
    for _ in range(500):
        with batcher._cond:
            if len(batcher._waiting) == n:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{n} orders never queued")


def test_orders_arriving_during_a_call_go_together_in_the_next():
    stage, results = _Stage(), _Results(5)
    b = Batcher(stage, BatchPolicy(max_batch=3))
    _submit(b, "a", 1, results)
    assert stage.entered.wait(5)
    for i, sid in enumerate(["b", "bad-c", "d", "e"], 2):
        _submit(b, sid, i, results)
    _wait_queued(b, 4)
    stage.release.set()
    assert results.all_in.wait(10)
    assert stage.batches == [["a"], ["b", "bad-c", "d"], ["e"]]  # at most max_batch per call
    got = results.got
    assert got["a"].step == 1 and got["d"].step == 4 and got["e"].step == 5
    assert isinstance(got["bad-c"], ValueError)  # its own error, nobody else's
    assert (b.batches, b.orders) == (3, 5)
    assert results.threads == {"batch-callbacks"}  # not the stage's dispatcher, nor the caller


def test_a_failed_call_fails_every_order_in_it():
    stage, results = _Stage(released=True), _Results(2)
    stage.fail_whole = ConnectionError("node down")
    b = Batcher(stage, BatchPolicy(max_batch=8))
    for sid in ("x", "y"):
        _submit(b, sid, 0, results)
    assert results.all_in.wait(10)
    assert all(isinstance(results.got[s], ConnectionError) for s in ("x", "y"))
    assert status_for(results.got["x"]) == grpc.StatusCode.INTERNAL  # not mistaken for a node's answer
    with pytest.raises(ConnectionError):
        b.execute(pb.WorkOrder(session_id="z"), 5.0)  # waited for, raised


def test_a_batch_moves_to_the_next_stage_as_one():
    """The orders a batch's callbacks submit reach an idle next stage together, not one by one."""
    first, second = _Stage(), _Stage(released=True)
    a, b = Batcher(first, BatchPolicy(16)), Batcher(second, BatchPolicy(16))
    results = _Results(4)

    def then(sid: str):
        def cb(r) -> None:
            threading.Event().wait(0.05)  # the next stage is idle meanwhile: it must not start
            _submit(b, sid, r.step + 1, results)

        return cb

    a.submit(pb.WorkOrder(session_id="x", step=1), 5.0, then("x"))
    assert first.entered.wait(5)
    for sid in ("p", "q", "r"):  # arrive while x is at the first stage: its next batch
        a.submit(pb.WorkOrder(session_id=sid, step=1), 5.0, then(sid))
    _wait_queued(a, 3)
    first.release.set()
    assert results.all_in.wait(10)
    assert first.batches == [["x"], ["p", "q", "r"]]
    assert second.batches == [["x"], ["p", "q", "r"]]
    assert all(results.got[s].step == 2 for s in ("x", "p", "q", "r"))


def test_what_callbacks_leave_for_later_runs_after_their_orders_are_out():
    """A batch's callbacks wake their sessions' threads only once the cohort's orders are with
    their stage (a woken thread would compete with the callbacks still to run), in order."""
    stage = _Stage(released=True)
    b = Batcher(stage, BatchPolicy(16))
    seen: list[object] = []
    add = b._add
    b._add = lambda items: (add(items), seen.append([q.order.session_id for q in items]))  # type: ignore[method-assign]
    with cohort():
        for sid in ("x", "y"):
            b.submit(pb.WorkOrder(session_id=sid), 5.0, lambda r: None)
            later(lambda sid=sid: seen.append(sid))
        assert seen == []  # nothing out before the block ends
    assert seen == [["x", "y"], "x", "y"]  # the orders out together, then what was left, in order
    later(lambda: seen.append("now"))  # outside a cohort: at once
    assert seen[-1] == "now"


def test_sessions_split_into_batches_in_flight():
    """A call carries ceil(sessions / in_flight) of the sessions using the stage."""
    stage, results = _Stage(), _Results(5)
    b = Batcher(stage, BatchPolicy(max_batch=16, in_flight=2))
    _submit(b, "s0", 0, results)
    assert stage.entered.wait(5)
    for i in range(1, 5):
        _submit(b, f"s{i}", 0, results)
    _wait_queued(b, 4)
    stage.release.set()
    assert results.all_in.wait(10)
    assert [len(x) for x in stage.batches] == [1, 3, 1]  # 5 sessions, two in flight: 3 at most


@pytest.mark.parametrize("n", [0, MAX_BATCH + 1])
def test_max_batch_outside_what_a_node_takes_is_refused(tmp_path, n):
    with pytest.raises(ConsortiumError, match="max-batch must be 1 to 64"):
        CoordinatorConfig(model=tmp_path / "m.gguf", max_batch=n)


def _o(sid: str, rows: int) -> Queued:
    x = WireTensor.from_tokens(list(range(rows)))
    return Queued(pb.WorkOrder(session_id=sid, input=x.to_proto()), 1.0, lambda r: None)


def test_a_call_carries_one_prefill_at_most():
    """Prefills compute one by one even in a batch: two in one call would only delay each other."""
    waiting = [_o("p1", 30), _o("d1", 1), _o("p2", 12), _o("d2", 1), _o("d3", 1), _o("p3", 5)]
    batch, rest = take(waiting, 4)
    assert [w.order.session_id for w in batch] == ["p1", "d1", "d2", "d3"]
    assert [w.order.session_id for w in rest] == ["p2", "p3"]  # in arrival order, first next time
    batch, rest = take(rest, 4)
    assert [w.order.session_id for w in batch] == ["p2"] and [w.order.session_id for w in rest] == ["p3"]
    decode = [_o(f"d{i}", 1) for i in range(3)]
    assert take(decode, 2) == (decode[:2], decode[2:])  # decode rows: the first `size`
