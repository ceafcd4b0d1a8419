"""Continuous batching at one stage: the sessions' token loops hand it their work orders, and
whenever the stage is free the orders waiting go to it in one call.

There is no dispatcher thread and no global lock step. The session thread that finds the
stage idle leads: it sends what is waiting (its own order included) and hands each session
its own result or error, while orders that arrive meanwhile wait for the next call. So
sessions at different stages overlap (the last stage works on A's token while the first
works on B's).

Cohorts: the sessions of one call reach their next stage one by one (each checks its result,
samples, commits), a millisecond or two apart. Sent as they come, the first would go alone
and the rest after it, so batches would split into ever smaller ones that each cost nearly a
full pass over the weights. So a call's members are announced to the stage each goes to next
(`then`), and a free stage waits up to `gather_s` for the announced ones before it sends.

Batches in flight: one batch of every session would move through the pipeline in lock step,
one stage busy at a time. So a call carries at most 1/`in_flight` of the sessions using the
stage (and at most `max_batch`): the sessions form that many cohorts, and while one computes
at a stage the others are at other stages or in the coordinator's hands.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consortium.transport.proto import consortium_pb2 as pb

MEMBER_IDLE_S = 5.0  # a session that sent no order here for this long no longer counts (it moved)
R = TypeVar("R")  # a result: a worker's pb.WorkResult, or the coordinator's own stage's runner.Work
# One call for a batch: each order's result or the exception that failed it, in order.
BatchCall = Callable[[list[pb.WorkOrder], float], list[R | Exception]]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int  # orders one call carries at most
    gather_s: float = 0.0  # how long a free stage waits for sessions announced to it
    in_flight: int = 1  # the batches the stage's sessions split into

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.in_flight < 1:
            raise ValueError(f"max_batch {self.max_batch} and in_flight {self.in_flight} must be at least 1")
        if self.gather_s < 0:
            raise ValueError(f"gather_s {self.gather_s} < 0")


@dataclass
class _Waiting(Generic[R]):
    order: pb.WorkOrder
    timeout_s: float
    then: Batcher | None  # where this session goes after this call (announced when it returns)
    result: R | Exception | None = None
    done: bool = False
    ready: threading.Event = field(default_factory=threading.Event)


class Batcher(Generic[R]):
    def __init__(self, call: BatchCall[R], policy: BatchPolicy):
        self.call, self.policy = call, policy
        self._lock = threading.Lock()
        self._waiting: list[_Waiting[R]] = []
        self._expected: dict[str, float] = {}  # session -> when a call announced it is coming here
        self._members: dict[str, float] = {}  # session -> when it last sent an order here
        self._busy = False
        self.batches = 0  # calls made (with `orders`: the mean batch size)
        self.orders = 0

    def execute(self, order: pb.WorkOrder, timeout_s: float, then: Batcher | None = None) -> R:
        me: _Waiting[R] = _Waiting(order, timeout_s, then)
        with self._lock:
            self._expected.pop(order.session_id, None)
            self._members[order.session_id] = time.monotonic()
            self._waiting.append(me)
            head = self._waiting[0]
        if head is not me:  # the head may be gathering: one more of its cohort is here
            head.ready.set()
        while not me.done:
            batch, wait_s = self._lead()
            if batch is None:  # a call is running (ours is in it or goes in the next), or gathering
                me.ready.wait(wait_s)
                me.ready.clear()  # set again when our result is in, or when it is our turn to lead
            else:
                self._run(batch)
        if isinstance(me.result, Exception):
            raise me.result
        assert me.result is not None
        return me.result

    def expect(self, session_id: str) -> None:
        """The session's order is on its way here (its call at the previous stage returned)."""
        if self.policy.gather_s > 0:
            with self._lock:
                self._expected[session_id] = time.monotonic()

    def forget(self, session_id: str) -> None:
        """The session will not come (it ended, or moved to another node)."""
        with self._lock:
            self._expected.pop(session_id, None)
            self._members.pop(session_id, None)

    def _lead(self) -> tuple[list[_Waiting[R]] | None, float | None]:
        """(the orders to send, None) if the stage is free, which makes this thread the one that
        sends them; (None, seconds to wait at most) while it gathers announced sessions; (None,
        None) while another call runs."""
        with self._lock:
            if self._busy or not self._waiting:
                return None, None
            now = time.monotonic()
            if self._expected:  # announcements older than the gathering window are stale (it left)
                self._expected = {k: t for k, t in self._expected.items() if t > now - self.policy.gather_s}
            size = self._batch_size(now)
            if len(self._waiting) < size and self._expected:
                return None, min(self._expected.values()) + self.policy.gather_s - now
            self._busy = True
            batch, self._waiting = self._waiting[:size], self._waiting[size:]
            return batch, None

    def _batch_size(self, now: float) -> int:
        """At most max_batch, and 1/in_flight of the sessions that use the stage (lately or next)."""
        self._members = {k: t for k, t in self._members.items() if t > now - MEMBER_IDLE_S}
        sessions = len(self._members.keys() | self._expected.keys())
        return max(1, min(self.policy.max_batch, math.ceil(sessions / self.policy.in_flight)))

    def _run(self, batch: list[_Waiting[R]]) -> None:
        try:
            try:
                results = self.call([w.order for w in batch], max(w.timeout_s for w in batch))
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)} orders")
            except Exception as e:  # the whole call failed (the node is down, say): every order did
                results = [e] * len(batch)
            self.batches, self.orders = self.batches + 1, self.orders + len(batch)
            for w, r in zip(batch, results, strict=True):  # announced before anyone wakes
                if w.then is not None and not isinstance(r, Exception):
                    w.then.expect(w.order.session_id)
            for w, r in zip(batch, results, strict=True):
                w.result, w.done = r, True
                w.ready.set()
        finally:
            with self._lock:
                self._busy = False
                nxt = self._waiting[0] if self._waiting else None
            if nxt is not None:  # wake a waiting session to lead the next call
                nxt.ready.set()
