"""Deliberately dishonest stages, for tests and calibration only.

Kept apart from the honest code path: a worker builds one only with `--misbehave KIND`,
and only when CONSORTIUM_ALLOW_MISBEHAVE=1 is set. Each cheat is one a lazy or malicious
node might try: skip work, use cheaper weights, perturb results, or lie in its receipts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from consortium.errors import ConsortiumError
from consortium.model.model import Block, Linear, Stage, load_block
from consortium.transport.proto import consortium_pb2 as pb

KINDS = (
    "skip-layer",
    "noise",
    "wrong-weights",
    "int4-weights",
    "int8-weights",
    "flip-max",
    "bad-signature",
    "replay",
)
ENABLE_ENV = "CONSORTIUM_ALLOW_MISBEHAVE"


class _SkippedBlock(Block):
    """A layer that does nothing (and leaves its KV cache untouched)."""

    def __init__(self):
        torch.nn.Module.__init__(self)

    def forward(self, x: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
        return x


@dataclass(frozen=True)
class Misbehaviour:
    kind: str
    sigma: float = 0.0  # noise: standard deviation relative to each row's RMS

    @classmethod
    def parse(cls, text: str, enabled: bool | None = None) -> Misbehaviour:
        """'noise=0.01', 'skip-layer', ...; refused unless explicitly enabled."""
        if enabled is None:
            enabled = os.environ.get(ENABLE_ENV) == "1"
        if not enabled:
            raise ConsortiumError(f"--misbehave is for tests only; set {ENABLE_ENV}=1 to enable it")
        kind, _, arg = text.partition("=")
        if kind not in KINDS:
            raise ConsortiumError(f"unknown misbehaviour {kind!r} (one of: {', '.join(KINDS)})")
        if kind == "noise":
            try:
                sigma = float(arg)
            except ValueError:
                raise ConsortiumError(
                    f"noise needs a relative sigma, e.g. noise=0.01 (got {text!r})"
                ) from None
            return cls(kind, sigma)
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
                if isinstance(m, Linear) and m.weight is not None:
                    m.weight = requantize(m.weight, bits)
        return stage

    def corrupt_output(self, out: Tensor, step: int) -> Tensor:
        """Apply output-level cheats to a stage's result rows."""
        if self.kind == "noise":
            g = torch.Generator().manual_seed(1_000_003 * step + 17)
            rms = out.float().pow(2).mean(-1, keepdim=True).sqrt()
            noise = torch.randn(out.shape, generator=g) * rms * self.sigma
            return (out.float() + noise).to(out.dtype)
        if self.kind == "flip-max":
            out = out.clone()
            idx = out.abs().argmax(-1, keepdim=True)
            out.scatter_(-1, idx, -out.gather(-1, idx))
            return out
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


def requantize(w: Tensor, bits: int) -> Tensor:
    """Round-to-nearest symmetric quantization: int4 per group of 32, int8 per output row."""
    wf = w.float()
    if bits == 4:
        g = wf.reshape(wf.shape[0], -1, 32)
        scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
        return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape).to(w.dtype)
    scale = wf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(wf / scale).clamp(-127, 127) * scale).to(w.dtype)
