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
from dataclasses import dataclass, field

from consortium.core.session import Session, StepRecord
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import KVCache
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor
from consortium.verification.audit import LocalAuditor, concat_inputs, judge
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

    rng: random.Random
    probability: float
    requested: dict[int, list[int]] = field(default_factory=dict)  # stage -> audited unit end positions
    passed: int = 0
    failed: int = 0
    fraud: Fraud | None = None
    caught: set[str] = field(default_factory=set)  # nodes already rolled back and replaced
    checked: dict[int, KVCache] = field(default_factory=dict)  # stage -> auditor cache of verified rows
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
    def __init__(self, gguf: GGUFModel, ledger: Ledger, auditor: LocalAuditor, audit_seed: int | None):
        self.gguf, self.ledger, self.auditor, self.audit_seed = gguf, ledger, auditor, audit_seed
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
        rng: random.Random = secrets.SystemRandom() if seed is None else random.Random(f"{seed}:{session_id}")
        return SessionAudits(rng, probability)

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

    def _audit_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            session, stage = job
            try:
                self._audit(session, stage)
            except Exception:  # an auditor failure must never pass for fraud, nor kill the thread
                log.exception("audit of stage %d in session %s could not run", stage, session.session_id)
                audits = session.audits
                with audits.lock:
                    audits.requested.pop(stage, None)
                    audits.idle.notify_all()

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
            for cache in audits.checked.values():
                cache.truncate(min(cache.length, rewind))
        if not ends:
            return  # folded into an earlier audit of the same stage
        upto = max(ends)
        hist = session.history[stage]
        ref = hist.stage
        st = self.auditor.stage(ref.layers.start, ref.layers.end)
        cache = audits.checked.get(stage)
        if cache is None:
            cache = audits.checked[stage] = st.new_cache(session.capacity)
        start = cache.length
        records: list[StepRecord] = [r for r in list(hist.steps) if start <= r.start_position < upto]
        withdrawn = records and (records[0].start_position != start or records[-1].positions.stop < upto)
        if not records or withdrawn:
            with audits.lock:  # already verified, or withdrawn by a rollback meanwhile
                audits.requested[stage] = [e for e in audits.requested.get(stage, []) if e not in ends]
                if not records and not withdrawn:
                    audits.passed += len(ends)
                audits.idle.notify_all()
            return
        tol = tolerance_class(ref.dtype, self.auditor.dtype)
        recomputed = st(concat_inputs([r.input for r in records]), cache, all_logits=st.is_last)
        res = judge([r.output for r in records], [r.positions for r in records], recomputed, st.is_last, tol)
        if any(r not in hist.steps for r in records):
            cache.truncate(start)
            with audits.lock:  # withdrawn by a rollback while we recomputed: nothing left to judge
                audits.requested[stage] = [e for e in audits.requested.get(stage, []) if e not in ends]
                audits.idle.notify_all()
            return
        bad = res.first_bad_position
        node = next((r.node_id for r in records if bad in r.positions), records[-1].node_id)
        failed_units = [e for e in ends if bad is not None and e > bad]
        if bad is not None:
            cache.truncate(start)  # keep only verified rows
        self.ledger.add_audit(session.session_id, stage, upto - 1, node, self.auditor.node_id, res.passed,
                              res.tolerance, res.worst_rel_l2, res.worst_max_rel, bad)  # fmt: skip
        log.info("audit of stage %d (%s), positions %d..%d of session %s: %s (rel-L2 %.2e, max/RMS %.2e, %s)",
                 stage, node, start, upto - 1, session.session_id, "passed" if res.passed else "FAILED",
                 res.worst_rel_l2, res.worst_max_rel, res.tolerance)  # fmt: skip
        if not res.passed:
            self.punish(session, audits, Fraud(stage, bad, node, f"failed audit: rel-L2 {res.worst_rel_l2:.3g}"),
                        {"audit": res.__dict__, "layers": str(ref.layers), "auditor": self.auditor.node_id})  # fmt: skip
        with audits.lock:
            audits.requested[stage] = [e for e in audits.requested.get(stage, []) if e not in ends]
            audits.failed += len(failed_units)
            audits.passed += len(ends) - len(failed_units)
            audits.idle.notify_all()
