"""Audits: recompute a stage from its committed inputs and compare with its committed outputs.

An audit of a stage at position t recomputes positions 0..t in one prefill over the
exact input bytes the stage consumed, and compares every row it recomputed with the
committed rows (tolerance.py). So auditing position t re-checks all earlier positions of
that stage; a scheduler may fold several selected units of one stage into one audit at
the latest of them without checking less. An audit fails when a row is out of tolerance or
when the unit's rows are, on average, too far off (tolerance.py); its per-row excess feeds the
per-node sequential test (sequential.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec
from consortium.transport.tensors import WireTensor
from consortium.verification.tolerance import RowComparison, Tolerance, compare_rows


@dataclass(frozen=True)
class AuditResult:
    passed: bool
    tolerance: str
    rows: int
    worst_rel_l2: float
    worst_max_rel: float
    first_bad_position: int | None  # the earliest position whose committed output is out of tolerance
    mean_rel_l2: float = 0.0  # over the unit's rows
    mean_bound: float = float("inf")  # what that mean had to stay within (Tolerance.mean_bound)
    excess: float = 0.0  # sum over the rows of (score - 1): the sequential test's increment
    excess_tail: float = 0.0  # the largest sum of excess over a suffix of the rows (>= 0)
    first_position: int | None = None  # the first position compared (where a unit-wide failure starts)
    reason: str = ""  # why it failed: which bound, by how much


def concat_inputs(inputs: list[WireTensor]) -> Tensor:
    """The stage's committed inputs for positions 0..t, as one prefill input."""
    return torch.cat([w.to_torch() for w in inputs])


def judge(
    committed: list[WireTensor],
    positions: list[range],
    recomputed: Tensor,
    is_last: bool,
    tol: Tolerance,
) -> AuditResult:
    """Compare the committed outputs of consecutive steps with a recomputation of all positions.

    A last stage commits logits of the last position of each step only, so those rows are
    compared; other stages commit every position's hidden state."""
    rows, row_pos = [], []
    for w, pos in zip(committed, positions, strict=True):
        t = w.to_torch().float()
        if is_last:
            rows.append(t[-1:])
            row_pos.append(pos.stop - 1)
        else:
            rows.append(t)
            row_pos.extend(pos)
    got = torch.cat(rows)
    idx = torch.tensor(row_pos) - positions[0].start
    cmp = compare_rows(got, recomputed.float()[idx])
    bad, spread = cmp.failing_rows(tol), cmp.mean_fails(tol)
    starts = [i for i in (bad[0] if bad else None, spread) if i is not None]
    first = min(starts) if starts else None
    excess = cmp.excess(tol).flip(0).cumsum(0)  # suffix sums, last row first
    return AuditResult(
        passed=first is None,
        tolerance=tol.name,
        rows=int(got.shape[0]),
        worst_rel_l2=cmp.worst_rel_l2,
        worst_max_rel=cmp.worst_max_rel,
        first_bad_position=None if first is None else row_pos[first],
        mean_rel_l2=cmp.mean_rel_l2,
        mean_bound=tol.mean_bound(len(row_pos)),
        excess=float(excess[-1]),
        excess_tail=max(0.0, float(excess.max())),
        first_position=row_pos[0],
        reason=_reason(cmp, tol, bool(bad), spread is not None),
    )


def _reason(cmp: RowComparison, tol: Tolerance, row: bool, spread: bool) -> str:
    out = []
    if row:
        rel, mx = (
            f"{cmp.worst_rel_l2:.3g} (<= {tol.rel_l2:.3g})",
            f"{cmp.worst_max_rel:.3g} (<= {tol.max_rel:.3g})",
        )
        out.append(f"row rel-L2 {rel}, max/RMS {mx}")
    if spread:
        n = cmp.rel_l2.numel()
        out.append(f"mean rel-L2 {cmp.mean_rel_l2:.3g} over {n} rows (<= {tol.mean_bound(n):.3g})")
    return "; ".join(out)


class LocalAuditor:
    """Recomputes any layer range in this process, loading stages on first use (the
    coordinator can audit every stage it does not run itself)."""

    node_id = "coordinator"

    def __init__(
        self,
        gguf: GGUFModel,
        device: str = "cpu",
        dtype: str = "fp32",
        on_load: Callable[[str], None] | None = None,
    ):
        self.gguf, self.device, self.dtype, self.on_load = gguf, device, dtype, on_load
        self._stages: dict[tuple[int, int], Stage] = {}
        self._lock = threading.Lock()

    def stage(self, start: int, end: int) -> Stage:
        with self._lock:
            st = self._stages.get((start, end))
            if st is None:
                if self.on_load:
                    self.on_load(f"auditor loading layers {start}-{end}")
                st = Stage(self.gguf, StageSpec(start, end, device=self.device, dtype=self.dtype))
                self._stages[(start, end)] = st
            return st

    def recompute(self, start: int, end: int, inputs: list[WireTensor]) -> Tensor:
        st = self.stage(start, end)
        x = concat_inputs(inputs)
        cache = st.new_cache(x.shape[0])
        return st(x, cache, all_logits=st.is_last)
