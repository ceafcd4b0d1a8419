"""The token loop: the coordinator drives every step through every stage.

It mirrors `consortium.model.generate.generate` step for step (prefill in one call per
stage, then one position per call; sampling at position = cache length after the
forward; EOS is not emitted), so with the same model, dtype, device and seed the
tokens are the single-node tokens. Each stage's exact input and output bytes are
committed to the session history as they pass.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from consortium.coordinator.stages import StageHandle
from consortium.coordinator.verifier import Verifier
from consortium.core.config import CoordinatorConfig
from consortium.core.session import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    Session,
    StageRef,
    StageStats,
    StepRecord,
)
from consortium.errors import ConsortiumError
from consortium.model.generate import TextStream
from consortium.model.gguf_file import ModelArgs
from consortium.model.sampling import sample
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import RemoteError
from consortium.transport.tensors import TensorError, WireTensor, decode_hidden, decode_logits
from consortium.verification.audit import concat_inputs, judge
from consortium.verification.ledger import Ledger
from consortium.verification.receipts import ReceiptError, input_digest
from consortium.verification.tolerance import tolerance_class

log = logging.getLogger(__name__)
# A remote stage that fails a call with one of these is dead or hung: its stage fails over.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_FAILOVERS_PER_STEP = 3
RTT_WINDOW = 16  # recent decode round trips behind a stage's adaptive deadline


@dataclass(frozen=True)
class Replacement:
    load_ms: float  # choosing the backup, including a standby loading the layers
    replay_ms: float  # rebuilding its KV cache from the committed inputs
    positions: int  # positions replayed
    check: dict | None = None  # the replay compared with the committed outputs (the free audit)


def stage_info(ref) -> pb.StageInfo:
    return pb.StageInfo(
        index=ref.index, node_id=ref.node_id, address=ref.address,
        layers=pb.LayerRange(start=ref.layers.start, end=ref.layers.end),
        device=ref.device, dtype=ref.dtype, local=ref.local,
    )  # fmt: skip


def stage_stats(s: StageStats) -> pb.StageStats:
    return pb.StageStats(
        stage=stage_info(s.stage), prefill_ms=s.prefill_ms, mean_step_ms=s.mean_step_ms,
        mean_compute_ms=s.mean_compute_ms, steps=s.steps, bytes_sent=s.bytes_sent,
        bytes_received=s.bytes_received,
    )  # fmt: skip


class TokenLoop:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        args: ModelArgs,
        tokenizer: GGUFTokenizer,
        verifier: Verifier,
        ledger: Ledger,
        public_key: Callable[[str], bytes],
        replace_stage: Callable[[Session, int, str], tuple[StageRef, StageHandle]],
    ):
        self.cfg, self.args, self.tokenizer = cfg, args, tokenizer
        self.verifier, self.ledger, self.public_key, self.replace_stage = (
            verifier,
            ledger,
            public_key,
            replace_stage,
        )

    def run(self, session: Session, handles: list[StageHandle]) -> Iterator[pb.GenerateEvent]:
        """Yields started, one token event per generated token, then the summary."""
        sid, cfg = session.session_id, self.cfg
        opened: list[StageHandle] = []
        try:
            for i, (ref, h) in enumerate(zip(session.stages, handles, strict=True)):
                try:
                    h.open(sid, session.capacity, ref.layers, cfg.step_timeout_s)
                except RemoteError as e:  # dead or hung before the first step: fail over at position 0
                    if ref.local or e.code not in FAILOVER_CODES:
                        raise
                    self._failover(session, handles, i, 0, e)
                opened.append(handles[i])
            opened = handles  # a rollback may swap a stage's handle: close whatever runs at the end
            done = session.tokens[: session.resumed]
            yield pb.GenerateEvent(
                started=pb.SessionStarted(
                    session_id=sid, prompt_tokens=len(session.prompt_ids), max_tokens=session.max_tokens,
                    stages=[stage_info(r) for r in session.stages], resumed_tokens=done,
                    resumed_text=self.tokenizer.decode(done),
                )
            )  # fmt: skip
            yield from self._steps(session, handles)
        except ConsortiumError as e:
            session.finish(FAILED, str(e))
            log.warning("session %s failed: %s", sid, e)
            raise
        except BaseException as e:  # cancelled stream (GeneratorExit) or a bug: never leave it "running"
            if session.state == RUNNING:
                session.finish(CANCELLED if isinstance(e, GeneratorExit) else FAILED, repr(e))
            raise
        finally:
            self.verifier.release(session)
            try:
                self.ledger.set_session_status(sid, session.state, session.error or None)
            except ConsortiumError as e:
                log.error("ledger: %s", e)
            for h in opened:
                try:
                    h.close(sid, 5.0)
                except ConsortiumError as e:
                    log.warning("closing session %s on %s: %s", sid, h.node_id, e)

    def _steps(self, session: Session, handles: list[StageHandle]) -> Iterator[pb.GenerateEvent]:
        sampling, stop_ids = session.request.sampling, self.tokenizer.stop_ids
        v, audits, sid = self.verifier, session.audits, session.session_id
        stream = TextStream(self.tokenizer)
        for t in session.tokens:  # a resumed session: its text so far was sent in `started`
            stream.push(t)
        # A resumed session prefills the prompt and every committed token in its first step.
        x = WireTensor.from_tokens(session.prompt_ids + session.tokens)
        t0 = time.perf_counter()
        step, eos, first = session.first_step, False, True
        while True:
            if audits.fraud is None and (eos or len(session.tokens) >= session.max_tokens):
                # The result waits for outstanding audits; a late failure rolls back and goes on.
                if not session.request.wait_audits or not v.wait(audits, self.cfg.audit_wait_timeout_s):
                    break
                if audits.fraud is None:
                    break
            if audits.fraud is not None:
                x = yield from self._rollback(session, handles)
                stream = TextStream(self.tokenizer)
                for t in session.tokens:
                    stream.push(t)
                eos = False
                continue
            if session.cancel.is_set():
                session.finish(CANCELLED, "cancelled by the client")
                return
            logits = self._step(session, handles, step, x)
            step += 1
            if logits is None:  # a bad receipt: the rollback happens at the top of the loop
                continue
            while session.events:  # failovers of this step, live
                yield session.events.pop(0)
            token = sample(logits[-1], sampling, position=session.position)
            if first:
                session.time_to_first_token_s, first = time.perf_counter() - t0, False
            if token in stop_ids:
                eos = True
                continue
            session.tokens.append(token)
            self.ledger.put_token(sid, session.position, token)
            yield pb.GenerateEvent(token=pb.TokenEvent(token=token, text=stream.push(token)))
            x = WireTensor.from_tokens([token])
        while session.events:
            yield session.events.pop(0)
        session.stop_reason = "eos" if eos else "max_tokens"
        elapsed = time.perf_counter() - t0
        decode_time = elapsed - session.time_to_first_token_s
        n = len(session.tokens) - session.resumed  # generated by this run
        session.tokens_per_second = (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0
        session.finish(FINISHED)
        log.info("session %s finished: %d tokens (%s), %.1f tok/s", session.session_id, n,
                 session.stop_reason, session.tokens_per_second)  # fmt: skip
        yield pb.GenerateEvent(done=self.summary(session))

    def _step(self, session: Session, handles: list[StageHandle], step: int, x: WireTensor):
        """One position range through every stage, checking each remote receipt before its
        output is used. Returns the logits, or None when a receipt was bad (fraud recorded)."""
        v, audits, sid = self.verifier, session.audits, session.session_id
        pos, rows = session.position, x.rows
        expected_in = input_digest(sid, 0, pos, x)
        receipts, keys, logits = [], {}, None
        last = len(handles) - 1
        for i, (ref, h) in enumerate(zip(session.stages, handles, strict=True)):
            order = pb.WorkOrder(
                session_id=sid, step=step, stage_index=i,
                layers=pb.LayerRange(start=ref.layers.start, end=ref.layers.end),
                start_position=pos, input=x.to_proto(),
            )  # fmt: skip
            if order.ByteSize() > self.cfg.max_message_bytes:
                raise ConsortiumError(
                    f"work order of {order.ByteSize()} bytes for stage {i} exceeds the message limit of "
                    f"{self.cfg.max_message_bytes} bytes (raise --max-message-mb on every process)"
                )
            for attempt in range(MAX_FAILOVERS_PER_STEP + 1):
                ts = time.perf_counter()
                try:
                    res = h.execute(order, self.deadline(session, i, rows))
                    break
                except RemoteError as e:
                    if ref.local or e.code not in FAILOVER_CODES or attempt == MAX_FAILOVERS_PER_STEP:
                        raise
                    # Earlier stages keep this step's work; the replacement continues it with the same input.
                    ref, h = self._failover(session, handles, i, pos, e)
            rtt_ms = (time.perf_counter() - ts) * 1000
            try:
                if i == last:
                    out, logits = decode_logits(res.output, self.args.vocab_size, rows=1)
                else:
                    out, _ = decode_hidden(res.output, self.args.dim)
                    if out.rows != rows:
                        raise TensorError(f"{out.rows} output rows for {rows} input rows")
            except TensorError as e:
                raise RemoteError(f"stage {i} ({ref.node_id}) returned a bad result: {e}") from e
            if ref.local:  # the coordinator's own work: it is the verifier
                expected_in = v.output_digest(session, i, pos, out)
            else:
                key = self.public_key(ref.node_id)
                try:
                    receipt = v.check(session, order, res, key, expected_in, out)
                except ReceiptError as e:
                    v.receipt_fraud(session, audits, i, order, ref.node_id, e, res)
                    return None
                receipts.append(receipt)
                keys[ref.node_id] = key
                expected_in = receipt.output_digest
            session.history[i].append(StepRecord(step, pos, x, out, ref.node_id, rtt_ms, res.compute_ms))
            x = out
        v.record_step(session, receipts, keys)
        for i, ref in enumerate(session.stages):
            if not ref.local:
                v.maybe_audit(session, audits, i, pos + rows)
        session.position = pos + rows
        return logits

    def _rollback(self, session: Session, handles: list[StageHandle]) -> Iterator[pb.GenerateEvent]:
        """Withdraw everything from the first bad position on, give the stage to an honest node
        (replaying its committed inputs), and return the input of the next step."""
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
        ref, _ = self._replace(session, handles, s, p, fraud.node_id, background_close=False)
        n_prompt = len(session.prompt_ids)
        n_kept = max(0, p + 1 - n_prompt)
        session.tokens = session.tokens[:n_kept]
        session.resumed = min(session.resumed, n_kept)
        session.position = p
        self.ledger.rollback_tokens(sid, p + 1)
        ev = pb.RollbackEvent(stage=s, position=p, node_id=fraud.node_id, reason=fraud.reason,
                              kept_tokens=n_kept, new_node_id=ref.node_id)  # fmt: skip
        session.rollbacks.append(ev)
        self.ledger.event(sid, "rollback", {"stage": s, "position": p, "node": fraud.node_id,
                                            "reason": fraud.reason, "new_node": ref.node_id})  # fmt: skip
        log.warning("session %s rolled back to position %d; stage %d now on %s", sid, p, s, ref.node_id)
        yield pb.GenerateEvent(rollback=ev)
        ids = session.prompt_ids + session.tokens
        return WireTensor.from_tokens(ids[p : n_prompt + n_kept])

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

    def _failover(self, session: Session, handles: list[StageHandle], s: int, p: int,
                  err: RemoteError) -> tuple[StageRef, StageHandle]:  # fmt: skip
        """Stage s's node died or hung at the step starting at position p: give the stage to a
        backup that replays its committed inputs for positions < p, and record the failover."""
        sid, failed = session.session_id, session.stages[s].node_id
        t0 = time.perf_counter()
        log.warning(
            "session %s: stage %d (%s) failed at position %d: %s; failing over", sid, s, failed, p, err
        )
        ref, rep = self._replace(session, handles, s, p, failed, background_close=True)
        latency_ms = (time.perf_counter() - t0) * 1000
        ev = pb.FailoverEvent(stage=s, token_index=len(session.tokens), failed_node=failed,
                              backup_node=ref.node_id, latency_ms=latency_ms, replay_ms=rep.replay_ms,
                              replayed_positions=rep.positions, load_ms=rep.load_ms, error=str(err))  # fmt: skip
        session.failovers.append(ev)
        session.events.append(pb.GenerateEvent(failover=ev))
        self.ledger.event(sid, "failover", {"stage": s, "position": p, "token_index": ev.token_index,
                                            "failed_node": failed, "backup_node": ref.node_id,
                                            "latency_ms": latency_ms, "replay_ms": rep.replay_ms,
                                            "load_ms": rep.load_ms, "error": str(err),
                                            "replay_check": rep.check})  # fmt: skip
        log.warning("session %s: stage %d failed over from %s to %s at token %d in %.0f ms (replay of %d "
                    "positions %.0f ms, load %.0f ms)", sid, s, failed, ref.node_id, ev.token_index, latency_ms,
                    rep.positions, rep.replay_ms, rep.load_ms)  # fmt: skip
        return ref, handles[s]

    def _replace(self, session: Session, handles: list[StageHandle], s: int, p: int, old_node: str,
                 background_close: bool) -> tuple[StageRef, Replacement]:  # fmt: skip
        """Give stage s to another node (the coordinator's choice) and rebuild its KV cache:
        replay the stage's committed inputs for positions < p in one prefill, and compare the
        replay with the committed outputs (a free audit). Shared by fraud rollback and failover."""
        sid, old = session.session_id, session.stages[s]
        self._close_quietly(handles[s], sid, old_node, background_close)
        t0 = time.perf_counter()
        ref, handle = self.replace_stage(session, s, old_node)
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
                session_id=sid, step=kept[-1].step, stage_index=s,
                layers=pb.LayerRange(start=ref.layers.start, end=ref.layers.end), start_position=0,
                input=x.to_proto(),
            )  # fmt: skip
            res = handle.execute(order, self.cfg.prefill_timeout_s)
            result = self._compare_replay(session, s, old, ref, kept, res)
            check = None if result is None else {
                "passed": result.passed, "worst_rel_l2": result.worst_rel_l2, "tolerance": result.tolerance,
                "first_bad_position": result.first_bad_position,
            }  # fmt: skip
        replay_ms = (time.perf_counter() - t1) * 1000
        return ref, Replacement(load_ms, replay_ms, kept[-1].positions.stop if kept else 0, check)

    def _close_quietly(self, h: StageHandle, sid: str, node_id: str, background: bool) -> None:
        def close() -> None:
            try:
                h.close(sid, 0.5 if background else 5.0)
            except ConsortiumError as e:
                log.info("closing session %s on the replaced node %s: %s", sid, node_id, e)

        if background:  # a hung node must not delay the failover
            threading.Thread(target=close, name=f"close-{node_id}", daemon=True).start()
        else:
            close()

    def _compare_replay(self, session: Session, s: int, old: StageRef, ref: StageRef,
                        kept: list[StepRecord], res: pb.WorkResult):  # fmt: skip
        """The replay recomputed what the stage committed: compare (a free audit). A mismatch is
        logged, not fraud by the backup (the committed work may be the bad one)."""
        sid = session.session_id
        try:
            if ref.layers.end == self.args.n_layers:  # logits of the last position only
                out, _ = decode_logits(res.output, self.args.vocab_size, rows=1)
                stop = kept[-1].positions.stop
                committed, positions = [kept[-1].output], [range(stop - 1, stop)]
            else:
                out, _ = decode_hidden(res.output, self.args.dim)
                committed, positions = [r.output for r in kept], [r.positions for r in kept]
            result = judge(committed, positions, out.to_torch(), False, tolerance_class(old.dtype, ref.dtype))
        except (TensorError, ValueError, RuntimeError, IndexError) as e:
            log.warning(
                "session %s: the replay of stage %d on %s could not be compared: %s", sid, s, ref.node_id, e
            )
            return None
        if result.passed:
            log.info("session %s: replay of stage %d on %s matches the committed outputs of %s (rel-L2 %.2e, %s)",
                     sid, s, ref.node_id, old.node_id, result.worst_rel_l2, result.tolerance)  # fmt: skip
        else:
            log.warning("session %s: replay of stage %d on %s DIFFERS from the committed outputs of %s from "
                        "position %s (rel-L2 %.2e, %s)", sid, s, ref.node_id, old.node_id,
                        result.first_bad_position, result.worst_rel_l2, result.tolerance)  # fmt: skip
        return result

    def summary(self, session: Session) -> pb.SessionSummary:
        return pb.SessionSummary(
            session_id=session.session_id, tokens=session.tokens,
            text=self.tokenizer.decode(session.tokens), prompt_tokens=len(session.prompt_ids),
            tokens_per_second=session.tokens_per_second,
            time_to_first_token_s=session.time_to_first_token_s,
            stages=[stage_stats(s) for s in session.stats()], stop_reason=session.stop_reason,
            audits=session.audits.summary(), rollbacks=session.rollbacks,
            banned_nodes=sorted({r.node_id for r in session.rollbacks}), failovers=session.failovers,
        )  # fmt: skip
