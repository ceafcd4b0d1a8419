"""The token loop: the coordinator drives every step through every stage.

It mirrors `consortium.model.generate.generate` step for step (prefill in one call per
stage, then one position per call; sampling at position = cache length after the
forward; EOS is not emitted), so with the same model, dtype, device and seed the
tokens are the single-node tokens. Each stage's exact input and output bytes are
committed to the session history as they pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from consortium.coordinator.stages import StageHandle
from consortium.core.config import CoordinatorConfig
from consortium.core.session import CANCELLED, FAILED, FINISHED, RUNNING, Session, StageStats, StepRecord
from consortium.errors import ConsortiumError
from consortium.model.generate import TextStream
from consortium.model.gguf_file import ModelArgs
from consortium.model.sampling import sample
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import RemoteError
from consortium.transport.tensors import TensorError, WireTensor, decode_hidden, decode_logits

log = logging.getLogger(__name__)


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
    def __init__(self, cfg: CoordinatorConfig, args: ModelArgs, tokenizer: GGUFTokenizer):
        self.cfg, self.args, self.tokenizer = cfg, args, tokenizer

    def run(self, session: Session, handles: list[StageHandle]) -> Iterator[pb.GenerateEvent]:
        """Yields started, one token event per generated token, then the summary."""
        sid, cfg = session.session_id, self.cfg
        opened: list[StageHandle] = []
        try:
            for ref, h in zip(session.stages, handles, strict=True):
                h.open(sid, session.capacity, ref.layers, cfg.step_timeout_s)
                opened.append(h)
            yield pb.GenerateEvent(
                started=pb.SessionStarted(
                    session_id=sid, prompt_tokens=len(session.prompt_ids), max_tokens=session.max_tokens,
                    stages=[stage_info(r) for r in session.stages],
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
            for h in opened:
                try:
                    h.close(sid, 5.0)
                except ConsortiumError as e:
                    log.warning("closing session %s on %s: %s", sid, h.node_id, e)

    def _steps(self, session: Session, handles: list[StageHandle]) -> Iterator[pb.GenerateEvent]:
        sampling, stop_ids = session.request.sampling, self.tokenizer.stop_ids
        stream = TextStream(self.tokenizer)
        x = WireTensor.from_tokens(session.prompt_ids)
        last = len(handles) - 1
        t0 = time.perf_counter()
        session.stop_reason = "max_tokens"
        for step in range(session.max_tokens):
            if session.cancel.is_set():
                session.finish(CANCELLED, "cancelled by the client")
                return
            pos, rows = session.position, x.rows
            timeout = self.cfg.prefill_timeout_s if step == 0 else self.cfg.step_timeout_s
            logits = None
            for i, (ref, h) in enumerate(zip(session.stages, handles, strict=True)):
                order = pb.WorkOrder(
                    session_id=session.session_id, step=step, stage_index=i,
                    layers=pb.LayerRange(start=ref.layers.start, end=ref.layers.end),
                    start_position=pos, input=x.to_proto(),
                )  # fmt: skip
                if order.ByteSize() > self.cfg.max_message_bytes:
                    raise ConsortiumError(
                        f"work order of {order.ByteSize()} bytes for stage {i} exceeds the message limit of "
                        f"{self.cfg.max_message_bytes} bytes (raise --max-message-mb on every process)"
                    )
                ts = time.perf_counter()
                res = h.execute(order, timeout)
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
                session.history[i].append(StepRecord(step, pos, x, out, ref.node_id, rtt_ms, res.compute_ms))
                x = out
            session.position = pos + rows
            token = sample(logits[-1], sampling, position=session.position)
            if not session.tokens:
                session.time_to_first_token_s = time.perf_counter() - t0
            if token in stop_ids:
                session.stop_reason = "eos"
                break
            session.tokens.append(token)
            yield pb.GenerateEvent(token=pb.TokenEvent(token=token, text=stream.push(token)))
            x = WireTensor.from_tokens([token])
        elapsed = time.perf_counter() - t0
        decode_time = elapsed - session.time_to_first_token_s
        n = len(session.tokens)
        session.tokens_per_second = (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0
        session.finish(FINISHED)
        log.info("session %s finished: %d tokens (%s), %.1f tok/s", session.session_id, n,
                 session.stop_reason, session.tokens_per_second)  # fmt: skip
        yield pb.GenerateEvent(done=self.summary(session))

    def summary(self, session: Session) -> pb.SessionSummary:
        return pb.SessionSummary(
            session_id=session.session_id, tokens=session.tokens,
            text=self.tokenizer.decode(session.tokens), prompt_tokens=len(session.prompt_ids),
            tokens_per_second=session.tokens_per_second,
            time_to_first_token_s=session.time_to_first_token_s,
            stages=[stage_stats(s) for s in session.stats()], stop_reason=session.stop_reason,
        )  # fmt: skip
