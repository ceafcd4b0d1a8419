"""When generated text may go out to an HTTP client, and where a stop string ends it.

Verified release holds each token until no audit can roll it back any more: every row it
depends on passed its stage's audits (SessionAudits.secured_to: between two audits of a stage
its newest rows are unchecked, and a later audit may still fail on them), no fraud waits for
its rollback, and every rollback started has reached this stream (a rollback clears the fraud
before its event is queued behind the tokens it withdraws; `audits.caught` grows at that same
moment, so counting it closes the gap).
Optimistic release sends each token at once; a rollback that withdraws sent text ends the
stream with an error (`Retracted`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consortium.core.records import RollbackRecord


class Retracted(Exception):
    """A rollback withdrew text already sent (optimistic release only)."""

    def __init__(self, rollback: RollbackRecord, sent: int):
        self.rollback, self.sent = rollback, sent
        super().__init__(
            f"rollback: stage {rollback.stage} node {rollback.node} was caught ({rollback.reason}); the "
            f"session went back to position {rollback.position}, withdrawing {sent - rollback.kept_tokens} "
            f"of the {sent} tokens sent (now on {rollback.new_node})"
        )


def secured_tokens(session, rollbacks_seen: int) -> float:
    """How many of the session's tokens no audit can still roll back (a core Session): token k
    was sampled from row prompt + k - 1, so it stands once rows [0, prompt + k) do. None while a
    rollback is on its way to this stream."""
    audits = session.audits
    with audits.lock:
        if len(audits.caught) != rollbacks_seen:
            return 0
    return audits.secured_to(session.stages) - len(session.prompt_ids) + 1


@dataclass
class Releaser:
    verified: bool
    released: int = 0  # tokens sent
    held: list[str] = field(default_factory=list)  # text deltas of the tokens not yet sent, one per token
    rollbacks_seen: int = 0

    def token(self, text: str) -> None:
        self.held.append(text)

    def rollback(self, ev: RollbackRecord) -> None:
        """Drops the withdrawn tokens; Retracted if some of them were sent."""
        self.rollbacks_seen += 1
        if ev.kept_tokens < self.released:
            raise Retracted(ev, self.released)
        del self.held[ev.kept_tokens - self.released :]

    def release(self, secured: float, final: bool = False) -> list[str]:
        """The text deltas that may go out now: verified, those of the first `secured` tokens
        (secured_tokens); all of them at the session's end, or optimistic."""
        n = len(self.held)
        if self.verified and not final:
            n = int(max(0, min(n, secured - self.released)))
        out, self.held = self.held[:n], self.held[n:]
        self.released += n
        return out


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that may go out; sets `stopped` when a stop string appeared."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
            return out
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.buf.endswith(s[:n])), default=0)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
