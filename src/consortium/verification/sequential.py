"""A per-node sequential test over audited rows: a node whose errors sit consistently high fails.

A single audit bounds each row and the unit's mean (tolerance.py); a node that spreads a small
bias thin -- a steering push or a scale just under the per-row bound, on every row -- passes
units of one or two rows. So every audit also feeds a one-sided CUSUM per node over its rows'
scores (rel-L2 / tau_mean of the range and class, capped at tau / tau_mean): S grows by
sum(score - 1) and never drops below 0. Honest rows average well below tau_mean, so S stays
near 0; h is calibrated on honest data (calibrate.py: a margin over the largest S that any
honest sequence of rows reached). A cheat whose rows average k x tau_mean is flagged after
about h / (k - 1) rows, whichever session, stage or auditor they came from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from consortium.verification.audit import AuditResult
from consortium.verification.tolerance import CLASSES, report_for


@dataclass(frozen=True)
class Verdict:
    passed: bool
    statistic: float  # the node's CUSUM after this audit
    threshold: float  # h of the audit's class
    reason: str = ""


def cusum_thresholds(model_digest: str | None = None) -> dict[str, float]:
    """h per class, from the model's calibration report (tolerance.report_for)."""
    return {k: float(report_for(model_digest)["proposed"][k]["cusum_h"]) for k in CLASSES}


class NodeErrorStats:
    """The running statistic of every node audited (in memory: a restart starts from 0, which
    only delays detection)."""

    def __init__(self, thresholds: dict[str, float] | None = None):
        self.h = thresholds if thresholds is not None else cusum_thresholds()
        self._s: dict[str, float] = {}
        self._lock = threading.Lock()

    def update(self, node_id: str, result: AuditResult) -> Verdict:
        """Add one audit's rows (AuditResult.excess/excess_tail: the same CUSUM over the unit's
        rows, in order) and test. A failed verdict means: treat the node as if this audit had
        failed at its first position."""
        h = self.h[result.tolerance]
        with self._lock:
            s = max(0.0, self._s.get(node_id, 0.0) + result.excess, result.excess_tail)
            self._s[node_id] = s
        if s <= h:
            return Verdict(True, s, h)
        last = f"{result.tolerance}; last unit mean rel-L2 {result.mean_rel_l2:.3g}"
        why = f"sequential test: CUSUM {s:.3g} > {h:.3g} ({last})"
        return Verdict(False, s, h, why)

    def statistic(self, node_id: str) -> float:
        with self._lock:
            return self._s.get(node_id, 0.0)

    def forget(self, node_id: str) -> None:
        """Drop a node's statistic (after a ban: it gets no more work)."""
        with self._lock:
            self._s.pop(node_id, None)
