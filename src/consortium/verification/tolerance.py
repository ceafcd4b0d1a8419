"""Fuzzy comparison of committed outputs with an auditor's recomputation (DESIGN.md §4.3-4.4).

Per row: relative L2 error ||c - r|| / ||r|| and max element error / RMS(r), where r is the
auditor's row. Thresholds come from the committed calibration report, not from guesses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch
from torch import Tensor

# Compute dtypes whose honest results are compared with the strict thresholds; any other
# (bf16) puts a comparison in the loose class, where int8-weight shortcuts are not
# distinguishable per row.
STRICT_DTYPES = frozenset({"fp32", "fp16", "tf32"})


@dataclass(frozen=True)
class Tolerance:
    name: str  # strict | loose
    rel_l2: float  # tau
    max_rel: float  # tau_max


@dataclass(frozen=True)
class RowComparison:
    rel_l2: Tensor  # [S] float64
    max_rel: Tensor  # [S] float64

    def failing_rows(self, tol: Tolerance) -> list[int]:
        bad = (self.rel_l2 > tol.rel_l2) | (self.max_rel > tol.max_rel) | ~torch.isfinite(self.rel_l2)
        return [int(i) for i in torch.nonzero(bad).reshape(-1)]

    @property
    def worst_rel_l2(self) -> float:
        return float(self.rel_l2.max())

    @property
    def worst_max_rel(self) -> float:
        return float(self.max_rel.max())


def compare_rows(committed: Tensor, recomputed: Tensor) -> RowComparison:
    """Row-wise errors of `committed` against the trusted `recomputed` (same shape [S, n])."""
    if committed.shape != recomputed.shape:
        raise ValueError(f"shape {tuple(committed.shape)} vs {tuple(recomputed.shape)}")
    c = committed.reshape(committed.shape[0], -1).double()
    r = recomputed.reshape(recomputed.shape[0], -1).double()
    diff = c - r
    rms = r.pow(2).mean(-1).sqrt().clamp_min(1e-30)
    rel_l2 = diff.norm(dim=-1) / (rms * r.shape[-1] ** 0.5)
    max_rel = diff.abs().amax(-1) / rms
    nan = ~torch.isfinite(c).all(-1)  # NaN/Inf in committed output is never honest
    return RowComparison(rel_l2.masked_fill(nan, float("inf")), max_rel.masked_fill(nan, float("inf")))


@cache
def calibration_report() -> dict:
    """The committed calibration report (consortium calibrate) behind the default thresholds."""
    text = resources.files("consortium.verification").joinpath("calibration.json").read_text()
    return json.loads(text)


def tolerance_class(*dtypes: str) -> Tolerance:
    """Thresholds for comparing work done in these compute dtypes (worst class wins)."""
    name = "strict" if all(d in STRICT_DTYPES for d in dtypes) else "loose"
    t = calibration_report()["proposed"][name]
    return Tolerance(name, float(t["rel_l2"]), float(t["max_rel"]))
