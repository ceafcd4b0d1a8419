"""A layer range with its per-session KV caches, executing validated work orders.

The same runner serves a worker's gRPC calls and the coordinator's own stage, so both
check orders identically and run the exact engine code `consortium generate` runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from consortium.core import cpus
from consortium.core.config import MAX_BATCH, EngineConfig, LayerRange
from consortium.errors import InvalidRequestError
from consortium.identity import NodeIdentity
from consortium.model.gguf_file import GGUFModel
from consortium.model.kv_pool import CacheEntry, CachePool
from consortium.model.model import Stage, StageSpec
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import OutOfRangeError, PreconditionError, status_for
from consortium.transport.tensors import WireTensor, decode_hidden, decode_tokens
from consortium.verification.receipts import make_receipt, to_proto

log = logging.getLogger(__name__)
MAX_SESSION_ID = 128


class OutOfSyncError(PreconditionError):
    """A work order's positions do not continue the session's KV cache."""

    def __init__(self, message: str, expected: int):
        super().__init__(message)
        self.expected = expected


def check_session_id(session_id: str) -> str:
    if not session_id or len(session_id) > MAX_SESSION_ID or not session_id.isprintable():
        raise InvalidRequestError(
            f"bad session id {session_id[:40]!r}: 1 to {MAX_SESSION_ID} printable characters"
        )
    return session_id


def check_layers(msg: pb.LayerRange, mine: LayerRange) -> None:
    theirs = LayerRange(msg.start, msg.end)
    if theirs != mine:
        raise PreconditionError(f"work for layers {theirs} sent to the node holding layers {mine}")


@dataclass
class Work:
    """An order that passed the checks that need no lock, with what it will get: its output
    rows, unencoded and unsigned (`StageRunner.compute`)."""

    index: int  # in the batch
    order: pb.WorkOrder
    entry: CacheEntry
    inp: WireTensor  # the input as received (what the receipt commits to)
    x: torch.Tensor
    y: torch.Tensor | None = None
    compute_ms: float = 0.0
    batch_size: int = 1
    error: Exception | None = None


def _logged(e: Exception) -> Exception:
    """An order's failure; a bug (no status of its own) is logged with its traceback."""
    if status_for(e) == grpc.StatusCode.INTERNAL:
        log.error("internal error in a work order", exc_info=e)
    return e


class StageRunner:
    """Honest by construction; verification/misbehave.py subclasses it (tests only) through
    the hooks `_load_stage`, `_forward` and `_sign`."""

    def __init__(
        self,
        gguf: GGUFModel,
        layers: LayerRange,
        engine: EngineConfig,
        kv_cache_bytes: int,
        idle_timeout_s: float,
        identity: NodeIdentity | None = None,
        node_id: str = "",
        progress: Callable[[int, int], None] | None = None,
    ):
        layers.check(gguf.args.n_layers)
        self.gguf, self.layers, self.engine = gguf, layers, engine
        # identity: sign a receipt for every result (workers); None for the coordinator's own stage
        self.identity, self.node_id = identity, node_id
        spec = StageSpec(
            layers.start, layers.end, device=engine.device, dtype=engine.dtype, packed=engine.packed
        )
        self.stage = self._load_stage(spec, progress)
        self.pool = CachePool(self.stage, kv_cache_bytes, idle_timeout_s)
        self.layers_digest = gguf.layers_digest(layers.start, layers.end)
        self._compute = threading.Lock()  # one forward at a time: the device is a serial resource

    def _load_stage(self, spec: StageSpec, progress: Callable[[int, int], None] | None) -> Stage:
        return Stage(self.gguf, spec, progress)

    @property
    def args(self):
        return self.gguf.args

    def open(self, req: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        check_session_id(req.session_id)
        check_layers(req.layers, self.layers)
        if not 0 < req.capacity <= self.args.context_length:
            raise InvalidRequestError(
                f"capacity {req.capacity} outside 1..{self.args.context_length} (model context)"
            )
        cache = self.pool.create(req.session_id, req.capacity)
        log.info(
            "session %s opened on layers %s: %d positions, %d bytes",
            req.session_id,
            self.layers,
            req.capacity,
            cache.nbytes,
        )
        return pb.OpenSessionResponse(cache_bytes=cache.nbytes)

    def close(self, req: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        check_session_id(req.session_id)
        existed = self.pool.drop(req.session_id)
        if existed:
            log.info("session %s closed on layers %s", req.session_id, self.layers)
        return pb.CloseSessionResponse(existed=existed)

    def execute(self, order: pb.WorkOrder) -> pb.WorkResult:
        """Validates the order (session, layers, positions, tensor), runs the stage and signs."""
        result = self.run_orders([order])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def execute_batch(self, batch: pb.WorkBatch) -> pb.BatchResult:
        """Several sessions' orders in one forward (continuous batching). Each order is checked
        on its own and answered with its own signed result or error: one session's bad order
        fails that session only."""
        if not 0 < len(batch.orders) <= MAX_BATCH:
            raise InvalidRequestError(f"{len(batch.orders)} orders in a batch: 1 to {MAX_BATCH}")
        items = []
        for res in self.run_orders(list(batch.orders)):
            if isinstance(res, Exception):
                items.append(pb.BatchItem(code=status_for(res).value[0], error=str(res)))
            else:
                items.append(pb.BatchItem(result=res))
        return pb.BatchResult(items=items)

    def run_orders(self, orders: list[pb.WorkOrder]) -> list[pb.WorkResult | Exception]:
        """Each order's signed result, or the exception that refused it."""
        return [w if isinstance(w, Exception) else self.result(w) for w in self.compute(orders)]

    def compute(self, orders: list[pb.WorkOrder]) -> list[Work | Exception]:
        """Each order's output rows, checked and computed but neither encoded nor signed (the
        coordinator's own stage uses them as they are: no bytes to copy and decode again), or
        the exception that refused it."""
        out: list[Work | Exception | None] = [None] * len(orders)
        ready, seen = [], set()
        for i, order in enumerate(orders):
            try:
                if order.session_id in seen:
                    raise InvalidRequestError(f"session {order.session_id[:40]!r} twice in one batch")
                seen.add(order.session_id)
                self._before(order)
                ready.append(self._check(i, order))
            except Exception as e:
                out[i] = _logged(e)
        self._run(ready)
        for r in ready:
            out[r.index] = r.error if r.error is not None else r
        return out  # type: ignore[return-value]  # every slot is filled

    def _check(self, index: int, order: pb.WorkOrder) -> Work:
        """Everything about one order that needs no lock: ids, layers, its session, its tensor."""
        check_session_id(order.session_id)
        if not 0 <= order.step < 2**63:  # receipts sign it as a signed 64-bit field: refuse before any work
            raise InvalidRequestError(f"step {order.step} outside 0..2^63-1")
        check_layers(order.layers, self.layers)
        if order.all_logits and not self.stage.is_last:
            raise InvalidRequestError(f"all_logits asked of layers {self.layers}, which do not end the model")
        entry = self.pool.entry(order.session_id)  # UnknownSessionError -> NOT_FOUND
        if self.stage.is_first:
            inp, x = decode_tokens(order.input, self.args.vocab_size, max_rows=entry.cache.capacity)
        else:
            inp, x = decode_hidden(order.input, self.args.dim, max_rows=entry.cache.capacity)
        return Work(index, order, entry, inp, x)

    def _run(self, ready: list[Work]) -> None:
        """The checked orders through the stage, under their sessions' locks (taken in one order,
        so that concurrent batches cannot deadlock): positions checked, then one forward where
        the kernels are batch-invariant, else one forward per session."""
        with contextlib.ExitStack() as locks:
            for r in sorted(ready, key=lambda r: r.order.session_id):
                locks.enter_context(r.entry.lock)
            go = []
            for r in ready:
                try:
                    self._positions(r)
                    go.append(r)
                except Exception as e:
                    r.error = _logged(e)
            if not go:
                return
            try:
                with self._compute:
                    t0 = time.perf_counter()
                    if len(go) == 1 or self.stage.batch_invariant:
                        xs, caches = [r.x for r in go], [r.entry.cache for r in go]
                        ys = self.stage.forward_batch(xs, caches, [r.order.all_logits for r in go])
                    else:
                        ys = [self.stage(r.x, r.entry.cache, all_logits=r.order.all_logits) for r in go]
                    ms = (time.perf_counter() - t0) * 1000
            except Exception as e:
                for r in go:
                    r.error = _logged(e)
                return
            for r, y in zip(go, ys, strict=True):
                r.y, r.compute_ms, r.batch_size = self._output(r.order, y.cpu()), ms, len(go)

    def result(self, r: Work) -> pb.WorkResult:
        """A computed order's result: its output rows on the wire, signed where this runner has
        an identity."""
        assert r.y is not None
        out = WireTensor.from_torch(r.y)
        result = pb.WorkResult(
            session_id=r.order.session_id,
            step=r.order.step,
            start_position=r.order.start_position,
            output=out.to_proto(),
            compute_ms=r.compute_ms,
            batch_size=r.batch_size,
        )
        if self.identity is not None:
            result.receipt.CopyFrom(self._sign(r.order, r.inp, out))
        return result

    @staticmethod
    def _positions(r: Work) -> None:
        cache, order = r.entry.cache, r.order
        if order.start_position != cache.length:
            raise OutOfSyncError(
                f"session {order.session_id} is out of sync: expected position {cache.length}, work "
                f"order starts at {order.start_position}",
                expected=cache.length,
            )
        end = cache.length + r.x.shape[0]
        if end > cache.capacity:
            raise OutOfRangeError(
                f"positions {cache.length}..{end - 1} exceed the {cache.capacity} positions session "
                f"{order.session_id} reserved"
            )

    def _before(self, order: pb.WorkOrder) -> None:
        """Hook before an order is checked (misbehave.py's faults)."""

    def _output(self, order: pb.WorkOrder, y: torch.Tensor) -> torch.Tensor:
        """Hook on an order's output rows before they are sent and signed (misbehave.py's cheats)."""
        return y

    def _sign(self, order: pb.WorkOrder, inp: WireTensor, out: WireTensor) -> pb.Receipt:
        assert self.identity is not None
        return to_proto(make_receipt(self.identity, self.node_id, order, self.layers_digest, inp, out))

    def rollback(self, req: pb.RollbackRequest) -> pb.RollbackResponse:
        """Forget positions >= req.position of a session (its later work was withdrawn)."""
        check_session_id(req.session_id)
        entry = self.pool.entry(req.session_id)
        with entry.lock:
            if not 0 <= req.position <= entry.cache.length:
                raise OutOfRangeError(
                    f"cannot roll session {req.session_id} back to {req.position}: cache holds {entry.cache.length}"
                )
            entry.cache.truncate(req.position)
        log.info(
            "session %s rolled back to position %d on layers %s", req.session_id, req.position, self.layers
        )
        return pb.RollbackResponse(length=req.position)

    def expire(self) -> list[str]:
        dead = self.pool.expire()
        for sid in dead:
            log.info("session %s expired on layers %s (idle)", sid, self.layers)
        return dead


def use_cores(engine: EngineConfig) -> None:
    """This process's share of the machine: its CPUs (--cpus; before any thread of ours starts,
    which then inherits them) and torch's intra-op threads (0 keeps torch's default)."""
    cpus.pin(engine.cpus)
    if engine.threads > 0:
        torch.set_num_threads(engine.threads)
