"""Deliberately dishonest or faulty stages, for tests and calibration only.

Kept apart from the honest code path: a worker builds a `MisbehavingRunner` (a StageRunner
subclass) only with `--misbehave KIND`, and only when CONSORTIUM_ALLOW_MISBEHAVE=1 is set.
Each cheat is one a lazy or malicious node might try: skip work, use cheaper weights, perturb
results (noise; `steer=R` pushes every row toward one token by R of its norm; `scale=F`
multiplies it by F), or lie in its receipts; an output cheat with `@N` (e.g. `steer=0.5@2`)
touches only the N-th session opened on the node, as one cheated user in a batch. `die-at=N` and `hang-at=N` fail at an exact step instead, so
a failover test can predict the token where it happens.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
from torch import Tensor

from consortium.errors import ConsortiumError
from consortium.model.cpu_kernel import QuantSegment
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Block, Linear, Spans, Stage, StageSpec, load_block
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor
from consortium.worker.runner import StageRunner

log = logging.getLogger(__name__)

KINDS = (
    "skip-layer",
    "noise",
    "steer",
    "scale",
    "wrong-weights",
    "int4-weights",
    "int8-weights",
    "flip-max",
    "bad-signature",
    "replay",
    "die-at",
    "hang-at",
    "die-on-audit",
    "nan",
    "extra-row",
)
FAULTS = ("die-at", "hang-at", "die-on-audit")
AUDIT_MARK = ".audit"  # in every audit session id (the coordinator's audit_session_id)
ENABLE_ENV = "CONSORTIUM_ALLOW_MISBEHAVE"
VALUED = {  # the cheats that take a number
    "noise": "a relative sigma, e.g. noise=0.01",
    "steer": "a relative size, e.g. steer=0.07",
    "scale": "a factor, e.g. scale=1.05",
}
STEER_TOKEN = 2000  # the token `steer` pushes toward (modulo the vocabulary)


class _SkippedBlock(Block):
    """A layer that does nothing (and leaves its KV cache untouched)."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.decode = None  # never the kernel's one-call block: this forward runs

    def forward(
        self, x: Tensor, freqs_cis: Tensor, caches: list[tuple[Tensor, Tensor]], spans: Spans
    ) -> Tensor:
        return x


@dataclass(frozen=True)
class Misbehaviour:
    kind: str
    sigma: float = 0.0  # noise: standard deviation relative to each row's RMS
    step: int = 0  # die-at / hang-at: the coordinator's step number that triggers the fault
    amount: float = 0.0  # steer: ||push|| / ||row||; scale: the factor
    session: int = 0  # output cheats with `@N`: only the N-th session opened on the node (0: all)

    @classmethod
    def parse(cls, text: str, enabled: bool | None = None) -> Misbehaviour:
        """'noise=0.01', 'skip-layer', ...; refused unless explicitly enabled."""
        if enabled is None:
            enabled = os.environ.get(ENABLE_ENV) == "1"
        if not enabled:
            raise ConsortiumError(f"--misbehave is for tests only; set {ENABLE_ENV}=1 to enable it")
        text, _, nth = text.partition("@")
        if nth and (not nth.isdigit() or int(nth) < 1):
            raise ConsortiumError(f"@N needs a session number N >= 1 (got {nth!r})")
        m = cls._parse(text)
        return replace(m, session=int(nth)) if nth else m

    @classmethod
    def _parse(cls, text: str) -> Misbehaviour:
        kind, _, arg = text.partition("=")
        if kind not in KINDS:
            raise ConsortiumError(f"unknown misbehaviour {kind!r} (one of: {', '.join(KINDS)})")
        if kind in VALUED:
            try:
                value = float(arg)
            except ValueError:
                raise ConsortiumError(f"{kind} needs {VALUED[kind]} (got {text!r})") from None
            return cls(kind, value) if kind == "noise" else cls(kind, amount=value)
        if kind in FAULTS:
            if not arg.isdigit() or int(arg) < 1:
                raise ConsortiumError(f"{kind} needs a decode step N >= 1, e.g. {kind}=5 (got {text!r})")
            return cls(kind, step=int(arg))
        if arg:
            raise ConsortiumError(f"misbehaviour {kind} takes no argument")
        return cls(kind)

    @property
    def corrupts_receipts(self) -> bool:
        return self.kind in ("bad-signature", "replay")

    def corrupt_stage(self, stage: Stage) -> Stage:
        """Apply weight-level cheats to a freshly loaded stage (in place)."""
        if self.kind == "skip-layer":
            stage.layers[-1] = _SkippedBlock()
        elif self.kind == "wrong-weights":  # the last layer runs with another layer's weights
            last = stage.spec.end - 1
            other = last - 1 if last > 0 else last + 1
            stage.layers[-1] = load_block(stage.gguf, other, stage.spec)
        elif self.kind in ("int4-weights", "int8-weights"):
            bits = 4 if self.kind == "int4-weights" else 8
            for m in stage.layers.modules():
                if isinstance(m, Linear) and m.packed and all(isinstance(s, QuantSegment) for s in m.packed):
                    m.weight, m.packed = torch.cat([s.dense() for s in m.packed]), None  # strict kernel's
                if isinstance(m, Linear) and m.weight is not None:
                    m.weight = requantize(m.weight, bits)
            for b in stage.layers:
                b.find_decode_weights()  # the dense weights now: no longer the kernel's block
        return stage

    def corrupt_output(self, out: Tensor, step: int, gguf: GGUFModel | None = None) -> Tensor:
        """Apply output-level cheats to a stage's result rows (`steer` needs the model)."""
        if self.kind == "noise":
            g = torch.Generator().manual_seed(1_000_003 * step + 17)
            rms = out.float().pow(2).mean(-1, keepdim=True).sqrt()
            noise = torch.randn(out.shape, generator=g) * rms * self.sigma
            return (out.float() + noise).to(out.dtype)
        if self.kind == "scale":
            return (out.float() * self.amount).to(out.dtype)
        if self.kind == "steer":
            if gguf is None:
                raise ValueError("steer needs the model (its token embeddings)")
            u = steer_direction(gguf, out.shape[-1]).to(out.device)
            push = out.float().norm(dim=-1, keepdim=True) * self.amount * u
            return (out.float() + push).to(out.dtype)
        if self.kind == "flip-max":
            out = out.clone()
            idx = out.abs().argmax(-1, keepdim=True)
            out.scatter_(-1, idx, -out.gather(-1, idx))
            return out
        if self.kind == "nan":  # a signed result no stage can use
            out = out.clone()
            out[..., 0] = float("nan")
            return out
        if self.kind == "extra-row":  # more rows than the order asked for, signed
            return torch.cat([out, out[-1:]])
        return out

    def corrupt_receipt(self, receipt: pb.Receipt, sent: list[pb.Receipt]) -> pb.Receipt:
        """bad-signature: flip a bit of the signature. replay: resend the previous step's receipt."""
        out = pb.Receipt()
        if self.kind == "replay" and sent:
            out.CopyFrom(sent[-1])
            return out
        out.CopyFrom(receipt)
        if self.kind == "bad-signature":
            sig = bytearray(out.signature)
            sig[0] ^= 1
            out.signature = bytes(sig)
        return out

    def fault_due(self, order: pb.WorkOrder) -> bool:
        """Whether die-at=N / hang-at=N fires on this work order: the decode order of step N of a
        normal session, i.e. `order.step == N`, `order.start_position > 0` (not a prefill, resume
        or replay, which start at 0) and no ".audit" in the session id (not an audit's recompute).

        The coordinator numbers steps from the session's first step (0 for a new session: the
        prefill), one per pass through the pipeline. In a new session without an earlier EOS or
        rollback, step N consumes token N-1 at position prompt_tokens + N - 1: the client has
        received tokens 0 .. N-1 (the prefill's and N-1 decode results) and the failover that
        follows reports token_index N. die-on-audit=N fires on the N-th order of an audit
        session instead (a remote auditor's recompute: its steps count from 0)."""
        if self.kind == "die-on-audit":
            return AUDIT_MARK in order.session_id and order.step == self.step - 1
        return (
            self.kind in FAULTS
            and order.step == self.step
            and order.start_position > 0
            and AUDIT_MARK not in order.session_id
        )

    def fault(self) -> None:
        """die-at: SIGKILL to itself (as `kill -9`). hang-at: SIGSTOP to itself (every thread,
        heartbeats included, stops until SIGCONT; then the order completes, late)."""
        what = "hanging (SIGSTOP)" if self.kind == "hang-at" else "dying (SIGKILL)"
        log.warning("misbehaviour %s=%d: %s at step %d", self.kind, self.step, what, self.step)
        for h in logging.getLogger().handlers:  # the log line must survive the kill
            h.flush()
        if self.kind != "hang-at":
            os.kill(os.getpid(), signal.SIGKILL)  # reaches every thread at once
        else:  # from this thread, so that it stops before it can answer the order
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


class MisbehavingRunner(StageRunner):
    """A StageRunner with a cheat or a fault: corrupts the stage as loaded (`_load_stage`), its
    output rows (`_forward`) or its receipts (`_sign`), or fails at a step (`execute`). A fault
    fires once per process: a hung worker that is continued serves on honestly."""

    def __init__(self, *args, misbehaviour: Misbehaviour, **kwargs):
        self.misbehaviour = misbehaviour  # set first: StageRunner.__init__ calls _load_stage
        self._sent: list[pb.Receipt] = []  # honest receipts already sent (what `replay` resends)
        self._faulted = False
        self._opened: list[str] = []  # session ids in the order they were opened (for `@N`)
        super().__init__(*args, **kwargs)

    def _load_stage(self, spec: StageSpec, progress: Callable[[int, int], None] | None) -> Stage:
        return self.misbehaviour.corrupt_stage(super()._load_stage(spec, progress))

    def _before(self, order: pb.WorkOrder) -> None:
        if not self._faulted and self.misbehaviour.fault_due(order):
            self._faulted = True
            self.misbehaviour.fault()

    def open(self, req: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        if AUDIT_MARK not in req.session_id and req.session_id not in self._opened:
            self._opened.append(req.session_id)
        return super().open(req)

    def _output(self, order: pb.WorkOrder, y: Tensor) -> Tensor:
        if not self._targets(order.session_id):
            return y
        return self.misbehaviour.corrupt_output(y, order.step, self.gguf)

    def _targets(self, session_id: str) -> bool:
        """`@N`: only the N-th session opened here (audits of it too) is cheated on."""
        n = self.misbehaviour.session
        if not n:
            return True
        base = session_id.split(AUDIT_MARK)[0]
        return len(self._opened) >= n and self._opened[n - 1] == base

    def _sign(self, order: pb.WorkOrder, inp: WireTensor, out: WireTensor) -> pb.Receipt:
        receipt = super()._sign(order, inp, out)
        if not self.misbehaviour.corrupts_receipts:
            return receipt
        sent = self.misbehaviour.corrupt_receipt(receipt, self._sent)
        self._sent.append(receipt)
        return sent


def make_runner(*args, misbehaviour: Misbehaviour | None = None, **kwargs) -> StageRunner:
    """A StageRunner (StageRunner's arguments), misbehaving as told (tests only) or honest."""
    if misbehaviour is None:
        return StageRunner(*args, **kwargs)
    return MisbehavingRunner(*args, misbehaviour=misbehaviour, **kwargs)


def requantize(w: Tensor, bits: int) -> Tensor:
    """Round-to-nearest symmetric quantization: int4 per group of 32, int8 per output row."""
    wf = w.float()
    if bits == 4:
        g = wf.reshape(wf.shape[0], -1, 32)
        scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
        return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape).to(w.dtype)
    scale = wf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(wf / scale).clamp(-127, 127) * scale).to(w.dtype)


@cache
def steer_direction(gguf: GGUFModel, width: int) -> Tensor:
    """The unit vector toward token STEER_TOKEN: its (tied) embedding row for hidden states, its own
    logit for logits. Pushing a hidden state along the embedding raises that token's logit."""
    tok = STEER_TOKEN % gguf.args.vocab_size
    if width != gguf.args.dim:
        u = torch.zeros(width)
        u[tok] = 1.0
        return u
    row = torch.from_numpy(gguf.dequantize("token_embd.weight", rows=np.array([tok]))).float().reshape(-1)
    return row / row.norm()
