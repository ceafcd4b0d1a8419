"""Continuous batching at one stage: the sessions' token loops hand it their work orders, and
whenever the stage is free every order waiting goes to it in one call.

There is no dispatcher thread and no global lock step. The session thread that finds the
stage idle leads: it sends what is waiting (its own order included) and hands each session
its own result or error, while orders that arrive meanwhile wait for the next call. So a
stage is never idle while an order waits for it, and sessions at different stages overlap
(the last stage works on A's token while the first works on B's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from consortium.transport.proto import consortium_pb2 as pb

# One call for a batch: each order's result or the exception that failed it, in order.
BatchCall = Callable[[list[pb.WorkOrder], float], list[pb.WorkResult | Exception]]


@dataclass
class _Waiting:
    order: pb.WorkOrder
    timeout_s: float
    result: pb.WorkResult | Exception | None = None
    done: bool = False
    ready: threading.Event = field(default_factory=threading.Event)


class Batcher:
    def __init__(self, call: BatchCall, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} < 1")
        self.call, self.max_batch = call, max_batch
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._busy = False
        self.batches = 0  # calls made (with `orders`: the mean batch size)
        self.orders = 0

    def execute(self, order: pb.WorkOrder, timeout_s: float) -> pb.WorkResult:
        me = _Waiting(order, timeout_s)
        with self._lock:
            self._waiting.append(me)
        while not me.done:
            batch = self._lead()
            if batch is None:  # a call is running: ours is in it, or goes in the next one
                me.ready.wait()
                me.ready.clear()  # set again when our result is in, or when it is our turn to lead
            else:
                self._run(batch)
        if isinstance(me.result, Exception):
            raise me.result
        assert me.result is not None
        return me.result

    def _lead(self) -> list[_Waiting] | None:
        """The orders waiting (up to max_batch) if the stage is free, which makes this thread
        the one that sends them; None while another call runs."""
        with self._lock:
            if self._busy or not self._waiting:
                return None
            self._busy = True
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            return batch

    def _run(self, batch: list[_Waiting]) -> None:
        try:
            try:
                results = self.call([w.order for w in batch], max(w.timeout_s for w in batch))
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)} orders")
            except Exception as e:  # the whole call failed (the node is down, say): every order did
                results = [e] * len(batch)
            self.batches, self.orders = self.batches + 1, self.orders + len(batch)
            for w, r in zip(batch, results, strict=True):
                w.result, w.done = r, True
                w.ready.set()
        finally:
            with self._lock:
                self._busy = False
                nxt = self._waiting[0] if self._waiting else None
            if nxt is not None:  # wake a waiting session to lead the next call
                nxt.ready.set()
