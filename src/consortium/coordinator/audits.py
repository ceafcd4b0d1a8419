"""Audit bookkeeping per session, and the pool that runs audits.

Each session's audits run one at a time, in order (its auditors keep KV caches that each
audit extends), on a small pool shared by all sessions: a slow remote audit of one session
never holds up another's. Every change to a session's audit state happens under its lock
(the token loop, the audit pool and gRPC heartbeat threads all read it).
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from consortium.coordinator.audit_targets import Target, audit_session_id
from consortium.core.records import AuditCounts, StageRef
from consortium.core.session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fraud:
    """Where a session must go back to, and who is to blame."""

    stage: int
    position: int  # first position whose committed output is bad
    node_id: str
    reason: str


@dataclass
class SessionAudits:
    """Audit state of one session."""

    session_id: str
    rng: random.Random  # which units are audited (the token loop draws)
    probability: float
    coverage: str = "full"  # core.config.AUDIT_COVERAGES
    recheck_rng: random.Random = field(default_factory=secrets.SystemRandom)  # the audit pool draws
    requested: dict[int, list[int]] = field(default_factory=dict)  # stage -> audited unit end positions
    requested_to: dict[int, int] = field(default_factory=dict)  # stage -> latest end ever requested
    drawn: dict[int, bool] = field(default_factory=dict)  # sampled coverage: stage -> checked at all
    verified_to: dict[int, int] = field(default_factory=dict)  # stage -> end of its rows audits passed
    passed: int = 0
    failed: int = 0
    unverified: int = 0  # units no auditor could take (refused by the coordinator's audit budget)
    fraud: Fraud | None = None
    caught: set[str] = field(default_factory=set)  # nodes already rolled back and replaced
    targets: dict[int, Target] = field(default_factory=dict)  # stage -> its auditor
    lost_auditors: set[str] = field(default_factory=set)  # remote auditors that died or lied
    ended: bool = False  # the token loop is done: close the auditors once audits drain
    rewind_to: int | None = None  # a rollback's position, applied before the next audit
    queue: deque[int] = field(default_factory=deque)  # stages waiting for an audit, in order
    draining: bool = False  # a pool thread is running this session's queue
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self.requested.values())

    def counts(self) -> AuditCounts:
        with self.lock:
            pending = self.pending
            return AuditCounts(self.passed + self.failed + pending, self.passed, self.failed, pending)

    def settle(
        self, stage: int, ends: list[int], passed: int = 0, failed: int = 0, unverified: int = 0
    ) -> None:
        """Units `ends` of `stage` are judged (or withdrawn, or unverifiable): count them and wake waiters."""
        with self.lock:
            self.requested[stage] = [e for e in self.requested.get(stage, []) if e not in ends]
            self.passed += passed
            self.failed += failed
            self.unverified += unverified
            self.idle.notify_all()

    def secured_to(self, stages: Sequence[StageRef]) -> float:
        """The end of the session's rows that no audit can still roll back (inf: all of them):
        every stage a remote node serves, up to where its audits have passed (sampled coverage:
        a stage drawn out needs none, one not drawn yet all). None while a fraud awaits its
        rollback. A stage the coordinator serves needs none: its rows from a remote node were
        re-checked by the replay that moved it, or passed the audit that caught that node."""
        with self.lock:
            if self.fraud is not None:
                return 0
            if self.probability <= 0:
                return math.inf
            ends: list[float] = [math.inf]
            for i, ref in enumerate(stages):
                if ref.local or (self.coverage == "sampled" and self.drawn.get(i) is False):
                    continue
                ends.append(self.verified_to.get(i, 0))
            return min(ends)

    def set_target(self, stage: int, target: Target | None) -> None:
        with self.lock:
            if target is None:
                self.targets.pop(stage, None)
            else:
                self.targets[stage] = target

    def lose(self, stage: int, node_id: str) -> None:
        """A remote auditor died or lied: drop it, and never pick it again for this session."""
        with self.lock:
            self.targets.pop(stage, None)
            self.lost_auditors.add(node_id)

    def remote_sessions(self, node_id: str) -> set[str]:
        """The audit sessions `node_id` keeps for this session (heartbeats must not drop them)."""
        with self.lock:
            return {
                audit_session_id(self.session_id, i)
                for i, t in self.targets.items()
                if t.remote and t.node_id == node_id
            }


class AuditPool:
    """Runs `audit(session, stage)` jobs: serially per session, sessions in parallel;
    `idle(session)` when a session's queue has drained."""

    def __init__(self, workers: int, audit: Callable[[Session, int], None], idle: Callable[[Session], None]):
        self._audit, self._idle = audit, idle
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="audit")
        self._stopped = threading.Event()

    def submit(self, session: Session, stage: int, first: bool = False) -> None:
        audits = session.audits
        with audits.lock:
            if first:
                audits.queue.appendleft(stage)
            else:
                audits.queue.append(stage)
            if audits.draining or self._stopped.is_set():
                return
            audits.draining = True
        self._pool.submit(self._drain, session)

    def _drain(self, session: Session) -> None:
        audits = session.audits
        while True:
            with audits.lock:
                done = not audits.queue or self._stopped.is_set()
                if done:
                    audits.draining = False
                else:
                    stage = audits.queue.popleft()
            if done:
                self._idle(session)
                return
            self._audit(session, stage)

    def stop(self) -> None:
        self._stopped.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
