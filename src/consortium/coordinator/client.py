"""Client of the coordinator: run a session (streaming), ask for session and cluster status."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import grpc

from consortium.core.config import ClientConfig, SessionRequest
from consortium.errors import ConsortiumError
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import RemoteError, check_address, make_channel, wait_ready


@dataclass(frozen=True)
class StageReport:
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

    @classmethod
    def from_proto(cls, s: pb.StageStats) -> StageReport:
        i = s.stage
        return cls(
            index=i.index, node_id=i.node_id, address=i.address, layers=[i.layers.start, i.layers.end],
            device=i.device, dtype=i.dtype, local=i.local, mean_step_ms=s.mean_step_ms,
            mean_compute_ms=s.mean_compute_ms, prefill_ms=s.prefill_ms, steps=s.steps,
            bytes_sent=s.bytes_sent, bytes_received=s.bytes_received,
        )  # fmt: skip


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
    audits: dict  # total, passed, failed, pending
    rollbacks: list[dict]  # stage, position, node, reason, kept_tokens, new_node
    banned_nodes: list[str]
    failovers: list[dict]  # stage, token_index, failed_node, backup_node, latency_ms, replay_ms, ...

    def to_dict(self) -> dict:
        return asdict(self)


class Client:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.address = check_address(cfg.coordinator)
        self.peer = f"coordinator at {self.address}"
        self.channel = make_channel(self.address, cfg.max_message_bytes)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self._ready = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _connect(self) -> None:
        if not self._ready:
            wait_ready(self.channel, self.peer, self.cfg.connect_timeout_s)
            self._ready = True

    def _call(self, method, request, timeout_s: float | None = 30.0):
        self._connect()
        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e, self.peer) from e

    def run(
        self,
        req: SessionRequest,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[pb.SessionStarted], None] | None = None,
        on_rollback: Callable[[pb.RollbackEvent], None] | None = None,
        on_failover: Callable[[pb.FailoverEvent], None] | None = None,
    ) -> SessionReport:
        """Runs a session to its end, calling on_text with each text delta as tokens stream in."""
        s = req.sampling
        msg = pb.GenerateRequest(
            prompt=req.prompt, max_tokens=req.max_tokens, no_chat=not req.chat,
            sampling=pb.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed),
            no_wait_audits=not req.wait_audits,
        )  # fmt: skip
        if req.audit_probability is not None:
            msg.audit_probability = req.audit_probability
        if req.audit_seed is not None:
            msg.audit_seed = req.audit_seed
        self._connect()
        return self._consume(self.stub.Generate(msg), on_text, on_start, on_rollback, on_failover)

    def resume(
        self,
        session_id: str,
        wait_audits: bool = True,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[pb.SessionStarted], None] | None = None,
        on_rollback: Callable[[pb.RollbackEvent], None] | None = None,
        on_failover: Callable[[pb.FailoverEvent], None] | None = None,
    ) -> SessionReport:
        """Continues an interrupted session; on_text sees only the new text (the text generated
        before is in the `started` event's resumed_text)."""
        self._connect()
        msg = pb.ResumeRequest(session_id=session_id, no_wait_audits=not wait_audits)
        return self._consume(self.stub.Resume(msg), on_text, on_start, on_rollback, on_failover)

    def _consume(self, stream, on_text, on_start, on_rollback, on_failover) -> SessionReport:
        summary = None
        try:
            for ev in stream:
                kind = ev.WhichOneof("event")
                if kind == "started" and on_start is not None:
                    on_start(ev.started)
                elif kind == "token" and on_text is not None:
                    on_text(ev.token.text)
                elif kind == "rollback" and on_rollback is not None:
                    on_rollback(ev.rollback)
                elif kind == "failover" and on_failover is not None:
                    on_failover(ev.failover)
                elif kind == "done":
                    summary = ev.done
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e, self.peer) from e
        finally:
            stream.cancel()  # no-op after a normal end; stops the session on Ctrl-C
        if summary is None:
            raise ConsortiumError(f"{self.peer} ended the session without a summary")
        return SessionReport(
            tokens=list(summary.tokens), text=summary.text, prompt_tokens=summary.prompt_tokens,
            tokens_per_second=summary.tokens_per_second, time_to_first_token_s=summary.time_to_first_token_s,
            session_id=summary.session_id, stop_reason=summary.stop_reason,
            stages=[StageReport.from_proto(x) for x in summary.stages],
            audits={"total": summary.audits.total, "passed": summary.audits.passed,
                    "failed": summary.audits.failed, "pending": summary.audits.pending},
            rollbacks=[rollback_dict(r) for r in summary.rollbacks],
            banned_nodes=list(summary.banned_nodes), failovers=[failover_dict(f) for f in summary.failovers],
        )  # fmt: skip

    def session_status(self, session_id: str) -> dict:
        st = self._call(self.stub.GetSession, pb.SessionStatusRequest(session_id=session_id))
        return {
            "session_id": st.session_id, "state": st.state, "prompt_tokens": st.prompt_tokens,
            "generated_tokens": st.generated_tokens, "max_tokens": st.max_tokens, "position": st.position,
            "tokens_per_second": st.tokens_per_second, "age_s": st.age_s, "error": st.error,
            "stages": [asdict(StageReport.from_proto(x)) for x in st.stages], "tokens": list(st.tokens),
            "text": st.text, "failovers": [failover_dict(f) for f in st.failovers], "resumable": st.resumable,
        }  # fmt: skip

    def cluster_status(self) -> dict:
        st = self._call(self.stub.GetStatus, pb.ClusterStatusRequest())
        nodes = []
        for ns in st.nodes:
            n = ns.node
            nodes.append({
                "node_id": n.node_id, "address": n.address, "alive": ns.alive, "local": ns.local,
                "layers": [n.layers.start, n.layers.end] if n.HasField("layers") else None,
                "device": n.device, "dtype": n.dtype, "speed_gflops": n.speed_gflops,
                "memory_bytes": n.memory_bytes, "heartbeat_age_s": ns.heartbeat_age_s, "role": ns.role,
            })  # fmt: skip
        route = [
            {
                "index": r.index,
                "node_id": r.node_id,
                "layers": [r.layers.start, r.layers.end],
                "device": r.device,
            }
            for r in st.route
        ]
        return {
            "model_digest": st.model_digest, "n_layers": st.n_layers, "nodes": nodes, "route": route,
            "placement_error": st.placement_error, "flexible_pending": st.flexible_pending,
            "active_sessions": st.active_sessions,
        }  # fmt: skip


def rollback_dict(r: pb.RollbackEvent) -> dict:
    return {"stage": r.stage, "position": r.position, "node": r.node_id, "reason": r.reason,
            "kept_tokens": r.kept_tokens, "new_node": r.new_node_id}  # fmt: skip


def failover_dict(f: pb.FailoverEvent) -> dict:
    return {"stage": f.stage, "token_index": f.token_index, "failed_node": f.failed_node,
            "backup_node": f.backup_node, "latency_ms": f.latency_ms, "replay_ms": f.replay_ms,
            "replayed_positions": f.replayed_positions, "load_ms": f.load_ms, "error": f.error}  # fmt: skip


def format_report(report: SessionReport) -> list[str]:
    """Human-readable summary lines: totals, then one line per stage."""
    lines = [
        f"[{len(report.tokens)} tokens, {report.tokens_per_second:.1f} tok/s, first token "
        f"{report.time_to_first_token_s * 1000:.0f} ms, stop: {report.stop_reason}, session {report.session_id}]"
    ]
    a = report.audits
    lines.append(f"  audits: {a['total']} ({a['passed']} passed, {a['failed']} failed, {a['pending']} pending)"
                 + (f"; banned: {', '.join(report.banned_nodes)}" if report.banned_nodes else ""))  # fmt: skip
    for r in report.rollbacks:
        lines.append(f"  rollback: stage {r['stage']} at position {r['position']}: {r['node']} ({r['reason']}); "
                     f"now on {r['new_node']}")  # fmt: skip
    for f in report.failovers:
        lines.append(f"  failover: stage {f['stage']} at token {f['token_index']}: {f['failed_node']} failed; "
                     f"now on {f['backup_node']} (ready in {f['latency_ms']:.0f} ms)")  # fmt: skip
    for s in report.stages:
        where = "coordinator" if s.local else s.address
        lines.append(
            f"  stage {s.index}: {s.node_id:<16} layers {s.layers[0]}-{s.layers[1]:<4} {s.device}/{s.dtype:<5} "
            f"step {s.mean_step_ms:6.2f} ms (compute {s.mean_compute_ms:6.2f} ms), prefill {s.prefill_ms:6.1f} ms  "
            f"[{where}]"
        )
    return lines
