"""Moving a stage to another node in the middle of a session: failover (its node died or
hung) and fraud rollback (its node was caught). Both rebuild the new node's KV cache by
replaying the stage's committed inputs in one prefill, compared with the committed
outputs on the way (a free audit); DESIGN.md §4-5."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

from consortium.coordinator.audits import Fraud
from consortium.coordinator.cluster import Cluster
from consortium.coordinator.stages import StageHandle
from consortium.coordinator.verifier import Verifier
from consortium.core.config import CoordinatorConfig
from consortium.core.records import FailoverRecord, ReplayCheck, RollbackRecord
from consortium.core.session import Session, StageRef, StepRecord
from consortium.errors import ConsortiumError
from consortium.model.gguf_file import ModelArgs
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import RemoteError
from consortium.transport.tensors import TensorError, WireTensor, decode_hidden, decode_logits
from consortium.verification.audit import concat_inputs, judge
from consortium.verification.ledger import Ledger
from consortium.verification.tolerance import tolerance_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replacement:
    ref: StageRef
    load_ms: float  # choosing the backup, including a standby loading the layers
    replay_ms: float  # rebuilding its KV cache from the committed inputs
    positions: int  # positions replayed
    check: ReplayCheck | None = None  # the replay compared with the committed outputs


class Recovery:
    def __init__(
        self, cfg: CoordinatorConfig, args: ModelArgs, ledger: Ledger, verifier: Verifier, cluster: Cluster
    ):
        self.cfg, self.args, self.ledger, self.verifier, self.cluster = cfg, args, ledger, verifier, cluster

    def failover(
        self, session: Session, handles: list[StageHandle], s: int, p: int, err: RemoteError
    ) -> tuple[StageRef, StageHandle]:
        """Stage s's node died or hung at the step starting at position p: give the stage to a
        backup that replays its committed inputs for positions < p, and record the failover."""
        sid, failed = session.session_id, session.stages[s].node_id
        t0 = time.perf_counter()
        log.warning(
            "session %s: stage %d (%s) failed at position %d: %s; failing over", sid, s, failed, p, err
        )
        rep = self._replace(session, handles, s, p, failed, background_close=True)
        ev = FailoverRecord(
            stage=s,
            token_index=len(session.tokens),
            failed_node=failed,
            backup_node=rep.ref.node_id,
            latency_ms=(time.perf_counter() - t0) * 1000,
            replay_ms=rep.replay_ms,
            replayed_positions=rep.positions,
            load_ms=rep.load_ms,
            error=str(err),
            position=p,
            replay_check=rep.check,
        )
        session.failovers.append(ev)
        session.unsent_failovers.append(ev)
        self.ledger.event(sid, "failover", ev.to_dict())
        log.warning(
            "session %s: stage %d failed over from %s to %s at token %d in %.0f ms (replay of %d "
            "positions %.0f ms, load %.0f ms)",
            sid,
            s,
            failed,
            ev.backup_node,
            ev.token_index,
            ev.latency_ms,
            rep.positions,
            rep.replay_ms,
            rep.load_ms,
        )
        if rep.check is not None and not rep.check.passed:
            self._withdraw(session, s, failed, rep)
        return rep.ref, handles[s]

    def _withdraw(self, session: Session, s: int, node_id: str, rep: Replacement) -> None:
        """The replay differs from what the failed node committed: its work from the first differing
        position is withdrawn (the loop rolls back). It is evidence (a ban) only when the
        coordinator replayed; a worker's replay is its word against the node's, so then the
        session is only rolled back, which is right whichever of the two lied."""
        check = rep.check
        assert check is not None
        p = check.first_bad_position if check.first_bad_position is not None else 0
        reason = f"replay on {rep.ref.node_id} differs from its committed outputs (rel-L2 {check.worst_rel_l2:.3g})"
        fraud = Fraud(s, p, node_id, reason)
        if rep.ref.local:
            self.verifier.punish(session, fraud, {"error": reason, "replay_check": asdict(check)})
            return
        log.warning(
            "session %s: %s of %s; rolling back to position %d", session.session_id, reason, node_id, p
        )
        with session.audits.lock:
            if session.audits.fraud is None or p < session.audits.fraud.position:
                session.audits.fraud = fraud

    def rollback(self, session: Session, handles: list[StageHandle]) -> tuple[RollbackRecord, WireTensor]:
        """Withdraw everything from the first bad position on, give the stage to an honest node
        (replaying its committed inputs); returns the record and the input of the next step."""
        audits, sid = session.audits, session.session_id
        with audits.lock:
            fraud, audits.fraud = audits.fraud, None
            audits.caught.add(fraud.node_id)
        s = fraud.stage
        # A bad row inside a multi-position step (the prefill) withdraws that whole step.
        starts = [r.start_position for r in session.history[s].steps if fraud.position in r.positions]
        p = min(starts[0] if starts else fraud.position, session.position)
        for h in session.history:
            h.steps = [r for r in h.steps if r.positions.stop <= p]
        self.verifier.forget_after(audits, p)
        for i, h in enumerate(handles):
            if i != s:
                h.rollback(sid, p, self.cfg.step_timeout_s)
        rep = self._replace(session, handles, s, p, fraud.node_id, background_close=False)
        n_prompt = len(session.prompt_ids)
        n_kept = max(0, p + 1 - n_prompt)
        session.tokens = session.tokens[:n_kept]
        session.resumed = min(session.resumed, n_kept)
        session.position = p
        self.ledger.rollback_tokens(sid, p + 1)
        ev = RollbackRecord(s, p, fraud.node_id, fraud.reason, n_kept, rep.ref.node_id)
        session.rollbacks.append(ev)
        self.ledger.event(sid, "rollback", ev.to_dict())
        log.warning("session %s rolled back to position %d; stage %d now on %s", sid, p, s, ev.new_node)
        ids = session.prompt_ids + session.tokens
        return ev, WireTensor.from_tokens(ids[p : n_prompt + n_kept])

    def _replace(
        self,
        session: Session,
        handles: list[StageHandle],
        s: int,
        p: int,
        old_node: str,
        background_close: bool,
    ) -> Replacement:
        """Give stage s to another node (the cluster's choice) and rebuild its KV cache from the
        stage's committed inputs for positions < p, comparing the replay with the committed outputs."""
        sid, old = session.session_id, session.stages[s]
        self._close_quietly(handles[s], sid, old_node, background_close)
        t0 = time.perf_counter()
        ref, handle = self.cluster.replace_stage(session, s, old_node)
        load_ms = (time.perf_counter() - t0) * 1000
        handles[s], session.stages[s] = handle, ref
        session.history[s].stage = ref
        handle.open(sid, session.capacity, ref.layers, self.cfg.step_timeout_s)  # replaces a stale cache
        kept = session.history[s].inputs_until(p)
        t1 = time.perf_counter()
        check = None
        if kept:  # rebuild its KV cache from the committed inputs, in one prefill
            x = WireTensor.from_torch(concat_inputs([r.input for r in kept]))
            order = pb.WorkOrder(
                session_id=sid,
                step=kept[-1].step,
                stage_index=s,
                layers=pb.LayerRange(start=ref.layers.start, end=ref.layers.end),
                start_position=0,
                input=x.to_proto(),
            )
            res = handle.execute(order, self.cfg.prefill_timeout_s)
            check = self._compare_replay(session, s, old, ref, kept, res)
        replay_ms = (time.perf_counter() - t1) * 1000
        return Replacement(ref, load_ms, replay_ms, kept[-1].positions.stop if kept else 0, check)

    @staticmethod
    def _close_quietly(h: StageHandle, sid: str, node_id: str, background: bool) -> None:
        def close() -> None:
            try:
                h.close(sid, 0.5 if background else 5.0)
            except ConsortiumError as e:
                log.info("closing session %s on the replaced node %s: %s", sid, node_id, e)

        if background:  # a hung node must not delay the failover
            threading.Thread(target=close, name=f"close-{node_id}", daemon=True).start()
        else:
            close()

    def _compare_replay(
        self,
        session: Session,
        s: int,
        old: StageRef,
        ref: StageRef,
        kept: list[StepRecord],
        res: pb.WorkResult,
    ) -> ReplayCheck | None:
        """The replay recomputed what the stage committed: compare (a free audit). A mismatch is
        logged, not fraud by the backup (the committed work may be the bad one)."""
        sid = session.session_id
        try:
            if ref.layers.end == self.args.n_layers:  # logits of the last position only
                out, _ = decode_logits(res.output, self.args.vocab_size, rows=1)
                stop = kept[-1].positions.stop
                committed, positions = [kept[-1].committed()], [range(stop - 1, stop)]
            else:
                out, _ = decode_hidden(res.output, self.args.dim)
                committed, positions = [r.committed() for r in kept], [r.positions for r in kept]
            args, layers = self.args, (ref.layers.start, ref.layers.end)
            tol = tolerance_class(
                old.dtype,
                ref.dtype,
                layers=layers,
                n_layers=args.n_layers,
                model_digest=self.verifier.gguf.digest,
            )
            result = judge(committed, positions, out.to_torch(), False, tol)
        except (TensorError, ValueError, RuntimeError, IndexError, OSError) as e:
            log.warning(
                "session %s: the replay of stage %d on %s could not be compared: %s", sid, s, ref.node_id, e
            )
            return None
        if result.passed:
            log.info(
                "session %s: replay of stage %d on %s matches the committed outputs of %s (rel-L2 %.2e, %s)",
                sid,
                s,
                ref.node_id,
                old.node_id,
                result.worst_rel_l2,
                result.tolerance,
            )
        else:
            log.warning(
                "session %s: replay of stage %d on %s DIFFERS from the committed outputs of %s from "
                "position %s (rel-L2 %.2e, %s)",
                sid,
                s,
                ref.node_id,
                old.node_id,
                result.first_bad_position,
                result.worst_rel_l2,
                result.tolerance,
            )
        return ReplayCheck(result.passed, result.worst_rel_l2, result.tolerance, result.first_bad_position)
