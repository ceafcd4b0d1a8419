"""Continuous batching at one stage: sessions submit their work orders with a callback, and
whenever the stage is free the orders waiting go to it in one call.

Each stage has a dispatcher thread that makes its calls, and one thread in the process runs
the callbacks with the results (the sessions' bookkeeping: check the receipt, order the next
stage, or sample and commit). A session thread is not woken per stage: the step moves from
stage to stage in callbacks, and the session's own thread only hears of tokens and trouble
(`coordinator/loop.py`). So sessions at different stages overlap (the last stage works on A's
token while the first works on B's) without a global lock step, and a stage's dispatcher
sends its next batch while the previous batch's results are still being checked.

Cohorts: the orders that a batch's callbacks submit reach the stages they go to together,
when the last callback of the batch has run (`cohort`), so the sessions of one call stay one
batch from stage to stage. A call carries at most 1/`in_flight` of the sessions using the stage
(and at most `max_batch`): the sessions form that many cohorts, and while one computes at a
stage the others are at other stages or in the coordinator's hands.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from consortium.transport.proto import consortium_pb2 as pb

log = logging.getLogger(__name__)
MEMBER_IDLE_S = 5.0  # a session that sent no order here for this long no longer counts (it moved)
DISPATCHER_IDLE_S = 30.0  # a stage's dispatcher thread ends after this long without orders
R = TypeVar("R")  # a result: a worker's pb.WorkResult, or the coordinator's own stage's runner.Work
# One call for a batch: each order's result or the exception that failed it, in order.
BatchCall = Callable[[list[pb.WorkOrder], float], list[R | Exception]]
Done = Callable[[R | Exception], None]  # an order's callback (run in the callback thread)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int  # orders one call carries at most
    in_flight: int = 1  # the batches the stage's sessions split into

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.in_flight < 1:
            raise ValueError(f"max_batch {self.max_batch} and in_flight {self.in_flight} must be at least 1")


@dataclass
class Queued(Generic[R]):
    """An order waiting for its stage, with its callback."""

    order: pb.WorkOrder
    timeout_s: float
    done: Done[R]


def rows(order: pb.WorkOrder) -> int:
    return order.input.shape[0] if order.input.shape else 0


def take(waiting: list[Queued[R]], size: int) -> tuple[list[Queued[R]], list[Queued[R]]]:
    """The next call's orders and those left waiting: the first `size` in arrival order, but at
    most one of several rows (a prefill or replay, computed on its own even in a batch), so that
    the sessions starting together move on one by one instead of each waiting for all of them."""
    batch: list[Queued[R]] = []
    rest: list[Queued[R]] = []
    wide = False
    for w in waiting:
        many = rows(w.order) > 1
        if len(batch) < size and not (many and wide):
            batch.append(w)
            wide = wide or many
        else:
            rest.append(w)
    return batch, rest


class _Held(threading.local):
    """Orders submitted by the callbacks of the batch this thread is finishing, per stage, and
    what they left for after those orders are out (`later`)."""

    orders: dict[Batcher, list[Queued]] | None = None
    later: list[Callable[[], None]] | None = None


_HELD = _Held()


@contextmanager
def cohort() -> Iterator[None]:
    """Orders submitted in this block reach their stages at its end, each stage's at once; then
    what the block left for `later` runs, in order."""
    if _HELD.orders is not None:  # nested: the outer block releases them
        yield
        return
    _HELD.orders, _HELD.later = {}, []
    try:
        yield
    finally:
        held, after = _HELD.orders, _HELD.later
        _HELD.orders = _HELD.later = None
        try:
            for batcher, items in held.items():
                batcher._add(items)
        finally:  # the sessions' threads hear of their tokens and trouble whatever happened
            for fn in after:
                fn()


def later(fn: Callable[[], None]) -> None:
    """Runs fn once the current cohort's orders are out (now, outside a cohort): work nothing
    waits for, such as waking a session's thread with its token, must not delay the next stage
    (a woken thread competes for the interpreter lock with the callbacks still to run)."""
    if _HELD.later is None:
        fn()
    else:
        _HELD.later.append(fn)


class _Callbacks:
    """The thread that runs every batch's callbacks, a batch at a time (inside `cohort`)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[Queued], list]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, items: list[Queued], results: list) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-callbacks", daemon=True)
                self._thread.start()
        self._jobs.put((items, results))

    def _run(self) -> None:
        while True:
            items, results = self._jobs.get()
            with cohort():
                for item, r in zip(items, results, strict=True):
                    try:
                        item.done(r)
                    except Exception:  # a callback's own bug must not stop everyone's
                        log.exception("batch callback for session %s failed", item.order.session_id)


CALLBACKS = _Callbacks()


class Batcher(Generic[R]):
    def __init__(self, call: BatchCall[R], policy: BatchPolicy, name: str = "stage"):
        self.call, self.policy, self.name = call, policy, name
        self._cond = threading.Condition()
        self._waiting: list[Queued[R]] = []
        self._members: dict[str, float] = {}  # session -> when it last sent an order here
        self._thread: threading.Thread | None = None
        self.batches = 0  # calls made (with `orders`: the mean batch size)
        self.orders = 0

    def submit(self, order: pb.WorkOrder, timeout_s: float, done: Done[R]) -> None:
        """Queues the order; `done` gets its result or error in the callback thread."""
        item = Queued(order, timeout_s, done)
        if _HELD.orders is not None:
            _HELD.orders.setdefault(self, []).append(item)
        else:
            self._add([item])

    def execute(self, order: pb.WorkOrder, timeout_s: float) -> R:
        """The order's result, waited for (audits, replays; never from a callback)."""
        box: list[R | Exception] = []
        ready = threading.Event()

        def done(r: R | Exception) -> None:
            box.append(r)
            ready.set()

        self._add([Queued(order, timeout_s, done)])
        ready.wait()  # the call has a deadline, and its dispatcher always answers
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def forget(self, session_id: str) -> None:
        """The session will not come (it ended, or moved to another node)."""
        with self._cond:
            self._members.pop(session_id, None)

    def _add(self, items: list[Queued[R]]) -> None:
        with self._cond:
            now = time.monotonic()
            for it in items:
                self._members[it.order.session_id] = now
            self._waiting.extend(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name=f"batch-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    if not self._cond.wait(DISPATCHER_IDLE_S) and not self._waiting:
                        self._thread = None
                        return
                batch, self._waiting = take(self._waiting, self._batch_size(time.monotonic()))
            self._run(batch)

    def _batch_size(self, now: float) -> int:
        """At most max_batch, and 1/in_flight of the sessions that use the stage lately."""
        self._members = {k: t for k, t in self._members.items() if t > now - MEMBER_IDLE_S}
        return max(1, min(self.policy.max_batch, math.ceil(len(self._members) / self.policy.in_flight)))

    def _run(self, batch: list[Queued[R]]) -> None:
        try:
            results = self.call([w.order for w in batch], max(w.timeout_s for w in batch))
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)} orders")
        except Exception as e:  # the whole call failed (the node is down, say): every order did
            results = [e] * len(batch)
        self.batches, self.orders = self.batches + 1, self.orders + len(batch)
        CALLBACKS.put(batch, results)
