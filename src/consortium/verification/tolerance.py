"""Fuzzy comparison of committed outputs with an auditor's recomputation (DESIGN.md §4.3-4.4).

Per row: relative L2 error ||c - r|| / ||r|| and max element error / RMS(r), where r is the
auditor's row. Per unit (the rows one audit compares): their mean rel-L2, so rows that all sit
just under the per-row threshold fail. Thresholds come from the committed calibration report,
per layer range and numeric class (calibrate.py), not from guesses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from consortium.errors import ConsortiumError

# Numeric classes, strictest first. Results computed in these dtypes are compared with the strict
# thresholds; bf16 (and the packed int4 kernel of bf16 mode, which computes in bf16) puts a comparison in the
# loose class, where int8-weight shortcuts are not distinguishable.
CLASSES = ("strict", "loose")
STRICT_DTYPES = frozenset({"fp32", "fp16", "tf32"})
# What a session's summary says about the verification of its weakest class (docs/tolerances.md).
WEAKER = {
    "strict": "",
    "loose": "weaker: bf16 rounding hides int8-weight shortcuts, and a x1.05 scaling of the logits of "
    "a last stage of 18 or more layers; steering and scaling are caught over a unit's or a node's "
    "rows, not per row",
}


def class_of(dtype: str, packed: bool = False, device: str = "cpu") -> str:
    """The numeric class of a node's results (the device does not change it on any backend measured).
    Packed fp32 is strict: its kernel multiplies the exact fp32 weights in fp32 (cpu_kernel.py);
    packed bf16 rounds scales and activations to bf16."""
    return "strict" if dtype in STRICT_DTYPES and not (packed and dtype != "fp32") else "loose"


def worst_class(*classes: str) -> str:
    return max(classes, key=CLASSES.index)


def admitted_classes(spec: str) -> frozenset[str]:
    """`--tolerance-classes`: a comma-separated list of classes ("strict", "loose", or "all");
    strict is always admitted. The default, "strict", refuses bf16 and packed nodes."""
    names = {s.strip() for s in spec.split(",") if s.strip()}
    names = set(CLASSES) if "all" in names else names
    if not names or names - set(CLASSES):
        raise ConsortiumError(
            f"tolerance classes {spec!r}: use a comma-separated list of {', '.join(CLASSES)}"
        )
    return frozenset(names | {"strict"})


@dataclass(frozen=True)
class Tolerance:
    name: str  # strict | loose
    rel_l2: float  # tau: bound on every row
    max_rel: float  # tau_max: bound on every row
    mean_rel_l2: float = math.inf  # tau_mean: the unit's mean rel-L2 bound, for many rows
    layers: tuple[int, int] | None = None  # the range calibrated for (None: the class-wide bound)

    def mean_bound(self, rows: int) -> float:
        """The bound on the mean rel-L2 of `rows` rows: tau for one row, tending to tau_mean. Honest
        rows rarely sit near tau; a unit of n rows may hold one such outlier and still pass."""
        if math.isinf(self.mean_rel_l2):
            return self.rel_l2
        return self.mean_rel_l2 + (self.rel_l2 - self.mean_rel_l2) / max(rows, 1)

    def scores(self, rel_l2: Tensor) -> Tensor:
        """Each row's error in units of tau_mean, capped at tau / tau_mean (one row, however bad,
        adds at most that much to the sequential test; worse rows fail the audit anyway)."""
        if math.isinf(self.mean_rel_l2):
            return torch.zeros_like(rel_l2)
        cap = self.rel_l2 / self.mean_rel_l2
        return (rel_l2 / self.mean_rel_l2).nan_to_num(cap, cap, cap).clamp(max=cap)


@dataclass(frozen=True)
class RowComparison:
    rel_l2: Tensor  # [S] float64
    max_rel: Tensor  # [S] float64

    def failing_rows(self, tol: Tolerance) -> list[int]:
        bad = (self.rel_l2 > tol.rel_l2) | (self.max_rel > tol.max_rel) | ~torch.isfinite(self.rel_l2)
        return [int(i) for i in torch.nonzero(bad).reshape(-1)]

    def excess(self, tol: Tolerance) -> Tensor:
        """Per row: score - 1 (> 0 where a row is above tau_mean): the sequential test's increments."""
        return tol.scores(self.rel_l2) - 1

    def mean_fails(self, tol: Tolerance) -> int | None:
        """The row where the excess that fails the mean bound starts (the start of the segment of
        rows with the largest summed excess), or None if the unit's mean is within bounds."""
        if float(self.rel_l2.mean()) <= tol.mean_bound(self.rel_l2.numel()):
            return None
        best, start, run, run_start = -math.inf, 0, 0.0, 0
        for i, e in enumerate(self.excess(tol).tolist()):
            run, run_start = (run + e, run_start) if run > 0 else (e, i)
            if run > best:
                best, start = run, run_start
        return start

    @property
    def worst_rel_l2(self) -> float:
        return float(self.rel_l2.max())

    @property
    def worst_max_rel(self) -> float:
        return float(self.max_rel.max())

    @property
    def mean_rel_l2(self) -> float:
        return float(self.rel_l2.mean())


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


# Reports given with `coordinator start --calibration`, by model digest: loaded once at start,
# before any audit, and read-only after.
_loaded: dict[str, dict] = {}


def load_calibration(path: Path, model_digest: str) -> dict:
    """A `consortium calibrate` report of this model (--calibration): checked, then used for its
    thresholds (per range, class-wide and CUSUM) in place of the committed report's, which are
    another model's. A malformed file or another model's is a clear error."""
    try:
        report = json.loads(Path(path).read_text())
        digest = str(report["model_digest"])
        for k in CLASSES:
            p = report["proposed"][k]
            [float(p[f]) for f in ("rel_l2", "max_rel", "cusum_h")]
        table = report.get("ranges")
        if table is not None:
            starts, n = [int(s) for s in table["sampled_starts"]], int(table["n_layers"])
            for k in CLASSES:
                for f in ("rel_l2", "max_rel", "mean_rel_l2"):
                    rows = table[k][f]
                    if len(rows) != len(starts) or any(
                        len(r) != n - s for r, s in zip(rows, starts, strict=True)
                    ):
                        raise ValueError(f"ranges.{k}.{f} does not cover every range of {n} layers")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConsortiumError(f"calibration file {path}: not a `consortium calibrate` report ({e})") from e
    if digest != model_digest:
        raise ConsortiumError(
            f"calibration file {path} was measured on the model {digest[:16]}…, not this one ({model_digest[:16]}…)"
        )
    _loaded[digest] = report
    return report


def report_for(model_digest: str | None) -> dict:
    """The calibration report for a model: its own if one was loaded, else the committed one."""
    return _loaded.get(model_digest or "") or calibration_report()


def tolerance_for(
    klass: str,
    layers: tuple[int, int] | None = None,
    n_layers: int | None = None,
    model_digest: str | None = None,
    report: dict | None = None,
) -> Tolerance:
    """Thresholds of a class for the stage over `layers` ([start, end)) of the calibrated model
    (`report`: another calibration report than the committed one).

    The report holds thresholds for every range that starts at a sampled layer; a range starting
    between samples takes those of the sampled start before it, whose range holds it and more
    layers, whose rounding adds error (validated on starts that were not sampled:
    docs/tolerances.md). Another model (n_layers and digest), or no range given, gets the
    class-wide bound (the largest over every range measured)."""
    report = report or report_for(model_digest)
    p, table = report["proposed"][klass], report.get("ranges")
    fallback = Tolerance(
        klass, float(p["rel_l2"]), float(p["max_rel"]), float(p.get("mean_rel_l2", math.inf))
    )
    if (
        layers is None
        or table is None
        or (n_layers, model_digest) != (table["n_layers"], report["model_digest"])
    ):
        return fallback
    a, b = layers
    if not 0 <= a < b <= n_layers:
        raise ValueError(f"layer range {a}-{b} outside 0-{n_layers}")
    i = max(i for i, s in enumerate(table["sampled_starts"]) if s <= a)
    j = b - table["sampled_starts"][i] - 1
    t = table[klass]
    return Tolerance(klass, t["rel_l2"][i][j], t["max_rel"][i][j], t["mean_rel_l2"][i][j], (a, b))


def tolerance_class(
    *dtypes: str,
    layers: tuple[int, int] | None = None,
    n_layers: int | None = None,
    model_digest: str | None = None,
) -> Tolerance:
    """Thresholds for comparing work done in these compute dtypes (worst class wins), for a stage
    over `layers` of the model with `n_layers` layers and that digest when given."""
    return tolerance_for(worst_class(*(class_of(d) for d in dtypes)), layers, n_layers, model_digest)
