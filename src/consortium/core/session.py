"""Session state on the coordinator, including the committed history of every stage.

The coordinator drives every step, so it sees each stage's exact input and output
bytes. It keeps them per session and stage (`StageHistory`): audits recompute a stage
from its committed inputs and compare with its committed outputs, and failover replays
the inputs into a replacement node.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from consortium.core.config import SessionRequest
from consortium.core.records import FailoverRecord, RollbackRecord, StageRef, StageStats
from consortium.core.spill import SpilledTensor, SpillFile
from consortium.transport.rpc import NotFoundError
from consortium.transport.tensors import WireTensor

if TYPE_CHECKING:  # the coordinator's audit state; core does not import the coordinator
    from consortium.coordinator.audits import SessionAudits

__all__ = ["Session", "SessionNotFoundError", "StageHistory", "StageRef", "StageStats", "StepRecord"]


class SessionNotFoundError(NotFoundError):
    """No session with this id on the coordinator."""


@dataclass(frozen=True)
class StepRecord:
    """What one stage consumed and produced in one step, byte for byte."""

    step: int
    start_position: int
    input: WireTensor
    # None: the logits of the coordinator's own last stage (not kept); spilled: a remote last
    # stage's logits (on disk until an audit reads them, core/spill.py)
    output: WireTensor | SpilledTensor | None
    node_id: str
    round_trip_ms: float
    compute_ms: float
    batch_size: int = 1  # orders in the node's forward that computed it
    output_bytes: int = 0  # the output's size, kept when the output is not

    @property
    def positions(self) -> range:
        return range(self.start_position, self.start_position + self.input.rows)

    def committed(self) -> WireTensor:
        """The output's bytes as the stage committed them (read back if they were spilled)."""
        if self.output is None:
            raise ValueError(f"step {self.step}'s output was not kept (the coordinator's own logits)")
        return self.output.load() if isinstance(self.output, SpilledTensor) else self.output


@dataclass
class StageHistory:
    stage: StageRef
    steps: list[StepRecord] = field(default_factory=list)

    def append(self, rec: StepRecord) -> None:
        if self.steps and rec.start_position != self.steps[-1].positions.stop:
            raise ValueError(f"step {rec.step} of stage {self.stage.index} does not continue the history")
        self.steps.append(rec)

    def inputs_until(self, position: int) -> list[StepRecord]:
        """The records whose positions start before `position` (what a replay to there needs)."""
        return [r for r in self.steps if r.start_position < position]

    def stats(self) -> StageStats:
        decode = self.steps[1:]
        return StageStats(
            stage=self.stage,
            prefill_ms=self.steps[0].round_trip_ms if self.steps else 0.0,
            mean_step_ms=_mean([r.round_trip_ms for r in decode]),
            mean_compute_ms=_mean([r.compute_ms for r in decode]),
            steps=len(self.steps),
            bytes_sent=sum(r.input.nbytes for r in self.steps),
            bytes_received=sum(
                r.output.nbytes if r.output is not None else r.output_bytes for r in self.steps
            ),
            mean_batch=_mean([r.batch_size for r in decode]) or 1.0,
        )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"
INTERRUPTED = "interrupted"  # the coordinator stopped while it ran: `consortium session resume`
RESUMABLE = frozenset({FAILED, CANCELLED, INTERRUPTED})


@dataclass
class Session:
    session_id: str
    request: SessionRequest
    prompt_ids: list[int]
    max_tokens: int  # after clipping to the model's context
    stages: list[StageRef]
    state: str = RUNNING
    tokens: list[int] = field(default_factory=list)
    position: int = 0  # tokens in every stage's KV cache
    error: str = ""
    stop_reason: str = ""
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    time_to_first_token_s: float = 0.0
    tokens_per_second: float = 0.0
    history: list[StageHistory] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    frozen_stats: list[StageStats] | None = None  # set when the history is dropped
    spill: SpillFile | None = None  # where a remote last stage's logits go (made at the first)
    audits: SessionAudits | None = None  # set by the coordinator when the session starts
    rollbacks: list[RollbackRecord] = field(default_factory=list)
    failovers: list[FailoverRecord] = field(default_factory=list)
    unsent_failovers: list[FailoverRecord] = field(default_factory=list)  # not yet streamed
    resumed: int = 0  # tokens generated before a coordinator restart (a resumed session)
    first_step: int = 0  # step number of the first step this coordinator runs
    client: str = ""  # who asked for it (its key or address): per-client limits

    def __post_init__(self) -> None:
        if not self.history:
            self.history = [StageHistory(s) for s in self.stages]

    @property
    def capacity(self) -> int:
        """KV positions each stage reserves (as `generate`: prompt + max new tokens)."""
        return len(self.prompt_ids) + self.max_tokens

    def stats(self) -> list[StageStats]:
        if self.frozen_stats is not None:
            return self.frozen_stats
        return [h.stats() for h in self.history]

    def finish(self, state: str, error: str = "") -> None:
        self.state, self.error, self.finished = state, error, time.monotonic()

    def drop_history(self) -> None:
        """Free the committed bytes of a finished session; its statistics stay."""
        self.frozen_stats = self.stats()
        for h in self.history:
            h.steps = []
        if self.spill is not None:  # its file goes with the last record that points into it
            self.spill.release()
        self.spill = None
