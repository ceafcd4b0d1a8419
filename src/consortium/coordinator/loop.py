"""The token loop: the coordinator drives every step through every stage.

It mirrors `consortium.model.generate.generate` step for step (prefill in one call per
stage, then one position per call; sampling at position = cache length after the
forward; EOS is not emitted), so with the same model, dtype, device and seed the
tokens are the single-node tokens. A step is: run the stages (each remote result's
receipt checked before its output is used, a dead stage failed over), accept the
result (one ledger transaction), sample audits, emit the token.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from torch import Tensor

from consortium.coordinator.batching import Batcher
from consortium.coordinator.cluster import Cluster
from consortium.coordinator.recovery import Recovery
from consortium.coordinator.stages import LocalStage, StageHandle
from consortium.coordinator.verifier import Verifier
from consortium.core.config import CoordinatorConfig
from consortium.core.session import CANCELLED, FAILED, FINISHED, RUNNING, Session, StageRef, StepRecord
from consortium.core.spill import SpillBudget, SpilledTensor, SpillFile
from consortium.errors import ConsortiumError
from consortium.model.generate import TextStream
from consortium.model.gguf_file import ModelArgs
from consortium.model.sampling import sample
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import RemoteError
from consortium.transport.tensors import (
    TensorError,
    WireTensor,
    check_hidden,
    check_logits,
    decode_hidden,
    decode_logits,
)
from consortium.verification.ledger import Ledger
from consortium.verification.receipts import Receipt, ReceiptError, UnsignedError, input_digest
from consortium.verification.tolerance import WEAKER, class_of, worst_class
from consortium.worker.runner import Work

log = logging.getLogger(__name__)
# A remote stage that fails a call with one of these is dead, hung or refuses us: its stage fails over.
FAILOVER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,  # it refuses our orders (e.g. its clock is off): no evidence
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
MAX_FAILOVERS_PER_STEP = 3
RTT_WINDOW = 16  # recent decode round trips behind a stage's adaptive deadline


@dataclass(frozen=True)
class StepResult:
    """One step through every stage: the last stage's logits and the receipts to record."""

    logits: Tensor
    receipts: list[tuple[Receipt, bytes]]  # with the signer's public key
    end: int  # the position after the step (the cache length of every stage)


@dataclass(frozen=True)
class StageResult:
    out: WireTensor | None  # what goes on (None: the coordinator's own logits, which go nowhere)
    logits: Tensor | None  # the last stage's
    nbytes: int  # the output's size
    receipt: tuple[Receipt, bytes] | None  # with the key that checked it; None: the coordinator's own
    node_id: str
    rtt_ms: float
    compute_ms: float
    batch_size: int


class BadResult(Exception):
    """A remote stage signed a wrong result (the fraud is recorded; a rollback follows)."""


class Unattributable(Exception):
    """A result nothing binds to its node (no valid signature, or not a tensor): no evidence."""


class TokenLoop:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        args: ModelArgs,
        tokenizer: GGUFTokenizer,
        verifier: Verifier,
        ledger: Ledger,
        cluster: Cluster,
    ):
        self.cfg, self.args, self.tokenizer = cfg, args, tokenizer
        self.verifier, self.ledger, self.cluster = verifier, ledger, cluster
        self.recovery = Recovery(cfg, args, ledger, verifier, cluster)

    @functools.cached_property
    def spills(self) -> SpillBudget:
        """The disk beside the ledger that a remote last stage's logits may take."""
        return SpillBudget(self.ledger.path.parent, self.cfg.spill_bytes)

    def reserve_spill(self, session: Session) -> None:
        """A session whose last stage is remote sets aside disk for its logits before it starts:
        one row a step, a step a token at most (SpillFullError: refused, nothing held)."""
        if not session.stages[-1].local:
            row = self.args.vocab_size * 4  # fp32 [1, vocab]
            session.spill = self.spills.open((session.max_tokens - session.resumed) * row)

    def run(self, session: Session, handles: list[StageHandle]) -> Iterator[pb.GenerateEvent]:
        """Yields started, one token event per generated token, then the summary."""
        sid = session.session_id
        opened: list[StageHandle] = []
        try:
            opened = self._open(session, handles)
            done = session.tokens[: session.resumed]
            yield pb.GenerateEvent(
                started=pb.SessionStarted(
                    session_id=sid,
                    prompt_tokens=len(session.prompt_ids),
                    max_tokens=session.max_tokens,
                    stages=[r.to_proto() for r in session.stages],
                    resumed_tokens=done,
                    resumed_text=self.tokenizer.decode(done),
                )
            )
            yield from self._generate(session, handles)
        except ConsortiumError as e:
            session.finish(FAILED, str(e))
            log.warning("session %s failed: %s", sid, e)
            raise
        except BaseException as e:  # cancelled stream (GeneratorExit) or a bug: never leave it "running"
            if session.state == RUNNING:
                session.finish(CANCELLED if isinstance(e, GeneratorExit) else FAILED, repr(e))
            raise
        finally:
            self._end(session, opened)

    def _open(self, session: Session, handles: list[StageHandle]) -> list[StageHandle]:
        """Opens the session on every stage; a stage dead before the first step fails over at 0."""
        for i, (ref, h) in enumerate(zip(session.stages, handles, strict=True)):
            try:
                h.open(session.session_id, session.capacity, ref.layers, self.cfg.step_timeout_s)
            except RemoteError as e:
                if ref.local or e.code not in FAILOVER_CODES:
                    raise
                self.recovery.failover(session, handles, i, 0, e)
        return handles  # a failover or rollback may swap a handle: close whatever runs at the end

    def _end(self, session: Session, opened: list[StageHandle]) -> None:
        sid = session.session_id
        self.verifier.release(session)
        if session.spill is not None:
            session.spill.settle()
        try:
            self.ledger.set_session_status(sid, session.state, session.error or None)
        except ConsortiumError as e:
            log.error("ledger: %s", e)
        for h in opened:
            h.batcher.forget(sid)
            try:
                h.close(sid, 5.0)
            except ConsortiumError as e:
                log.warning("closing session %s on %s: %s", sid, h.node_id, e)

    def _generate(self, session: Session, handles: list[StageHandle]) -> Iterator[pb.GenerateEvent]:
        """The per-token loop: run the stages, accept the result, sample audits, emit."""
        stream = self._text_stream(session)
        # A resumed session prefills the prompt and every committed token in its first step.
        x = WireTensor.from_tokens(session.prompt_ids + session.tokens)
        t0 = last = time.perf_counter()  # last: when the latest token was sampled
        step, eos, first = session.first_step, False, True
        while not self._finished(session, eos):
            if session.audits.fraud is not None:
                ev, x = self.recovery.rollback(session, handles)
                yield pb.GenerateEvent(rollback=ev.to_proto())
                stream, eos = self._text_stream(session), False
                continue
            if session.cancel.is_set():
                session.finish(CANCELLED, "cancelled by the client")
                return
            self._leave_banned(session, handles)
            result = self._run_stages(session, handles, step, x)
            step += 1
            yield from self._unsent_failovers(session)
            if result is None:  # a bad receipt: the rollback happens at the top of the loop
                continue
            token = sample(result.logits[-1], session.request.sampling, position=result.end)
            last = time.perf_counter()
            if first:
                session.time_to_first_token_s, first = last - t0, False
            eos = token in self.tokenizer.stop_ids
            self._accept(session, result, None if eos else token)
            if not eos:
                yield pb.GenerateEvent(token=pb.TokenEvent(token=token, text=stream.push(token)))
                x = WireTensor.from_tokens([token])
        yield from self._unsent_failovers(session)
        self._finish(session, eos, last - t0)  # the decode rate, not the wait for the last audits
        yield pb.GenerateEvent(done=self.summary(session))

    def _leave_banned(self, session: Session, handles: list[StageHandle]) -> None:
        """A stage whose node was caught cheating in another session moves off it at once; the
        move replays the stage's committed inputs, which re-checks everything that node did
        for this session (a difference rolls back)."""
        for i, ref in enumerate(session.stages):
            if not ref.local and self.cluster.is_banned(ref.node_id):
                why = f"node {ref.node_id} was banned (caught cheating in another session)"
                err = RemoteError(why, grpc.StatusCode.PERMISSION_DENIED)
                self.recovery.failover(session, handles, i, session.position, err)

    def _finished(self, session: Session, eos: bool) -> bool:
        """Done once EOS or max tokens is reached and (unless the caller opted out) the pending
        audits have settled; a late failed audit rolls back and generation goes on."""
        audits = session.audits
        if audits.fraud is not None or not (eos or len(session.tokens) >= session.max_tokens):
            return False
        self.verifier.audit_end(session)
        if not session.request.wait_audits or not self.verifier.wait(audits, self.cfg.audit_wait_timeout_s):
            return True
        return audits.fraud is None

    def _text_stream(self, session: Session) -> TextStream:
        stream = TextStream(self.tokenizer)
        for t in session.tokens:  # text already sent (a resumed session's, or kept by a rollback)
            stream.push(t)
        return stream

    @staticmethod
    def _unsent_failovers(session: Session) -> Iterator[pb.GenerateEvent]:
        while session.unsent_failovers:
            yield pb.GenerateEvent(failover=session.unsent_failovers.pop(0).to_proto())

    def _accept(self, session: Session, result: StepResult, token: int | None) -> None:
        """Commit a step: its receipts and token in one ledger transaction, audits drawn."""
        self.ledger.commit_step(session.session_id, result.receipts, result.end, token)
        for i, ref in enumerate(session.stages):
            if not ref.local:
                self.verifier.maybe_audit(session, i, result.end)
        session.position = result.end
        if token is not None:
            session.tokens.append(token)

    def _finish(self, session: Session, eos: bool, elapsed: float) -> None:
        session.stop_reason = "eos" if eos else "max_tokens"
        n = len(session.tokens) - session.resumed  # generated by this run
        decode_time = elapsed - session.time_to_first_token_s
        session.tokens_per_second = (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0
        session.finish(FINISHED)
        log.info(
            "session %s finished: %d tokens (%s), %.1f tok/s",
            session.session_id,
            n,
            session.stop_reason,
            session.tokens_per_second,
        )

    # --- one step through the stages -----------------------------------------------------------

    def _run_stages(
        self, session: Session, handles: list[StageHandle], step: int, x: WireTensor
    ) -> StepResult | None:
        """One position range through every stage, each remote result verified before its
        output is used. None when a stage's signed result was wrong (the fraud is recorded)."""
        pos, rows = session.position, x.rows
        expected_in = input_digest(session.session_id, 0, pos, x)
        receipts, logits = [], None
        for i in range(len(handles)):
            order = self._order(session, i, step, pos, x)
            r = self._stage(session, handles, i, order, rows, expected_in)
            if r is None:
                return None
            if r.receipt is None:  # the coordinator's own work: it is the verifier
                if r.out is not None:  # (its logits feed no stage: nothing to bind)
                    expected_in = self.verifier.output_digest(session, i, pos, r.out)
            else:
                receipts.append(r.receipt)
                expected_in = r.receipt[0].output_digest
            # Logits are a vocabulary of floats per token (0.5 MB for Llama 3) for the session's
            # life: the coordinator's own are not kept (nothing audits or replays its work), a
            # remote stage's go to disk until audits read them.
            kept: WireTensor | SpilledTensor | None = r.out
            if r.logits is not None and r.out is not None:
                kept = self._spill(session).put(r.out)
            rec = StepRecord(step, pos, x, kept, r.node_id, r.rtt_ms, r.compute_ms, r.batch_size, r.nbytes)
            session.history[i].append(rec)
            if r.out is not None:  # (the coordinator's own logits end the step)
                x = r.out
            logits = r.logits
        return StepResult(logits, receipts, pos + rows)

    def _spill(self, session: Session) -> SpillFile:
        if session.spill is None:  # its last stage moved to a remote node: it grows as it goes
            session.spill = self.spills.open(0)
        return session.spill

    def _stage(
        self,
        session: Session,
        handles: list[StageHandle],
        i: int,
        order: pb.WorkOrder,
        rows: int,
        expected_in: bytes,
    ) -> StageResult | None:
        """Stage i's verified result for the order; None if it was a signed wrong result (the
        fraud is recorded). A result nothing binds to the node (unsigned, malformed) is no
        evidence: the stage fails over and the replacement redoes the order."""
        for attempt in range(MAX_FAILOVERS_PER_STEP + 1):
            res, ref, rtt_ms = self._call(session, handles, i, order, rows)
            try:
                out, logits, receipt = self._verify(session, i, ref, order, res, rows, expected_in)
            except Unattributable as e:
                if attempt == MAX_FAILOVERS_PER_STEP:
                    raise RemoteError(f"stage {i} ({ref.node_id}): {e}", grpc.StatusCode.UNAVAILABLE) from e
                err = RemoteError(str(e), grpc.StatusCode.UNAVAILABLE)
                self.recovery.failover(session, handles, i, order.start_position, err)
                continue
            except BadResult:
                return None
            nbytes = out.nbytes if out is not None else logits.nbytes if logits is not None else 0
            return StageResult(
                out, logits, nbytes, receipt, ref.node_id, rtt_ms, res.compute_ms, res.batch_size or 1
            )
        raise AssertionError("unreachable")

    def _order(self, session: Session, i: int, step: int, pos: int, x: WireTensor) -> pb.WorkOrder:
        layers = session.stages[i].layers
        order = pb.WorkOrder(
            session_id=session.session_id,
            step=step,
            stage_index=i,
            layers=pb.LayerRange(start=layers.start, end=layers.end),
            start_position=pos,
            input=x.to_proto(),
        )
        if order.ByteSize() > self.cfg.max_message_bytes:
            raise ConsortiumError(
                f"work order of {order.ByteSize()} bytes for stage {i} exceeds the message limit of "
                f"{self.cfg.max_message_bytes} bytes (raise --max-message-mb on every process)"
            )
        return order

    def _call(
        self, session: Session, handles: list[StageHandle], i: int, order: pb.WorkOrder, rows: int
    ) -> tuple[pb.WorkResult | Work, StageRef, float]:
        """Executes the order on stage i (result, stage, round trip in ms); a dead or hung remote
        stage fails over and the replacement continues the step with the same input (earlier
        stages keep their work). The coordinator's own stage returns its rows unencoded."""
        for attempt in range(MAX_FAILOVERS_PER_STEP + 1):
            ref, ts, h = session.stages[i], time.perf_counter(), handles[i]
            try:
                run = h.compute if isinstance(h, LocalStage) else h.execute
                res = run(order, self.deadline(session, i, rows), self._next(session, handles, i))
                return res, ref, (time.perf_counter() - ts) * 1000
            except RemoteError as e:
                if ref.local or e.code not in FAILOVER_CODES or attempt == MAX_FAILOVERS_PER_STEP:
                    raise
                self.recovery.failover(session, handles, i, order.start_position, e)
        raise AssertionError("unreachable")

    @staticmethod
    def _next(session: Session, handles: list[StageHandle], i: int) -> Batcher | None:
        """The stage the session's next order goes to after stage i: the next stage, or the first
        for the next step (None when this step is its last)."""
        if i + 1 < len(handles):
            return handles[i + 1].batcher
        return handles[0].batcher if len(session.tokens) + 1 < session.max_tokens else None

    def _own(self, work: Work, rows: int, last: bool) -> tuple[WireTensor | None, Tensor | None]:
        """The coordinator's own stage's rows, checked as a worker's are: logits as computed
        (they go nowhere but the sampler), other rows encoded once for the next stage."""
        assert work.y is not None
        if last:
            return None, check_logits(work.y, self.args.vocab_size, rows=1)
        out = check_hidden(work.y, self.args.dim)
        if out.rows != rows:
            raise TensorError(f"{out.rows} output rows for {rows} input rows")
        return out, None

    def _decode(self, res: pb.WorkResult, rows: int, last: bool) -> tuple[WireTensor, Tensor | None]:
        """The result's tensor, checked against the order: shape, rows, all finite (TensorError)."""
        if last:
            return decode_logits(res.output, self.args.vocab_size, rows=1)
        out, _ = decode_hidden(res.output, self.args.dim)
        if out.rows != rows:
            raise TensorError(f"{out.rows} output rows for {rows} input rows")
        return out, None

    def _verify(
        self,
        session: Session,
        i: int,
        ref: StageRef,
        order: pb.WorkOrder,
        res: pb.WorkResult | Work,
        rows: int,
        expected_in: bytes,
    ) -> tuple[WireTensor | None, Tensor | None, tuple[Receipt, bytes] | None]:
        """Checks a result before use (DESIGN.md §7: blame only on evidence). The coordinator's
        own stage is trusted. For a remote one: a malformed tensor or a missing or bad signature
        binds nothing to the node (Unattributable); a validly signed receipt that contradicts the
        order, or a signed output that is unusable (NaN/Inf, wrong rows or shape), is fraud
        (BadResult, after the evidence, ban and rollback target are recorded)."""
        last = i == len(session.stages) - 1
        if isinstance(res, Work):
            try:
                return (*self._own(res, rows, last), None)
            except TensorError as e:
                raise RemoteError(f"stage {i} (the coordinator's own) returned a bad result: {e}") from e
        try:
            wire = WireTensor.from_proto(res.output)
        except TensorError as e:
            raise Unattributable(f"malformed result from {ref.node_id}: {e}") from e
        key = self.cluster.public_key(ref.node_id)
        try:
            receipt = self.verifier.check(order, res, key, expected_in, wire)
            out, logits = self._decode(res, rows, last)
        except UnsignedError as e:
            raise Unattributable(str(e)) from e
        except (ReceiptError, TensorError) as e:
            what = "bad receipt" if isinstance(e, ReceiptError) else "bad result"
            self.verifier.result_fraud(session, i, order, ref.node_id, f"{what}: {e}", res)
            raise BadResult(str(e)) from e
        return out, logits, (receipt, key)

    def deadline(self, session: Session, stage: int, rows: int) -> float:
        """A call's deadline: the prefill's long one, else adaptive to the stage's recent decode
        round trips (so that a hung node is caught in seconds), at most step_timeout_s."""
        cfg = self.cfg
        if rows > 1:
            return cfg.prefill_timeout_s
        steps = session.history[stage].steps
        rtts = [r.round_trip_ms for r in steps[-RTT_WINDOW:] if r.input.rows == 1]
        if not rtts:  # the first decode steps: bounded by the prefill's round trip (more work)
            rtts = [r.round_trip_ms for r in steps[-1:]]
        if not rtts:
            return cfg.step_timeout_s
        adaptive = max(cfg.failover_floor_s, cfg.failover_rtt_factor * statistics.median(rtts) / 1000)
        return min(cfg.step_timeout_s, adaptive)

    def summary(self, session: Session) -> pb.SessionSummary:
        return pb.SessionSummary(
            session_id=session.session_id,
            tokens=session.tokens,
            text=self.tokenizer.decode(session.tokens),
            prompt_tokens=len(session.prompt_ids),
            tokens_per_second=session.tokens_per_second,
            time_to_first_token_s=session.time_to_first_token_s,
            stages=[s.to_proto() for s in session.stats()],
            stop_reason=session.stop_reason,
            audits=session.audits.counts().to_proto(),
            rollbacks=[r.to_proto() for r in session.rollbacks],
            banned_nodes=sorted({r.node for r in session.rollbacks}),
            failovers=[f.to_proto() for f in session.failovers],
            verification=(weakest := worst_class(*(class_of(r.dtype) for r in session.stages))),
            verification_note=WEAKER[weakest],
        )
