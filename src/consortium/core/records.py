"""Typed records of what happened to a session: failovers, rollbacks, audit counts, stage
statistics and the final report. Loop, ledger, server and client all use these; this is
the one place where they are converted to and from protobuf messages and ledger dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from consortium.core.config import LayerRange
from consortium.transport.proto import consortium_pb2 as pb


def _to_proto(message, record, **override):
    """A proto message from a record whose field names it shares (`override`: those it doesn't)."""
    return message(**{**{f.name: getattr(record, f.name) for f in fields(record)}, **override})


def _from_dict(cls, d: dict):
    """A record from a stored dict; keys the record does not know are ignored, missing ones
    take the field's default (a ledger written by an older version)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ReplayCheck:
    """A failed-over stage's replay compared with its committed outputs (a free audit)."""

    passed: bool
    worst_rel_l2: float
    tolerance: str
    first_bad_position: int | None = None

    def to_proto(self) -> pb.ReplayCheck:
        m = pb.ReplayCheck(passed=self.passed, worst_rel_l2=self.worst_rel_l2, tolerance=self.tolerance)
        if self.first_bad_position is not None:
            m.first_bad_position = self.first_bad_position
        return m

    @classmethod
    def from_proto(cls, m: pb.ReplayCheck) -> ReplayCheck:
        bad = m.first_bad_position if m.HasField("first_bad_position") else None
        return cls(m.passed, m.worst_rel_l2, m.tolerance, bad)


@dataclass(frozen=True)
class FailoverRecord:
    """A stage's node died or hung; `backup_node` took its layers and replayed its inputs."""

    stage: int
    token_index: int  # tokens generated before it
    failed_node: str
    backup_node: str
    latency_ms: float  # detection to the replacement being ready
    replay_ms: float = 0.0  # of which: the replay prefill
    replayed_positions: int = 0
    load_ms: float = 0.0  # of which: choosing the backup, a standby loading the layers
    error: str = ""  # how the failed node failed
    position: int = 0  # the step's first position
    replay_check: ReplayCheck | None = None

    def to_proto(self) -> pb.FailoverEvent:
        check = self.replay_check.to_proto() if self.replay_check is not None else None
        return _to_proto(pb.FailoverEvent, self, replay_check=check)

    @classmethod
    def from_proto(cls, m: pb.FailoverEvent) -> FailoverRecord:
        check = ReplayCheck.from_proto(m.replay_check) if m.HasField("replay_check") else None
        return cls(
            m.stage,
            m.token_index,
            m.failed_node,
            m.backup_node,
            m.latency_ms,
            m.replay_ms,
            m.replayed_positions,
            m.load_ms,
            m.error,
            m.position,
            check,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FailoverRecord:
        check = d.get("replay_check")
        return _from_dict(cls, {**d, "replay_check": _from_dict(ReplayCheck, check) if check else None})


@dataclass(frozen=True)
class RollbackRecord:
    """A failed audit or bad receipt: the session went back to `position` and the stage moved."""

    stage: int
    position: int
    node: str  # the node caught
    reason: str
    kept_tokens: int  # generated tokens that stand
    new_node: str  # who runs the stage now

    def to_proto(self) -> pb.RollbackEvent:
        m = pb.RollbackEvent(stage=self.stage, position=self.position, reason=self.reason)
        m.node_id, m.kept_tokens, m.new_node_id = self.node, self.kept_tokens, self.new_node
        return m

    @classmethod
    def from_proto(cls, m: pb.RollbackEvent) -> RollbackRecord:
        return cls(m.stage, m.position, m.node_id, m.reason, m.kept_tokens, m.new_node_id)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RollbackRecord:
        return _from_dict(cls, d)


@dataclass(frozen=True)
class AuditCounts:
    total: int = 0
    passed: int = 0
    failed: int = 0
    pending: int = 0  # still running when the session ended (--no-wait-audits)

    def to_proto(self) -> pb.AuditSummary:
        return _to_proto(pb.AuditSummary, self)

    @classmethod
    def from_proto(cls, m: pb.AuditSummary) -> AuditCounts:
        return cls(m.total, m.passed, m.failed, m.pending)


@dataclass(frozen=True)
class StageRef:
    """One stage of a session's pipeline: which node runs which layers."""

    index: int
    node_id: str
    address: str
    layers: LayerRange
    device: str
    dtype: str
    local: bool
    packed: bool = False  # 4-bit weights kept packed: an auditor recomputes in the same form

    def to_proto(self) -> pb.StageInfo:
        layers = pb.LayerRange(start=self.layers.start, end=self.layers.end)
        info = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "packed"}  # not on the wire
        return pb.StageInfo(**{**info, "layers": layers})


@dataclass(frozen=True)
class StageStats:
    stage: StageRef
    prefill_ms: float
    mean_step_ms: float
    mean_compute_ms: float
    steps: int
    bytes_sent: int
    bytes_received: int
    mean_batch: float = 1.0

    def to_proto(self) -> pb.StageStats:
        return _to_proto(pb.StageStats, self, stage=self.stage.to_proto())


@dataclass(frozen=True)
class StageReport:
    """A stage's statistics as the client reports them (JSON: layers as [start, end))."""

    index: int
    node_id: str
    address: str
    layers: list[int]  # [start, end), half-open
    device: str
    dtype: str
    local: bool
    mean_step_ms: float  # mean decode round trip as the coordinator saw it
    mean_compute_ms: float  # mean decode forward time as the node reported it
    prefill_ms: float
    steps: int
    bytes_sent: int
    bytes_received: int
    mean_batch: float  # sessions per decode forward on the node (continuous batching)

    @classmethod
    def from_proto(cls, s: pb.StageStats) -> StageReport:
        i = s.stage
        layers = [i.layers.start, i.layers.end]
        stats = (s.mean_step_ms, s.mean_compute_ms, s.prefill_ms, s.steps, s.bytes_sent, s.bytes_received)
        stats += (s.mean_batch or 1.0,)
        return cls(i.index, i.node_id, i.address, layers, i.device, i.dtype, i.local, *stats)


@dataclass(frozen=True)
class SessionReport:
    """The result of `session run`: the keys of `consortium generate --json` plus the pipeline's."""

    tokens: list[int]
    text: str
    prompt_tokens: int
    tokens_per_second: float
    time_to_first_token_s: float
    session_id: str
    stop_reason: str
    stages: list[StageReport]
    audits: AuditCounts
    rollbacks: list[RollbackRecord]
    banned_nodes: list[str]
    failovers: list[FailoverRecord]
    verification: str = "strict"  # the weakest numeric class among its stages
    verification_note: str = ""  # what that class cannot catch (loose: weaker verification)

    @classmethod
    def from_proto(cls, m: pb.SessionSummary) -> SessionReport:
        return cls(
            tokens=list(m.tokens),
            text=m.text,
            prompt_tokens=m.prompt_tokens,
            tokens_per_second=m.tokens_per_second,
            time_to_first_token_s=m.time_to_first_token_s,
            session_id=m.session_id,
            stop_reason=m.stop_reason,
            stages=[StageReport.from_proto(x) for x in m.stages],
            audits=AuditCounts.from_proto(m.audits),
            rollbacks=[RollbackRecord.from_proto(r) for r in m.rollbacks],
            banned_nodes=list(m.banned_nodes),
            failovers=[FailoverRecord.from_proto(f) for f in m.failovers],
            verification=m.verification or "strict",
            verification_note=m.verification_note,
        )

    def to_dict(self) -> dict:
        return asdict(self)
