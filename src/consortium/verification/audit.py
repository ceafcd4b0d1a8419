"""Audits: recompute a stage from its committed inputs and compare with its committed outputs.

An audit of a stage at position t recomputes positions 0..t in one prefill over the
exact input bytes the stage consumed, and compares every row it recomputed with the
committed rows (tolerance.py). So auditing position t re-checks all earlier positions of
that stage; a scheduler may fold several selected units of one stage into one audit at
the latest of them without checking less.
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
from consortium.verification.tolerance import Tolerance, compare_rows


@dataclass(frozen=True)
class AuditResult:
    passed: bool
    tolerance: str
    rows: int
    worst_rel_l2: float
    worst_max_rel: float
    first_bad_position: int | None  # the earliest position whose committed output is out of tolerance


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
    bad = cmp.failing_rows(tol)
    return AuditResult(
        passed=not bad,
        tolerance=tol.name,
        rows=int(got.shape[0]),
        worst_rel_l2=cmp.worst_rel_l2,
        worst_max_rel=cmp.worst_max_rel,
        first_bad_position=row_pos[bad[0]] if bad else None,
    )


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
