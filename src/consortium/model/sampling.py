"""Token sampling: greedy, temperature, top-k, top-p, driven by explicit seeded generators.

Each position draws from its own generator, seeded from (seed, position), so the token
at a position depends only on its logits and the seed, never on how many draws came
before: a replay after a rollback or failover draws exactly what the first run drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from consortium.errors import InvalidRequestError

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def position_seed(seed: int, position: int) -> int:
    """SplitMix64 of (seed, position): independent streams per position."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def sample(logits: Tensor, params: SamplingParams, position: int) -> int:
    """Choose the token at `position` from logits [vocab] on any device. Sampling runs on the CPU
    (one copy of the logits, the step's only host transfer), where the seeded generator draws: the
    same seed and logits give the same token whichever device computed them."""
    logits = logits.detach().reshape(-1).float().cpu()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.double(), dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= params.top_p
        probs = probs.scatter(0, order[drop], 0.0)
    gen = torch.Generator().manual_seed(position_seed(params.seed, position))
    u = torch.rand(probs.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
    # Exponential race (Gumbel-max): argmax p_i / E_i with E_i ~ Exp(1) samples from p.
    return int(torch.argmax(probs / -torch.log(u)))
