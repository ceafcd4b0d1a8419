"""The coordinator's side of verification (DESIGN.md §4): receipts, audits, fraud.

Every remote result is checked before use (signature, order, weights, digest chain) and
its receipt goes to the ledger. A random share of work units is audited on the audit pool
while generation goes on: an auditor recomputes the stage from the committed inputs and
every row is compared. A bad receipt or a failed audit is stored as evidence, the node is
banned, and the session is told where to roll back to.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
from dataclasses import replace

from consortium.coordinator.audit_targets import AuditorLost, LocalTarget, RemoteTarget, Target
from consortium.coordinator.audits import AuditPool, Fraud, SessionAudits
from consortium.coordinator.cluster import Cluster
from consortium.core.session import Session, StageRef, StepRecord
from consortium.model.gguf_file import GGUFModel
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor
from consortium.verification.audit import (
    AuditRefused,
    AuditResult,
    LocalAuditor,
    Representation,
    concat_inputs,
    judge,
)
from consortium.verification.ledger import Ledger
from consortium.verification.receipts import (
    Receipt,
    check_work_receipt,
    from_proto,
    input_digest,
    output_digest,
)
from consortium.verification.sequential import NodeErrorStats, cusum_thresholds
from consortium.verification.tolerance import tolerance_for, worst_class

log = logging.getLogger(__name__)


class Verifier:
    def __init__(
        self,
        gguf: GGUFModel,
        ledger: Ledger,
        auditor: LocalAuditor,
        cluster: Cluster,
        audit_seed: int | None = None,
        recheck_probability: float = 0.1,
        workers: int = 4,
    ):
        self.gguf, self.ledger, self.auditor, self.cluster = gguf, ledger, auditor, cluster
        self.audit_seed = audit_seed
        self.recheck_probability = recheck_probability  # share of remote passes re-checked here
        self._layers_digests: dict[tuple[int, int], str] = {}
        self._digest_lock = threading.Lock()
        self.pool = AuditPool(workers, self._run, self._close_if_done)
        # a per-node sequential test over every audited row, with the model's calibrated h
        self.node_stats = NodeErrorStats(cusum_thresholds(gguf.digest))

    def stop(self) -> None:
        self.pool.stop()

    def layers_digest(self, start: int, end: int) -> str:
        with self._digest_lock:
            d = self._layers_digests.get((start, end))
            if d is None:
                d = self._layers_digests[(start, end)] = self.gguf.layers_digest(start, end)
            return d

    # --- the token loop's side ---------------------------------------------------------------

    def new_session_audits(
        self, session_id: str, probability: float, seed: int | None, coverage: str = "full"
    ) -> SessionAudits:
        """Units are chosen unpredictably to workers (CSPRNG), or reproducibly under a seed."""
        seed = self.audit_seed if seed is None else seed

        def rng(purpose: str) -> random.Random:
            return secrets.SystemRandom() if seed is None else random.Random(f"{seed}:{session_id}{purpose}")

        return SessionAudits(session_id, rng(""), probability, coverage, recheck_rng=rng(":recheck"))

    def check(
        self, order: pb.WorkOrder, res: pb.WorkResult, key: bytes, expected_in: bytes, out: WireTensor
    ) -> Receipt:
        """Check a remote result's receipt before the output is used; raises ReceiptError."""
        digest = self.layers_digest(order.layers.start, order.layers.end)
        return check_work_receipt(res.receipt, order, key, digest, expected_in, out)

    @staticmethod
    def output_digest(session: Session, stage: int, start: int, out: WireTensor) -> bytes:
        return output_digest(session.session_id, stage, start, out)

    def maybe_audit(self, session: Session, stage: int, end_position: int) -> None:
        """Full coverage: select this unit (stage, positions up to end_position) as a checkpoint
        with the session's probability. Sampled coverage draws nothing during generation."""
        audits = session.audits
        if audits.coverage != "full" or audits.probability <= 0:
            return
        if audits.rng.random() < audits.probability:
            self._request(session, stage, end_position)

    def audit_end(self, session: Session) -> None:
        """The session's end (again after a rollback) is a checkpoint of every audited stage, so
        no row escapes its stage's audits in the tail after the last drawn unit. Sampled
        coverage draws here, once per stage and session, whether the stage is checked at all:
        nobody (a remote auditor included) learns during generation which stages will be."""
        audits = session.audits
        if audits.probability <= 0:
            return
        for i, ref in enumerate(session.stages):
            if ref.local:
                continue
            if audits.coverage == "sampled":
                if i not in audits.drawn:
                    audits.drawn[i] = audits.rng.random() < audits.probability
                if not audits.drawn[i]:
                    continue
            self._request(session, i, session.position)

    def _request(self, session: Session, stage: int, end_position: int) -> None:
        audits = session.audits
        with audits.lock:
            if audits.requested_to.get(stage, -1) >= end_position:
                return  # an audit up to here is already asked for (or done)
            audits.requested.setdefault(stage, []).append(end_position)
            audits.requested_to[stage] = end_position
        self.pool.submit(session, stage)

    def punish(self, session: Session, fraud: Fraud, evidence: dict) -> None:
        """Evidence, ban, and the session's rollback target (the earliest fraud wins). A node
        already caught in this session, or whose fraud is pending there, is recorded once."""
        audits = session.audits
        with audits.lock:
            pending = audits.fraud is not None and audits.fraud.node_id == fraud.node_id
            if fraud.node_id in audits.caught or (pending and audits.fraud.position <= fraud.position):
                return  # its work is already (being) withdrawn and its stage moved
            if audits.fraud is None or fraud.position < audits.fraud.position:
                audits.fraud = fraud
        if pending:
            return
        log.warning(
            "FRAUD by %s at stage %d, position %d of session %s: %s",
            fraud.node_id,
            fraud.stage,
            fraud.position,
            session.session_id,
            fraud.reason,
        )
        self.ledger.add_evidence(fraud.node_id, session.session_id, fraud.reason.split(":")[0], evidence)
        self.cluster.ban(fraud.node_id, fraud.reason)

    def result_fraud(
        self, session: Session, stage: int, order: pb.WorkOrder, node_id: str, reason: str, res: pb.WorkResult
    ) -> None:
        """A validly signed result that is wrong on its face: the signed receipt is the evidence."""
        fraud = Fraud(stage, order.start_position, node_id, reason)
        r = from_proto(res.receipt) if res.receipt.ByteSize() else None
        self.punish(session, fraud, {"error": reason, "step": order.step, "receipt": repr(r)})

    @staticmethod
    def wait(audits: SessionAudits, timeout_s: float | None = None) -> bool:
        """Block until the session has no pending audits; False on timeout."""
        with audits.lock:
            return audits.idle.wait_for(lambda: audits.pending == 0, timeout_s)

    @staticmethod
    def forget_after(audits: SessionAudits, position: int) -> None:
        """Withdrawn work is not audited (a rollback to `position`)."""
        with audits.lock:
            for stage, ends in audits.requested.items():
                audits.requested[stage] = [e for e in ends if e <= position]
            for stage, end in audits.requested_to.items():
                audits.requested_to[stage] = min(end, position)
            for stage, end in audits.verified_to.items():
                audits.verified_to[stage] = min(end, position)
            audits.rewind_to = position if audits.rewind_to is None else min(audits.rewind_to, position)
            audits.idle.notify_all()

    def release(self, session: Session) -> None:
        """The session's token loop ended: its remote auditors are closed once no audit is pending."""
        with session.audits.lock:
            session.audits.ended = True
        self._close_if_done(session)

    @staticmethod
    def _close_if_done(session: Session) -> None:
        """Close the auditors of a session whose loop ended, once its audits have drained (called
        by the loop's release and by the pool when the session's queue empties: one of them
        sees the other's change under the lock)."""
        audits = session.audits
        with audits.lock:
            done = audits.ended and audits.pending == 0 and not audits.draining
            targets, audits.targets = (list(audits.targets.values()), {}) if done else ([], audits.targets)
        for t in targets:
            t.close()

    # --- the audit pool's side -----------------------------------------------------------------

    def _run(self, session: Session, stage: int) -> None:
        """One audit job; an auditor lost on the way (not the audited node) moves the audit on."""
        audits = session.audits
        try:
            self._audit(session, stage)
        except AuditorLost as e:
            with audits.lock:
                target = audits.targets.get(stage)
            node = target.node_id if target is not None else "?"
            log.warning(
                "auditor %s of stage %d in session %s lost (%s); the audit moves to another node",
                node,
                stage,
                session.session_id,
                e,
            )
            self._lose(session, stage, node, str(e))
            self.pool.submit(session, stage, first=True)
            return
        except AuditRefused as e:  # unverifiable here: says nothing about the audited node
            self._unverifiable(session, stage, str(e))
        except Exception:  # an auditor failure must never pass for fraud, nor stop the pool
            log.exception("audit of stage %d in session %s could not run", stage, session.session_id)
            with audits.lock:
                ends = list(audits.requested.get(stage, []))
            audits.settle(stage, ends)

    def _unverifiable(self, session: Session, stage: int, reason: str) -> None:
        """No auditor could take the unit (no remote one, and this coordinator refused it): it is
        settled as unverified, neither passed nor failed, and the ledger says why. No auditor's cache
        holds its rows, so the stage's next audit covers them again."""
        audits = session.audits
        with audits.lock:
            ends = list(audits.requested.get(stage, []))
        log.warning("audit of stage %d in session %s refused: %s", stage, session.session_id, reason)
        self.ledger.event(
            session.session_id, "audit_refused", {"stage": stage, "ends": ends, "reason": reason}
        )
        audits.settle(stage, ends, unverified=len(ends))

    def _lose(self, session: Session, stage: int, node: str, error: str) -> None:
        session.audits.lose(stage, node)
        self.ledger.event(session.session_id, "auditor_lost", {"stage": stage, "node": node, "error": error})
        self.cluster.mark_dead(node)

    def _rewind(self, session: Session) -> None:
        """Apply a rollback to every auditor's cache (the inputs before it stay committed)."""
        audits = session.audits
        with audits.lock:
            rewind, audits.rewind_to = audits.rewind_to, None
            targets = list(audits.targets.items())
        if rewind is None:
            return
        for i, t in targets:
            try:
                t.truncate(rewind)
            except AuditorLost as e:  # that stage's next audit picks another auditor
                log.warning("auditor %s of stage %d lost while rewinding: %s", t.node_id, i, e)
                session.audits.lose(i, t.node_id)
                self.cluster.mark_dead(t.node_id)

    def _target(self, session: Session, stage: int) -> Target:
        """The stage's auditor for this session: a remote node holding its layers if the
        cluster offers one (never a node whose work it checks), else the coordinator."""
        audits = session.audits
        with audits.lock:
            target = audits.targets.get(stage)
        serving = {r.node_id for r in session.stages}
        if target is not None and target.remote and target.node_id in serving:
            log.info(
                "auditor %s of stage %d now serves session %s: another node audits",
                target.node_id,
                stage,
                session.session_id,
            )
            target.close()
            target = None
        if target is None:
            hist = session.history[stage]
            with audits.lock:
                exclude = {r.node_id for r in hist.steps} | {hist.stage.node_id} | audits.lost_auditors
            target = self._remote_target(session, stage, exclude) or self._local_target(session, stage)
            audits.set_target(stage, target)
            target.open()  # AuditorLost: the job moves to another auditor
            log.info(
                "auditor of stage %d (layers %s) in session %s: %s",
                stage,
                hist.stage.layers,
                session.session_id,
                target.node_id,
            )
        return target

    def _local_target(self, session: Session, stage: int) -> LocalTarget:
        """The coordinator audits in the representation the audited stage declares (AuditRefused
        when its audit memory budget cannot hold it)."""
        ref = session.history[stage].stage
        return LocalTarget(self.auditor, ref.layers, session.capacity, declared(ref))

    def _remote_target(self, session: Session, stage: int, exclude: set[str]) -> RemoteTarget | None:
        found = self.cluster.auditor_for(session, stage, exclude)
        if found is None:
            return None
        handle, node = found
        layers = session.history[stage].stage.layers
        digest = self.layers_digest(layers.start, layers.end)

        def check(order: pb.WorkOrder, res: pb.WorkResult, xw: WireTensor, out: WireTensor) -> None:
            expected_in = input_digest(order.session_id, order.stage_index, order.start_position, xw)
            check_work_receipt(res.receipt, order, node.public_key, digest, expected_in, out)

        args = self.gguf.args
        return RemoteTarget(handle, node, session.session_id, stage, layers, session.capacity, args, check)

    def _audit(self, session: Session, stage: int) -> None:
        """Audit a stage up to its latest selected unit. The auditor keeps, per session and
        stage, a KV cache built from the committed inputs it has already verified, so each
        audit recomputes (in one prefill) and compares only the rows since the last one:
        every row 0..t is compared once, as one prefill over 0..t would, at a fraction of the
        cost. A rollback rewinds that cache (the inputs before it stay committed)."""
        audits = session.audits
        self._rewind(session)
        with audits.lock:
            ends = list(audits.requested.get(stage, []))
        if not ends:
            return  # folded into an earlier audit of the same stage
        upto, hist = max(ends), session.history[stage]
        target = self._target(session, stage)
        start = target.length
        records = [r for r in list(hist.steps) if start <= r.start_position < upto]
        withdrawn = bool(records) and (
            records[0].start_position != start or records[-1].positions.stop < upto
        )
        if not records or withdrawn:  # already verified, or withdrawn by a rollback meanwhile
            audits.settle(stage, ends, passed=0 if withdrawn else len(ends))
            return
        res = self._recompute(target, hist.stage, records)
        if target.remote and (not res.passed or audits.recheck_rng.random() < self.recheck_probability):
            res, target = self._second_opinion(session, stage, target, upto, res)
        if any(r not in hist.steps for r in records):  # withdrawn while we recomputed: nothing to judge
            target.truncate(start)
            audits.settle(stage, ends)
            return
        self._verdict(session, stage, target, records, ends, res)

    def _verdict(
        self,
        session: Session,
        stage: int,
        target: Target,
        records: list[StepRecord],
        ends: list[int],
        res: AuditResult,
    ) -> None:
        """Record an audit's result; a failure is fraud by the node whose row is first bad. A unit
        that passes still feeds its node's sequential test: a node whose errors sit consistently
        high fails it, as if this audit had failed at the node's first position in the unit."""
        start, upto, ref = records[0].start_position, max(ends), session.history[stage].stage
        if res.passed:
            culprit = records[-1].node_id
            seq = self.node_stats.update(culprit, res)
            if not seq.passed:
                first = next(r.start_position for r in records if r.node_id == culprit)
                res = replace(res, passed=False, first_bad_position=first, reason=seq.reason)
        bad = res.first_bad_position
        node = next((r.node_id for r in records if bad in r.positions), records[-1].node_id)
        if bad is not None:
            target.truncate(start)  # keep only verified rows
        self.ledger.add_audit(
            session.session_id,
            stage,
            upto - 1,
            node,
            target.node_id,
            res.passed,
            res.tolerance,
            res.worst_rel_l2,
            res.worst_max_rel,
            bad,
        )
        log.info(
            "audit of stage %d (%s), positions %d..%d of session %s: %s (rel-L2 %.2e, max/RMS %.2e, %s)",
            stage,
            node,
            start,
            upto - 1,
            session.session_id,
            "passed" if res.passed else "FAILED",
            res.worst_rel_l2,
            res.worst_max_rel,
            res.tolerance,
        )
        if not res.passed:
            self.punish(
                session,
                Fraud(stage, bad, node, f"failed audit: {res.reason or f'rel-L2 {res.worst_rel_l2:.3g}'}"),
                {"audit": res.__dict__, "layers": str(ref.layers), "auditor": target.node_id},
            )
        if res.passed:
            with session.audits.lock:
                session.audits.verified_to[stage] = upto
        failed = sum(1 for e in ends if bad is not None and e > bad)
        session.audits.settle(stage, ends, passed=len(ends) - failed, failed=failed)

    def _recompute(self, target: Target, ref: StageRef, records: list[StepRecord]) -> AuditResult:
        """Run the committed inputs of `records` through the auditor (continuing its cache) and
        judge its rows against the committed outputs, with the tolerance of the worse numeric
        class of the audited stage's representation and the auditor's."""
        recomputed = target.extend(concat_inputs([r.input for r in records]))
        args, layers = self.gguf.args, (ref.layers.start, ref.layers.end)
        is_last = ref.layers.end == args.n_layers
        klass = worst_class(declared(ref).klass, target.klass)
        tol = tolerance_for(klass, layers, args.n_layers, self.gguf.digest)
        return judge(
            [r.committed() for r in records],
            [r.positions for r in records],
            recomputed,
            is_last,
            tol,
        )

    def _second_opinion(
        self, session: Session, stage: int, remote: RemoteTarget, upto: int, verdict: AuditResult
    ) -> tuple[AuditResult, Target]:
        """The coordinator recomputes rows 0..upto itself: always when a remote auditor reports a
        mismatch (a lying auditor must not get an honest node banned), and for a random share
        of its passes (an auditor colluding with the node it audits must not wave bad work
        through). An auditor whose verdict the coordinator contradicts is banned (its signed
        results are the evidence) and the stage is audited here from now on; the coordinator's
        verdict stands."""
        audits, hist = session.audits, session.history[stage]
        try:
            local = self._local_target(session, stage)
        except AuditRefused as e:
            return self._unconfirmed(session, stage, remote, verdict, e)
        try:
            mine = self._recompute(
                local, hist.stage, [r for r in list(hist.steps) if r.start_position < upto]
            )
        except BaseException:
            local.close()
            raise
        agreed = mine.passed == verdict.passed
        detail = {
            "stage": stage,
            "auditor": remote.node_id,
            "remote_passed": verdict.passed,
            "agreed": agreed,
        }
        self.ledger.event(session.session_id, "recheck", detail)
        if mine.passed and verdict.passed:
            log.info(
                "re-check of auditor %s (stage %d, session %s): agrees",
                remote.node_id,
                stage,
                session.session_id,
            )
            local.close()
            return verdict, remote
        remote.close()
        audits.lose(stage, remote.node_id)
        audits.set_target(stage, local)
        if mine.passed != verdict.passed:
            said = "passed" if verdict.passed else f"failed (rel-L2 {verdict.worst_rel_l2:.3g})"
            found = "honest" if mine.passed else "bad"
            reason = (
                f"false audit: it {said} work the coordinator finds {found} (rel-L2 {mine.worst_rel_l2:.3g})"
            )
            log.warning(
                "AUDITOR %s of stage %d in session %s lied (%s); banned",
                remote.node_id,
                stage,
                session.session_id,
                reason,
            )
            evidence = {"remote": verdict.__dict__, "coordinator": mine.__dict__, "stage": stage}
            self.ledger.add_evidence(remote.node_id, session.session_id, "false audit", evidence)
            self.cluster.ban(remote.node_id, reason)
        return mine, local

    def _unconfirmed(
        self, session: Session, stage: int, remote: RemoteTarget, verdict: AuditResult, refused: AuditRefused
    ) -> tuple[AuditResult, Target]:
        """The coordinator cannot re-check a remote auditor (its audit budget refused the stage). A
        pass stands unchecked; a mismatch must not become fraud unconfirmed, nor a ban of the
        auditor: the unit is unverifiable (AuditRefused) and this session's audits of the stage
        move to another auditor, starting over from row 0."""
        detail = {"stage": stage, "auditor": remote.node_id, "remote_passed": verdict.passed}
        self.ledger.event(session.session_id, "recheck_refused", {**detail, "reason": str(refused)})
        if verdict.passed:
            log.warning("re-check of auditor %s (stage %d) skipped: %s", remote.node_id, stage, refused)
            return verdict, remote
        remote.close()
        session.audits.lose(stage, remote.node_id)
        raise AuditRefused(
            f"auditor {remote.node_id}'s mismatch could not be confirmed: {refused}"
        ) from refused


def declared(ref: StageRef) -> Representation:
    """The representation a stage's node declared (dtype, packed): what an audit recomputes in."""
    return Representation(ref.dtype, ref.packed)
