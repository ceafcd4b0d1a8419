"""Client of the coordinator: run a session (streaming), ask for session and cluster status."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict

import grpc

from consortium.core.config import ClientConfig, SessionRequest
from consortium.core.records import FailoverRecord, RollbackRecord, SessionReport, StageReport
from consortium.errors import ConsortiumError
from consortium.identity import NodeIdentity
from consortium.transport.auth import CoordinatorLink
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import RemoteError, check_address, wait_ready


class Client:
    """Connects on first use: TLS pinned to the coordinator's certificate (ClientConfig.coordinator_cert,
    else the data directory's pin, else trust on first use) or plain text (insecure); every call
    is signed with the key in the client's data directory (checked where --client-keys apply)."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.address = check_address(cfg.coordinator)
        self.peer = f"coordinator at {self.address}"
        self._link: CoordinatorLink | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._link is not None:
            self._link.close()

    @property
    def stub(self) -> pb_grpc.CoordinatorStub:
        with self._lock:
            if self._link is None:
                self._link = self._connect()
        return self._link.stub

    def _connect(self) -> CoordinatorLink:
        cfg = self.cfg
        identity = NodeIdentity.load_or_create(cfg.data_dir)
        link = CoordinatorLink(
            self.address,
            identity,
            cfg.insecure,
            cfg.coordinator_cert,
            cfg.data_dir,
            cfg.max_message_bytes,
            cfg.connect_timeout_s,
        )
        try:
            wait_ready(link.channel, self.peer, cfg.connect_timeout_s)
            link.challenge(cfg.connect_timeout_s)  # the coordinator's key: calls are signed for it
            return link
        except grpc.RpcError as e:
            link.close()
            raise RemoteError.from_rpc(e, self.peer) from e
        except BaseException:
            link.close()
            raise

    def _call(self, method_name: str, request, timeout_s: float | None = 30.0):
        method = getattr(self.stub, method_name)
        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e, self.peer) from e

    def run(
        self,
        req: SessionRequest,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[pb.SessionStarted], None] | None = None,
        on_rollback: Callable[[RollbackRecord], None] | None = None,
        on_failover: Callable[[FailoverRecord], None] | None = None,
    ) -> SessionReport:
        """Runs a session to its end, calling on_text with each text delta as tokens stream in."""
        s = req.sampling
        msg = pb.GenerateRequest(
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            no_chat=not req.chat,
            sampling=pb.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed),
            no_wait_audits=not req.wait_audits,
        )
        if req.audit_probability is not None:
            msg.audit_probability = req.audit_probability
        if req.audit_seed is not None:
            msg.audit_seed = req.audit_seed
        if req.audit_coverage is not None:
            msg.audit_coverage = req.audit_coverage
        return self._consume(self.stub.Generate(msg), on_text, on_start, on_rollback, on_failover)

    def resume(
        self,
        session_id: str,
        wait_audits: bool = True,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[pb.SessionStarted], None] | None = None,
        on_rollback: Callable[[RollbackRecord], None] | None = None,
        on_failover: Callable[[FailoverRecord], None] | None = None,
    ) -> SessionReport:
        """Continues an interrupted session; on_text sees only the new text (the text generated
        before is in the `started` event's resumed_text)."""
        msg = pb.ResumeRequest(session_id=session_id, no_wait_audits=not wait_audits)
        return self._consume(self.stub.Resume(msg), on_text, on_start, on_rollback, on_failover)

    def _consume(self, stream, on_text, on_start, on_rollback, on_failover) -> SessionReport:
        summary, sent = None, []
        try:
            for ev in stream:
                kind = ev.WhichOneof("event")
                if kind == "started" and on_start is not None:
                    on_start(ev.started)
                elif kind == "token" and on_text is not None:
                    sent.append(ev.token.text)
                    on_text(ev.token.text)
                elif kind == "rollback" and on_rollback is not None:
                    on_rollback(RollbackRecord.from_proto(ev.rollback))
                elif kind == "failover" and on_failover is not None:
                    on_failover(FailoverRecord.from_proto(ev.failover))
                elif kind == "done":
                    summary = ev.done
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e, self.peer) from e
        finally:
            stream.cancel()  # no-op after a normal end; stops the session on Ctrl-C
        if summary is None:
            raise ConsortiumError(f"{self.peer} ended the session without a summary")
        streamed = "".join(sent)
        if on_text is not None and summary.text.startswith(streamed) and len(summary.text) > len(streamed):
            on_text(
                summary.text[len(streamed) :]
            )  # held back by the stream: an incomplete character at the end
        return SessionReport.from_proto(summary)

    def session_status(self, session_id: str) -> dict:
        st = self._call("GetSession", pb.SessionStatusRequest(session_id=session_id))
        return {
            "session_id": st.session_id,
            "state": st.state,
            "prompt_tokens": st.prompt_tokens,
            "generated_tokens": st.generated_tokens,
            "max_tokens": st.max_tokens,
            "position": st.position,
            "tokens_per_second": st.tokens_per_second,
            "age_s": st.age_s,
            "error": st.error,
            "stages": [asdict(StageReport.from_proto(x)) for x in st.stages],
            "tokens": list(st.tokens),
            "text": st.text,
            "failovers": [FailoverRecord.from_proto(f).to_dict() for f in st.failovers],
            "resumable": st.resumable,
        }

    def cluster_status(self) -> dict:
        st = self._call("GetStatus", pb.ClusterStatusRequest())
        nodes = []
        for ns in st.nodes:
            n = ns.node
            nodes.append(
                {
                    "node_id": n.node_id,
                    "address": n.address,
                    "alive": ns.alive,
                    "local": ns.local,
                    "layers": [n.layers.start, n.layers.end] if n.HasField("layers") else None,
                    "device": n.device,
                    "dtype": n.dtype,
                    "speed_gflops": n.speed_gflops,
                    "memory_bytes": n.memory_bytes,
                    "heartbeat_age_s": ns.heartbeat_age_s,
                    "role": ns.role,
                }
            )
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
            "model_digest": st.model_digest,
            "n_layers": st.n_layers,
            "nodes": nodes,
            "route": route,
            "placement_error": st.placement_error,
            "flexible_pending": st.flexible_pending,
            "active_sessions": st.active_sessions,
            "spill_held_bytes": st.spill_held_bytes,
            "spill_limit_bytes": st.spill_limit_bytes,
        }


def format_report(report: SessionReport) -> list[str]:
    """Human-readable summary lines: totals, then one line per stage."""
    lines = [
        f"[{len(report.tokens)} tokens, {report.tokens_per_second:.1f} tok/s, first token "
        f"{report.time_to_first_token_s * 1000:.0f} ms, stop: {report.stop_reason}, session {report.session_id}]"
    ]
    a = report.audits
    if report.verification_note:
        lines.append(f"  verification: {report.verification} class, {report.verification_note}")
    lines.append(
        f"  audits: {a.total} ({a.passed} passed, {a.failed} failed, {a.pending} pending)"
        + (f"; banned: {', '.join(report.banned_nodes)}" if report.banned_nodes else "")
    )
    for r in report.rollbacks:
        lines.append(
            f"  rollback: stage {r.stage} at position {r.position}: {r.node} ({r.reason}); "
            f"now on {r.new_node}"
        )
    for f in report.failovers:
        lines.append(
            f"  failover: stage {f.stage} at token {f.token_index}: {f.failed_node} failed; "
            f"now on {f.backup_node} (ready in {f.latency_ms:.0f} ms)"
        )
    for s in report.stages:
        where = "coordinator" if s.local else s.address
        lines.append(
            f"  stage {s.index}: {s.node_id:<16} layers {s.layers[0]}-{s.layers[1]:<4} {s.device}/{s.dtype:<5} "
            f"step {s.mean_step_ms:6.2f} ms (compute {s.mean_compute_ms:6.2f} ms), prefill {s.prefill_ms:6.1f} ms"
            + (f", batch {s.mean_batch:.1f}" if s.mean_batch > 1 else "")
            + f"  [{where}]"
        )
    return lines
