"""The coordinator's side of verification (DESIGN.md §4): receipts, audits, fraud.

Every remote result is checked before use (signature, order, weights, digest chain) and
its receipt goes to the ledger. A random share of work units is audited in a background
thread while generation goes on: the coordinator recomputes the stage from the committed
inputs and compares every row. A bad receipt or a failed audit is stored as evidence,
the node is banned, and the session is told where to roll back to.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from consortium.coordinator.registry import Node
from consortium.coordinator.stages import StageHandle
from consortium.core.config import LayerRange
from consortium.core.session import Session, StepRecord
from consortium.errors import ConsortiumError
from consortium.model.gguf_file import GGUFModel
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import TensorError, WireTensor, decode_hidden, decode_logits
from consortium.verification.audit import AuditResult, LocalAuditor, concat_inputs, judge
from consortium.verification.commitment import token_digest
from consortium.verification.ledger import Ledger
from consortium.verification.receipts import (
    Receipt,
    ReceiptError,
    check_work_receipt,
    from_proto,
    output_digest,
)
from consortium.verification.tolerance import tolerance_class

log = logging.getLogger(__name__)


AUDIT_TIMEOUT_S = 300.0  # one remote audit call (a recompute of up to the whole context)


class AuditorLost(Exception):
    """The remote auditor died, hung, or sent a result that does not check out."""


class LocalTarget:
    """The coordinator audits a stage itself: its own copy of the layers, a KV cache of the
    rows it has verified."""

    def __init__(self, auditor: LocalAuditor, layers: LayerRange, capacity: int):
        self.stage = auditor.stage(layers.start, layers.end)
        self.cache = self.stage.new_cache(capacity)
        self.node_id, self.dtype, self.remote = auditor.node_id, auditor.dtype, False

    @property
    def length(self) -> int:
        return self.cache.length

    def extend(self, x: Tensor) -> Tensor:
        return self.stage(x, self.cache, all_logits=self.stage.is_last)

    def truncate(self, n: int) -> None:
        self.cache.truncate(min(self.cache.length, n))

    def close(self) -> None:
        pass


class RemoteTarget:
    """Another node holding the stage's layers audits it (DESIGN.md §4: preferably on another
    backend). It runs the committed inputs as work orders of a session of its own, keeping the
    verified rows in its KV cache like the local auditor; its results are signed and checked
    like any work result. A mismatch it reports is confirmed by the coordinator before anyone
    is called a cheat (a lying auditor must not get an honest node banned)."""

    def __init__(self, handle: StageHandle, node: Node, session_id: str, stage: int, layers: LayerRange,
                 capacity: int, args, check: Callable[[pb.WorkOrder, pb.WorkResult, WireTensor, WireTensor], None]):  # fmt: skip
        self.handle, self.node_id, self.dtype, self.remote = handle, node.node_id, node.dtype, True
        self.session_id, self.stage, self.layers, self.args, self.check = (
            audit_session_id(session_id, stage), stage, layers, args, check,
        )  # fmt: skip
        self.is_last = layers.end == args.n_layers
        self.capacity, self.length, self.steps = capacity, 0, 0

    def open(self) -> None:
        """Opens the audit session on the node (after the target is known to the coordinator, so
        that a heartbeat in between does not tell the node to drop it)."""
        try:
            self.handle.open(self.session_id, self.capacity, self.layers, AUDIT_TIMEOUT_S)
        except ConsortiumError as e:
            raise AuditorLost(str(e)) from e

    def extend(self, x: Tensor) -> Tensor:
        xw = WireTensor.from_torch(x)
        order = pb.WorkOrder(
            session_id=self.session_id, step=self.steps, stage_index=self.stage,
            layers=pb.LayerRange(start=self.layers.start, end=self.layers.end), start_position=self.length,
            input=xw.to_proto(), all_logits=self.is_last,
        )  # fmt: skip
        try:
            res = self.handle.execute(order, AUDIT_TIMEOUT_S)
            if self.is_last:
                out, y = decode_logits(res.output, self.args.vocab_size, rows=xw.rows)
            else:
                out, y = decode_hidden(res.output, self.args.dim)
                if out.rows != xw.rows:
                    raise TensorError(f"{out.rows} rows for {xw.rows}")
            self.check(order, res, xw, out)
        except (ConsortiumError, ReceiptError) as e:
            raise AuditorLost(str(e)) from e
        self.length += xw.rows
        self.steps += 1
        return y

    def truncate(self, n: int) -> None:
        if n < self.length:
            try:
                self.handle.rollback(self.session_id, n, 10.0)
            except ConsortiumError as e:
                raise AuditorLost(str(e)) from e
            self.length = n

    def close(self) -> None:
        try:
            self.handle.close(self.session_id, 2.0)
        except ConsortiumError as e:
            log.info("closing audit session %s on %s: %s", self.session_id, self.node_id, e)


def audit_session_id(session_id: str, stage: int) -> str:
    """The session id under which a remote auditor keeps its cache of a session's stage."""
    return f"{session_id}.audit{stage}"


@dataclass(frozen=True)
class Fraud:
    """Where a session must go back to, and who is to blame."""

    stage: int
    position: int  # first position whose committed output is bad
    node_id: str
    reason: str


@dataclass
class SessionAudits:
    """Audit bookkeeping of one session (shared by the token loop and the audit thread)."""

    rng: random.Random  # which units are audited (the token loop draws)
    probability: float
    requested: dict[int, list[int]] = field(default_factory=dict)  # stage -> audited unit end positions
    passed: int = 0
    failed: int = 0
    fraud: Fraud | None = None
    caught: set[str] = field(default_factory=set)  # nodes already rolled back and replaced
    targets: dict[int, LocalTarget | RemoteTarget] = field(default_factory=dict)  # stage -> its auditor
    lost_auditors: set[str] = field(default_factory=set)  # remote auditors that died or lied
    recheck_rng: random.Random = field(default_factory=secrets.SystemRandom)  # the audit thread draws
    ended: bool = False  # the token loop is done: close the remote auditors once audits drain
    rewind_to: int | None = None  # a rollback's position, applied by the audit thread
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self.requested.values())

    def summary(self) -> pb.AuditSummary:
        with self.lock:
            return pb.AuditSummary(
                total=self.passed + self.failed + self.pending, passed=self.passed, failed=self.failed,
                pending=self.pending,
            )  # fmt: skip


class Verifier:
    def __init__(
        self,
        gguf: GGUFModel,
        ledger: Ledger,
        auditor: LocalAuditor,
        audit_seed: int | None,
        remote_auditor: Callable[[Session, int, set[str]], RemoteTarget | None] = lambda s, i, x: None,
        on_lost: Callable[[str], None] = lambda node_id: None,
        recheck_probability: float = 0.1,
    ):
        self.gguf, self.ledger, self.auditor, self.audit_seed = gguf, ledger, auditor, audit_seed
        # remote_auditor: a node to audit a session's stage, not one of `exclude`, or None (audit here)
        self.remote_auditor, self.on_lost = remote_auditor, on_lost
        self.recheck_probability = recheck_probability  # share of remote passes re-checked here
        self._layers_digests: dict[tuple[int, int], str] = {}
        self._digest_lock = threading.Lock()
        self.banned: set[str] = set(ledger.banned_nodes())
        self._jobs: queue.Queue[tuple[Session, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._audit_loop, name="auditor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)

    def layers_digest(self, start: int, end: int) -> str:
        with self._digest_lock:
            d = self._layers_digests.get((start, end))
            if d is None:
                d = self._layers_digests[(start, end)] = self.gguf.layers_digest(start, end)
            return d

    # --- sessions ------------------------------------------------------------------------

    def new_session_audits(self, session_id: str, probability: float, seed: int | None) -> SessionAudits:
        """Units are chosen unpredictably to workers (CSPRNG), or reproducibly under a seed."""
        seed = self.audit_seed if seed is None else seed

        def rng(purpose: str) -> random.Random:
            return secrets.SystemRandom() if seed is None else random.Random(f"{seed}:{session_id}{purpose}")

        return SessionAudits(rng(""), probability, recheck_rng=rng(":recheck"))

    def first_input_digest(self, session: Session, start: int, ids: list[int]) -> bytes:
        return token_digest(session.session_id, start, ids)

    def check(
        self, session: Session, order: pb.WorkOrder, res: pb.WorkResult, public_key: bytes,
        expected_input: bytes, out: WireTensor,
    ) -> Receipt:  # fmt: skip
        """Check a remote result's receipt before the output is used; raises ReceiptError."""
        return check_work_receipt(
            res.receipt, order, public_key, self.layers_digest(order.layers.start, order.layers.end),
            expected_input, out,
        )  # fmt: skip

    def output_digest(self, session: Session, stage: int, start: int, out: WireTensor) -> bytes:
        return output_digest(session.session_id, stage, start, out)

    def record_step(self, session: Session, receipts: list[Receipt], keys: dict[str, bytes]) -> None:
        if receipts:
            self.ledger.add_receipts(receipts, keys)

    def maybe_audit(self, session: Session, audits: SessionAudits, stage: int, end_position: int) -> None:
        """Select this unit (stage, positions up to end_position) with the session's probability."""
        if audits.probability <= 0 or audits.rng.random() >= audits.probability:
            return
        with audits.lock:
            audits.requested.setdefault(stage, []).append(end_position)
        self._jobs.put((session, stage))

    def punish(self, session: Session, audits: SessionAudits, fraud: Fraud, evidence: dict) -> None:
        """Evidence, ban, and the session's rollback target (the earliest fraud wins)."""
        log.warning("FRAUD by %s at stage %d, position %d of session %s: %s", fraud.node_id, fraud.stage,
                    fraud.position, session.session_id, fraud.reason)  # fmt: skip
        self.ledger.add_evidence(fraud.node_id, session.session_id, fraud.reason.split(":")[0], evidence)
        self.ledger.ban(fraud.node_id, fraud.reason)
        self.banned.add(fraud.node_id)
        with audits.lock:
            if fraud.node_id in audits.caught:  # its work is already withdrawn and its stage moved
                return
            if audits.fraud is None or fraud.position < audits.fraud.position:
                audits.fraud = fraud

    def receipt_fraud(self, session: Session, audits: SessionAudits, stage: int, order: pb.WorkOrder,
                      node_id: str, err: ReceiptError, res: pb.WorkResult) -> Fraud:  # fmt: skip
        fraud = Fraud(stage, order.start_position, node_id, f"bad receipt: {err}")
        r = from_proto(res.receipt) if res.receipt.ByteSize() else None
        self.punish(session, audits, fraud, {"error": str(err), "step": order.step, "receipt": repr(r)})
        return fraud

    def wait(self, audits: SessionAudits, timeout_s: float | None = None) -> bool:
        """Block until the session has no pending audits; False on timeout."""
        with audits.lock:
            return audits.idle.wait_for(lambda: audits.pending == 0, timeout_s)

    def forget_after(self, audits: SessionAudits, position: int) -> None:
        """Withdrawn work is not audited (a rollback to `position`)."""
        with audits.lock:
            for stage, ends in audits.requested.items():
                audits.requested[stage] = [e for e in ends if e <= position]
            audits.rewind_to = position if audits.rewind_to is None else min(audits.rewind_to, position)
            audits.idle.notify_all()

    # --- the audit thread --------------------------------------------------------------------

    def release(self, session: Session) -> None:
        """The session's token loop ended: its remote auditors are closed once no audit is pending."""
        audits: SessionAudits = session.audits
        with audits.lock:
            audits.ended = True
            drained = audits.pending == 0
        if drained:
            self._close_targets(audits)

    def _close_targets(self, audits: SessionAudits) -> None:
        with audits.lock:
            targets, audits.targets = list(audits.targets.values()), {}
        for t in targets:
            t.close()

    def _audit_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            session, stage = job
            audits: SessionAudits = session.audits
            try:
                self._audit(session, stage)
            except AuditorLost as e:  # the auditor, not the audited node: audit again elsewhere
                target = audits.targets.pop(stage, None)
                node = target.node_id if target is not None else "?"
                log.warning("auditor %s of stage %d in session %s lost (%s); the audit moves to another node",
                            node, stage, session.session_id, e)  # fmt: skip
                audits.lost_auditors.add(node)
                self.ledger.event(
                    session.session_id, "auditor_lost", {"stage": stage, "node": node, "error": str(e)}
                )
                self.on_lost(node)
                self._jobs.put((session, stage))
                continue
            except Exception:  # an auditor failure must never pass for fraud, nor kill the thread
                log.exception("audit of stage %d in session %s could not run", stage, session.session_id)
                with audits.lock:
                    audits.requested.pop(stage, None)
                    audits.idle.notify_all()
            with audits.lock:
                drained = audits.ended and audits.pending == 0
            if drained:
                self._close_targets(audits)

    def _target(self, session: Session, stage: int) -> LocalTarget | RemoteTarget:
        """The stage's auditor for this session: a remote node holding its layers if the
        coordinator finds one (never a node whose work it checks), else the coordinator."""
        audits: SessionAudits = session.audits
        target = audits.targets.get(stage)
        if target is not None and target.remote and target.node_id in {r.node_id for r in session.stages}:
            log.info("auditor %s of stage %d now serves session %s: another node audits", target.node_id, stage,
                     session.session_id)  # fmt: skip
            target.close()
            target = audits.targets[stage] = None
        if target is None:
            hist = session.history[stage]
            exclude = {r.node_id for r in hist.steps} | {hist.stage.node_id} | audits.lost_auditors
            target = self.remote_auditor(session, stage, exclude)
            if target is not None:
                audits.targets[stage] = target
                target.open()  # AuditorLost: the audit loop picks another auditor
            else:
                target = audits.targets[stage] = LocalTarget(
                    self.auditor, hist.stage.layers, session.capacity
                )
            log.info("auditor of stage %d (layers %s) in session %s: %s", stage, hist.stage.layers,
                     session.session_id, target.node_id)  # fmt: skip
        return target

    def _audit(self, session: Session, stage: int) -> None:
        """Audit a stage up to its latest selected unit. The auditor keeps, per session and
        stage, a KV cache built from the committed inputs it has already verified, so each
        audit recomputes (in one prefill) and compares only the rows since the last one:
        every row 0..t is compared once, as one prefill over 0..t would, at a fraction of the
        cost. A rollback rewinds that cache (the inputs before it stay committed)."""
        audits: SessionAudits = session.audits
        with audits.lock:
            ends = list(audits.requested.get(stage, []))
            rewind, audits.rewind_to = audits.rewind_to, None
        if rewind is not None:
            for i, t in list(audits.targets.items()):
                try:
                    t.truncate(rewind)
                except AuditorLost as e:  # that stage's next audit picks another auditor
                    log.warning("auditor %s of stage %d lost while rewinding: %s", t.node_id, i, e)
                    audits.targets.pop(i, None)
                    audits.lost_auditors.add(t.node_id)
                    self.on_lost(t.node_id)
        if not ends:
            return  # folded into an earlier audit of the same stage
        upto = max(ends)
        hist = session.history[stage]
        ref = hist.stage
        target = self._target(session, stage)
        start = target.length
        records: list[StepRecord] = [r for r in list(hist.steps) if start <= r.start_position < upto]
        withdrawn = records and (records[0].start_position != start or records[-1].positions.stop < upto)
        if not records or withdrawn:
            with audits.lock:  # already verified, or withdrawn by a rollback meanwhile
                audits.requested[stage] = [e for e in audits.requested.get(stage, []) if e not in ends]
                if not records and not withdrawn:
                    audits.passed += len(ends)
                audits.idle.notify_all()
            return
        res = self._recompute(target, ref, records)
        if target.remote and (not res.passed or audits.recheck_rng.random() < self.recheck_probability):
            res, target = self._second_opinion(session, stage, target, upto, res)
        if any(r not in hist.steps for r in records):
            target.truncate(start)
            with audits.lock:  # withdrawn by a rollback while we recomputed: nothing left to judge
                audits.requested[stage] = [e for e in audits.requested.get(stage, []) if e not in ends]
                audits.idle.notify_all()
            return
        bad = res.first_bad_position
        node = next((r.node_id for r in records if bad in r.positions), records[-1].node_id)
        failed_units = [e for e in ends if bad is not None and e > bad]
        if bad is not None:
            target.truncate(start)  # keep only verified rows
        self.ledger.add_audit(session.session_id, stage, upto - 1, node, target.node_id, res.passed,
                              res.tolerance, res.worst_rel_l2, res.worst_max_rel, bad)  # fmt: skip
        log.info("audit of stage %d (%s), positions %d..%d of session %s: %s (rel-L2 %.2e, max/RMS %.2e, %s)",
                 stage, node, start, upto - 1, session.session_id, "passed" if res.passed else "FAILED",
                 res.worst_rel_l2, res.worst_max_rel, res.tolerance)  # fmt: skip
        if not res.passed:
            self.punish(session, audits, Fraud(stage, bad, node, f"failed audit: rel-L2 {res.worst_rel_l2:.3g}"),
                        {"audit": res.__dict__, "layers": str(ref.layers), "auditor": target.node_id})  # fmt: skip
        with audits.lock:
            audits.requested[stage] = [e for e in audits.requested.get(stage, []) if e not in ends]
            audits.failed += len(failed_units)
            audits.passed += len(ends) - len(failed_units)
            audits.idle.notify_all()

    def _recompute(self, target: LocalTarget | RemoteTarget, ref, records: list[StepRecord]) -> AuditResult:
        """Run the committed inputs of `records` through the auditor (continuing its cache) and
        judge its rows against the committed outputs."""
        recomputed = target.extend(concat_inputs([r.input for r in records]))
        is_last = ref.layers.end == self.gguf.args.n_layers
        return judge([r.output for r in records], [r.positions for r in records], recomputed, is_last,
                     tolerance_class(ref.dtype, target.dtype))  # fmt: skip

    def _second_opinion(self, session: Session, stage: int, remote: RemoteTarget, upto: int,
                        verdict: AuditResult) -> tuple[AuditResult, LocalTarget | RemoteTarget]:  # fmt: skip
        """The coordinator recomputes rows 0..upto itself: always when a remote auditor reports a
        mismatch (a lying auditor must not get an honest node banned), and for a random share
        of its passes (an auditor colluding with the node it audits must not wave bad work
        through). An auditor whose verdict the coordinator contradicts is banned (its signed
        results are the evidence) and the stage is audited here from now on; the coordinator's
        verdict stands."""
        audits: SessionAudits = session.audits
        hist = session.history[stage]
        ref = hist.stage
        local = LocalTarget(self.auditor, ref.layers, session.capacity)
        mine = self._recompute(local, ref, [r for r in list(hist.steps) if r.start_position < upto])
        if mine.passed and verdict.passed:
            log.info("re-check of auditor %s (stage %d, session %s): agrees", remote.node_id, stage,
                     session.session_id)  # fmt: skip
            return verdict, remote
        remote.close()
        audits.targets[stage] = local
        audits.lost_auditors.add(remote.node_id)
        if mine.passed != verdict.passed:
            said = "passed" if verdict.passed else f"failed (rel-L2 {verdict.worst_rel_l2:.3g})"
            reason = f"false audit: it {said} work the coordinator finds {'honest' if mine.passed else 'bad'} " \
                     f"(rel-L2 {mine.worst_rel_l2:.3g})"  # fmt: skip
            log.warning("AUDITOR %s of stage %d in session %s lied (%s); banned", remote.node_id, stage,
                        session.session_id, reason)  # fmt: skip
            self.ledger.add_evidence(remote.node_id, session.session_id, "false audit",
                                     {"remote": verdict.__dict__, "coordinator": mine.__dict__, "stage": stage})  # fmt: skip
            self.ledger.ban(remote.node_id, reason)
            self.banned.add(remote.node_id)
        return mine, local
