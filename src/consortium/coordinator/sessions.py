"""The coordinator's sessions: the running and recently finished ones in memory, older
ones read back from the ledger (e.g. after a restart)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from consortium.core.config import CoordinatorConfig
from consortium.core.records import FailoverRecord
from consortium.core.session import RESUMABLE, RUNNING, Session, SessionNotFoundError
from consortium.errors import CacheError
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.verification.ledger import Ledger


def stages_record(session: Session) -> list[dict]:
    """A session's pipeline as the ledger stores it."""
    return [{"node": r.node_id, "layers": [r.layers.start, r.layers.end]} for r in session.stages]


class SessionTable:
    def __init__(self, cfg: CoordinatorConfig, ledger: Ledger, tokenizer: GGUFTokenizer):
        self.cfg, self.ledger, self.tokenizer = cfg, ledger, tokenizer
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def running(self) -> int:
        return sum(s.state == RUNNING for s in self.all())

    def check_capacity(self) -> None:
        running = self.running()
        if running >= self.cfg.max_sessions:
            raise CacheError(
                f"{running} sessions running; the coordinator takes at most {self.cfg.max_sessions}"
            )

    def add(self, session: Session) -> None:
        with self._lock:
            self._sessions[session.session_id] = session
            self._sessions.move_to_end(session.session_id)
        self.trim()

    def get(self, session_id: str) -> Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise SessionNotFoundError(f"unknown session {session_id!r}")
        return s

    def find(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def trim(self) -> None:
        """Forget the oldest finished sessions, and the committed history of older ones."""
        with self._lock:
            done = [s for s in self._sessions.values() if s.state != RUNNING]
            for s in done[: max(0, len(done) - self.cfg.keep_finished)]:
                del self._sessions[s.session_id]
        for s in done[: max(0, len(done) - self.cfg.keep_history)]:
            if s.frozen_stats is None:
                s.drop_history()

    def live_on(self, node_id: str) -> set[str]:
        """Session ids the node should keep caches for: running sessions it serves, and the
        audit sessions it keeps as a remote auditor."""
        live: set[str] = set()
        for s in self.all():
            if s.state == RUNNING and any(r.node_id == node_id for r in s.stages):
                live.add(s.session_id)
            if s.audits is not None:
                live |= s.audits.remote_sessions(node_id)
        return live

    def status(self, session_id: str) -> pb.SessionStatus:
        s = self.find(session_id)
        if s is None:
            return self._ledger_status(session_id)
        end = s.finished if s.finished is not None else time.monotonic()
        return pb.SessionStatus(
            session_id=s.session_id,
            state=s.state,
            prompt_tokens=len(s.prompt_ids),
            generated_tokens=len(s.tokens),
            max_tokens=s.max_tokens,
            position=s.position,
            stages=[x.to_proto() for x in s.stats()],
            error=s.error,
            age_s=end - s.created,
            tokens_per_second=s.tokens_per_second,
            tokens=s.tokens,
            text=self.tokenizer.decode(s.tokens),
            failovers=[f.to_proto() for f in s.failovers],
            resumable=s.state in RESUMABLE and len(s.tokens) < s.max_tokens,
        )

    def _ledger_status(self, session_id: str) -> pb.SessionStatus:
        """A session this process never ran (e.g. before a restart): read back from the ledger."""
        rec = self.ledger.session(session_id)
        if rec is None:
            raise SessionNotFoundError(f"unknown session {session_id!r}")
        tokens, max_tokens, status = rec["tokens"], rec["params"]["max_tokens"], rec["status"]
        failovers = [
            FailoverRecord.from_dict(e).to_proto() for e in self.ledger.events(session_id, "failover")
        ]
        return pb.SessionStatus(
            session_id=session_id,
            state=status,
            prompt_tokens=len(rec["prompt_ids"]),
            generated_tokens=len(tokens),
            max_tokens=max_tokens,
            position=0,
            error=rec["error"] or "",
            age_s=max(0.0, time.time() - rec["created"]),
            tokens=tokens,
            text=self.tokenizer.decode(tokens),
            failovers=failovers,
            resumable=status in RESUMABLE and len(tokens) < max_tokens,
        )
