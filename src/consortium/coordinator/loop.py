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
import queue
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from torch import Tensor

from consortium.coordinator.batching import later
from consortium.coordinator.cluster import Cluster
from consortium.coordinator.recovery import Recovery
from consortium.coordinator.stages import StageHandle
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


@dataclass(eq=False)
class _Flight:
    """One step on its way through the stages (one stage at a time)."""

    number: int
    pos: int
    x: WireTensor  # stage i's input (every stage's has the step's rows)
    expected_in: bytes  # its digest, as the stage must sign it
    i: int = 0
    receipts: list[tuple[Receipt, bytes]] = field(default_factory=list)
    failovers: int = 0  # at stage i in this step
    order: pb.WorkOrder | None = None
    sent: float = 0.0


@dataclass(frozen=True)
class _Failed:
    flight: _Flight
    error: RemoteError | Unattributable


_PAUSE = object()  # a step ended and the session's thread must look before the next


@dataclass(eq=False)
class _Run:
    """A session's token loop, shared by its thread and the callbacks that drive its steps: one
    of them at a time (handed over through `inbox`: tokens, _Failed, _PAUSE or an exception)."""

    session: Session
    handles: list[StageHandle]
    step: int  # the next step's number
    x: WireTensor  # the next step's input
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    t0: float = field(default_factory=time.perf_counter)
    last: float = 0.0  # when the latest token was sampled
    first: bool = True
    eos: bool = False

    def __post_init__(self) -> None:
        self.last = self.t0

    def tell(self, item: object) -> None:
        """Hands the session's thread a token or trouble, in order, once the callbacks' orders
        are out (`batching.later`): waking it must not delay the next stage."""
        later(functools.partial(self.inbox.put, item))


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
        """The per-token loop: run the stages, accept the result, sample audits, emit. The steps
        go on in the batches' callback thread (`_advance`) while nothing needs this thread; it
        streams their tokens and takes over for rollbacks, failovers and the end."""
        stream = self._text_stream(session)
        # A resumed session prefills the prompt and every committed token in its first step.
        run = _Run(
            session, handles, session.first_step, WireTensor.from_tokens(session.prompt_ids + session.tokens)
        )
        while not self._finished(session, run.eos):
            if session.audits.fraud is not None:
                ev, run.x = self.recovery.rollback(session, handles)
                yield pb.GenerateEvent(rollback=ev.to_proto())
                stream, run.eos = self._text_stream(session), False
                continue
            if session.cancel.is_set():
                session.finish(CANCELLED, "cancelled by the client")
                return
            self._leave_banned(session, handles)
            flight = self._begin(run)
            while flight is not None:  # steps until one needs this thread
                msg = run.inbox.get()
                if isinstance(msg, int):
                    yield pb.GenerateEvent(token=pb.TokenEvent(token=msg, text=stream.push(msg)))
                elif isinstance(msg, _Failed):  # a stage failed mid-step: a backup takes it, the step goes on
                    flight = self._fail_over(run, msg)
                    yield from self._unsent_failovers(session)
                    self._send(run, flight)
                elif isinstance(msg, BaseException):
                    raise msg
                else:  # paused: a check is due (the end, a fraud, a cancel, a ban) at the top
                    flight = None
        yield from self._unsent_failovers(session)
        self._finish(session, run.eos, run.last - run.t0)  # the decode rate, not the wait for the last audits
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

    # --- one step through the stages ------------------------------------------------------------

    def _begin(self, run: _Run) -> _Flight:
        """Starts the next step: its input goes to the first stage."""
        session, x = run.session, run.x
        pos = session.position
        f = _Flight(run.step, pos, x, input_digest(session.session_id, 0, pos, x))
        run.step += 1
        self._send(run, f)
        return f

    def _send(self, run: _Run, f: _Flight) -> None:
        """Orders stage f.i's part of the step; the result comes back to `_advance`."""
        f.order = self._order(run.session, f.i, f.number, f.pos, f.x)
        f.sent = time.perf_counter()
        deadline = self.deadline(run.session, f.i, f.x.rows)
        run.handles[f.i].submit(f.order, deadline, functools.partial(self._on_result, run, f))

    def _on_result(self, run: _Run, f: _Flight, res: pb.WorkResult | Work | Exception) -> None:
        try:
            self._advance(run, f, res)
        except BaseException as e:  # the session's thread raises it (the session fails)
            run.tell(e)

    def _advance(self, run: _Run, f: _Flight, res: pb.WorkResult | Work | Exception) -> None:
        """Stage f.i's result, verified before its output is used: on to the next stage, or (after
        the last) sample, commit and go on to the next step while nothing needs the session's
        thread. A failed call or a result nothing binds to its node goes to that thread to fail
        over; a signed wrong result (the fraud recorded) pauses the session for its rollback."""
        session, i = run.session, f.i
        rtt_ms, ref = (time.perf_counter() - f.sent) * 1000, session.stages[i]
        if isinstance(res, RemoteError):
            run.tell(_Failed(f, res))
            return
        if isinstance(res, Exception):
            raise res
        try:
            out, logits, receipt = self._verify(session, i, ref, f.order, res, f.x.rows, f.expected_in)
        except Unattributable as e:
            run.tell(_Failed(f, e))
            return
        except BadResult:
            run.tell(_PAUSE)
            return
        if receipt is None:  # the coordinator's own work: it is the verifier
            if out is not None:  # (its logits feed no stage: nothing to bind)
                f.expected_in = self.verifier.output_digest(session, i, f.pos, out)
        else:
            f.receipts.append(receipt)
            f.expected_in = receipt[0].output_digest
        # Logits are a vocabulary of floats per token (0.5 MB for Llama 3) for the session's life:
        # the coordinator's own are not kept (nothing audits or replays its work), a remote
        # stage's go to disk until audits read them.
        kept: WireTensor | SpilledTensor | None = out
        if logits is not None and out is not None:
            kept = self._spill(session).put(out)
        nbytes = out.nbytes if out is not None else logits.nbytes if logits is not None else 0
        rec = StepRecord(
            f.number, f.pos, f.x, kept, ref.node_id, rtt_ms, res.compute_ms, res.batch_size or 1, nbytes
        )
        session.history[i].append(rec)
        if i + 1 < len(run.handles):
            assert out is not None
            f.i, f.x, f.failovers = i + 1, out, 0
            self._send(run, f)
            return
        assert logits is not None
        self._sampled(run, StepResult(logits, f.receipts, f.pos + f.x.rows))

    def _sampled(self, run: _Run, result: StepResult) -> None:
        session = run.session
        token = sample(result.logits[-1], session.request.sampling, position=result.end)
        run.last = time.perf_counter()
        if run.first:
            session.time_to_first_token_s, run.first = run.last - run.t0, False
        run.eos = token in self.tokenizer.stop_ids
        self._accept(session, result, None if run.eos else token)
        if not run.eos:
            run.tell(token)
            run.x = WireTensor.from_tokens([token])
        if self._goes_on(run):
            self._begin(run)
        else:
            run.tell(_PAUSE)

    def _goes_on(self, run: _Run) -> bool:
        """Whether the next step may start without the session's thread: not the end, no fraud to
        roll back, not cancelled, no stage on a node banned meanwhile."""
        session = run.session
        if run.eos or len(session.tokens) >= session.max_tokens or session.cancel.is_set():
            return False
        if session.audits.fraud is not None:
            return False
        return not any(not ref.local and self.cluster.is_banned(ref.node_id) for ref in session.stages)

    def _fail_over(self, run: _Run, failed: _Failed) -> _Flight:
        """Stage i's call failed (dead, hung, refusing) or its result binds nothing to its node:
        a backup takes the stage and the step goes on there with the same input (earlier stages
        keep their work). Anything else fails the session."""
        f, err = failed.flight, failed.error
        session, i = run.session, f.i
        ref = session.stages[i]
        if isinstance(err, Unattributable):
            if f.failovers == MAX_FAILOVERS_PER_STEP:
                raise RemoteError(f"stage {i} ({ref.node_id}): {err}", grpc.StatusCode.UNAVAILABLE) from err
            err = RemoteError(str(err), grpc.StatusCode.UNAVAILABLE)
        elif ref.local or err.code not in FAILOVER_CODES or f.failovers == MAX_FAILOVERS_PER_STEP:
            raise err
        self.recovery.failover(session, run.handles, i, f.pos, err)
        f.failovers += 1
        return f

    def _spill(self, session: Session) -> SpillFile:
        if session.spill is None:  # its last stage moved to a remote node: it grows as it goes
            session.spill = self.spills.open(0)
        return session.spill

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
