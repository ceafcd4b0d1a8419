"""A layer range with its per-session KV caches, executing validated work orders.

The same runner serves a worker's gRPC calls and the coordinator's own stage, so both
check orders identically and run the exact engine code `consortium generate` runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from consortium.core.config import EngineConfig, LayerRange
from consortium.errors import InvalidRequestError
from consortium.identity import NodeIdentity
from consortium.model.gguf_file import GGUFModel
from consortium.model.kv_pool import CachePool
from consortium.model.model import Stage, StageSpec
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import OutOfRangeError, PreconditionError
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
        inp, y, compute_ms = self._forward(order)
        out = WireTensor.from_torch(y)
        result = pb.WorkResult(
            session_id=order.session_id,
            step=order.step,
            start_position=order.start_position,
            output=out.to_proto(),
            compute_ms=compute_ms,
        )
        if self.identity is not None:
            result.receipt.CopyFrom(self._sign(order, inp, out))
        return result

    def _forward(self, order: pb.WorkOrder) -> tuple[WireTensor, torch.Tensor, float]:
        """The checked order through the stage: (input as received, output rows on the CPU, ms)."""
        check_session_id(order.session_id)
        if not 0 <= order.step < 2**63:  # receipts sign it as a signed 64-bit field: refuse before any work
            raise InvalidRequestError(f"step {order.step} outside 0..2^63-1")
        check_layers(order.layers, self.layers)
        if order.all_logits and not self.stage.is_last:
            raise InvalidRequestError(f"all_logits asked of layers {self.layers}, which do not end the model")
        entry = self.pool.entry(order.session_id)  # UnknownSessionError -> NOT_FOUND
        cache = entry.cache
        if self.stage.is_first:
            inp, x = decode_tokens(order.input, self.args.vocab_size, max_rows=cache.capacity)
        else:
            inp, x = decode_hidden(order.input, self.args.dim, max_rows=cache.capacity)
        with entry.lock:
            if order.start_position != cache.length:
                raise OutOfSyncError(
                    f"session {order.session_id} on layers {self.layers} is out of sync: expected position "
                    f"{cache.length}, work order starts at {order.start_position}",
                    expected=cache.length,
                )
            end = cache.length + x.shape[0]
            if end > cache.capacity:
                raise OutOfRangeError(
                    f"positions {cache.length}..{end - 1} exceed the {cache.capacity} positions session "
                    f"{order.session_id} reserved"
                )
            with self._compute:
                t0 = time.perf_counter()
                y = self.stage(x, cache, all_logits=order.all_logits).cpu()
                return inp, y, (time.perf_counter() - t0) * 1000

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


def set_threads(threads: int) -> None:
    """Pins torch's intra-op threads (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
