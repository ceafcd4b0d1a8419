"""Audits: recompute a stage from its committed inputs and compare with its committed outputs.

An audit of a stage at position t recomputes positions 0..t in one prefill over the
exact input bytes the stage consumed, and compares every row it recomputed with the
committed rows (tolerance.py). So auditing position t re-checks all earlier positions of
that stage; a scheduler may fold several selected units of one stage into one audit at
the latest of them without checking less. An audit fails when a row is out of tolerance or
when the unit's rows are, on average, too far off (tolerance.py); its per-row excess feeds the
per-node sequential test (sequential.py).

The coordinator's own recomputation (LocalAuditor) runs in the representation the audited stage
declares, within a memory budget; an audit over it is refused (AuditRefused), never judged.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from consortium.errors import ConsortiumError
from consortium.model.gguf_file import GGUFModel
from consortium.model.memory import available_bytes, stage_bytes
from consortium.model.model import KVCache, Stage, StageSpec
from consortium.model.quants import int4_mm
from consortium.transport.tensors import WireTensor
from consortium.verification.tolerance import RowComparison, Tolerance, class_of, compare_rows

AUDIT_MARGIN = 1 << 30  # free memory left to everything else when no audit budget is set
GiB, MiB = 1 << 30, 1 << 20


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


class AuditRefused(ConsortiumError):
    """This coordinator cannot hold what an audit needs (over its audit memory budget, or out of
    memory): the unit is unverifiable here, which says nothing about the audited node."""


@dataclass(frozen=True)
class Representation:
    """How a stage computes: its dtype, and whether its quantized weights stay packed (fp32: the
    strict kernel; bf16: the int4 kernel)."""

    dtype: str = "fp32"
    packed: bool = False

    @property
    def klass(self) -> str:
        return class_of(self.dtype, self.packed)

    def __str__(self) -> str:
        return self.dtype + (" packed" if self.packed else "")


def audit_representation(declared: Representation, device: str) -> Representation:
    """What the auditor recomputes in on `device`: the audited stage's own representation, so that
    an audit costs what the stage costs (never a dense fp32 copy of a range declared compact).
    Packed forms run only on a CPU (bf16: with PyTorch's int4 kernel); elsewhere the same dtype
    dense is the closest form (the same numeric class)."""
    if declared.packed and (device != "cpu" or (declared.dtype == "bf16" and int4_mm is None)):
        return Representation(declared.dtype)
    return declared


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


StageKey = tuple[int, int, Representation]  # layers [start, end) in a representation


@dataclass
class _Held:
    """A loaded audit stage and how many open audits use it (an unused one may be dropped)."""

    stage: Stage
    nbytes: int
    users: int = 0


@dataclass
class AuditLease:
    """An audit stage and a KV cache of the auditor's, counted against its budget until closed."""

    stage: Stage
    cache: KVCache
    rep: Representation
    kv_bytes: int
    _close: Callable[[], None]
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()


class LocalAuditor:
    """Recomputes any layer range in this process (the coordinator can audit every stage it does
    not run itself), in the representation the audited stage declares (audit_representation).

    Audit stages are loaded on first use and kept for reuse, within `budget` bytes of weights and
    KV caches (None: whatever the device has free, less AUDIT_MARGIN). Before loading, the stage's
    size is estimated from the tensor metadata (model/memory.py); a stage no open audit uses is
    dropped, least recently used first, to make room, and an audit that still does not fit is
    refused (AuditRefused, naming both numbers) before anything loads."""

    node_id = "coordinator"

    def __init__(
        self,
        gguf: GGUFModel,
        device: str = "cpu",
        *,
        budget: int | None = None,
        on_load: Callable[[str], None] | None = None,
    ):
        self.gguf, self.device, self.budget, self.on_load = gguf, device, budget, on_load
        self._stages: OrderedDict[StageKey, _Held] = OrderedDict()
        self._kv_bytes = 0  # KV caches of open audits
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Weights of the loaded audit stages and the KV caches of open audits."""
        return sum(h.nbytes for h in self._stages.values()) + self._kv_bytes

    def loaded(self) -> list[StageKey]:
        """The audit stages held, least recently used first."""
        with self._lock:
            return list(self._stages)

    def open(self, start: int, end: int, declared: Representation, capacity: int) -> AuditLease:
        """A stage of layers [start, end) in the auditor's form of `declared`, with a KV cache of
        `capacity` rows; raises AuditRefused when it does not fit."""
        rep = audit_representation(declared, self.device)
        spec = StageSpec(start, end, self.device, rep.dtype, rep.packed)
        key = (start, end, rep)
        kv = KVCache.nbytes_for(self.gguf.args, end - start, capacity, spec.torch_dtype)
        with self._lock:  # loads one at a time: the budget is checked against what is held
            held = self._stages.get(key)
            weights = 0 if held is not None else stage_bytes(self.gguf, spec)
            self._make_room(key, spec, weights, kv)
            if held is None:
                held = self._stages[key] = _Held(self._load(spec, rep), weights)
            self._stages.move_to_end(key)
            held.users += 1
            self._kv_bytes += kv
        cache = held.stage.new_cache(capacity)
        return AuditLease(held.stage, cache, rep, kv, lambda: self._release(key, kv))

    def _release(self, key: StageKey, kv: int) -> None:
        with self._lock:
            self._kv_bytes -= kv
            self._stages[key].users -= 1

    def _allowance(self) -> tuple[int, str]:
        """The bytes audits may hold in all, and that figure in words."""
        if self.budget is not None:
            return self.budget, f"the audit memory budget is {_size(self.budget)}"
        total = self.held_bytes + available_bytes(self.device) - AUDIT_MARGIN
        return total, (
            f"audits may use only {_size(total)} (free memory on {self.device} less a "
            f"{_size(AUDIT_MARGIN)} margin; --audit-memory-mb sets a budget)"
        )

    def _make_room(self, key: StageKey, spec: StageSpec, weights: int, kv: int) -> None:
        """Drop stages no audit uses (least recently used first) until `weights` + `kv` more bytes
        fit; else refuse before anything loads."""
        allowance, what = self._allowance()
        idle = [k for k, h in self._stages.items() if h.users == 0 and k != key]
        while self.held_bytes + weights + kv > allowance and idle:
            del self._stages[idle.pop(0)]
        if self.held_bytes + weights + kv > allowance:
            held = f", {_size(self.held_bytes)} of it held by other audits" if self.held_bytes else ""
            raise AuditRefused(
                f"an audit of layers {spec.start}-{spec.end} in {key[2]} needs about "
                f"{_size(weights + kv)} (weights {_size(weights)}, KV cache {_size(kv)}) but {what}{held}"
            )

    def _load(self, spec: StageSpec, rep: Representation) -> Stage:
        if self.on_load:
            self.on_load(f"auditor loading layers {spec.start}-{spec.end} ({rep})")
        try:
            return Stage(self.gguf, spec)
        except ConsortiumError as e:  # e.g. less memory free than the estimate: unverifiable here
            raise AuditRefused(f"an audit of layers {spec.start}-{spec.end} in {rep} cannot load: {e}") from e
