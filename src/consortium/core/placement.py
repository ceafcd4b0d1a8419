"""Placement: which node runs which layers.

Two rules. Ranges that nodes bring (`--layers`) must tile [0, n_layers) exactly: a gap
or an overlap is an error that lists every range. Nodes that bring no range share the
uncovered layers in proportion to their measured speed (so stage times balance), each
capped by how many layers fit its memory — exo's memory-weighted split, with memory as
the bound and speed as the weight, because a pipeline runs at the pace of its slowest
stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from consortium.core.config import LayerRange
from consortium.errors import ConsortiumError


class PlacementError(ConsortiumError):
    """The nodes' layer ranges do not make a complete pipeline."""


@dataclass(frozen=True)
class Holder:
    """A node holding a layer range (`backup`: the coordinator holds it after a failover or ban)."""

    node_id: str
    layers: LayerRange
    backup: bool = False

    def __str__(self) -> str:
        return f"{self.node_id} {self.layers}"


@dataclass(frozen=True)
class Capacity:
    """What a node without a range offers: relative speed and the most layers its memory holds."""

    node_id: str
    speed: float
    max_layers: int


def describe(holders: list[Holder]) -> str:
    return ", ".join(str(h) for h in sorted(holders, key=lambda h: (h.layers, h.node_id))) or "none"


def uncovered(holders: list[Holder], n_layers: int) -> list[LayerRange]:
    """Maximal runs of layers in [0, n_layers) that no holder covers."""
    covered = [False] * n_layers
    for h in holders:
        for i in range(max(h.layers.start, 0), min(h.layers.end, n_layers)):
            covered[i] = True
    gaps, start = [], None
    for i, c in enumerate(covered + [True]):
        if not c and start is None:
            start = i
        elif c and start is not None:
            gaps.append(LayerRange(start, i))
            start = None
    return gaps


def overlaps(holders: list[Holder]) -> list[str]:
    """Descriptions of every pair of ranges that share layers."""
    order = sorted(holders, key=lambda h: (h.layers.start, h.layers.end, h.node_id))
    found = []
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            if b.layers.start >= a.layers.end:
                break
            found.append(f"overlap {b.layers.start}-{min(a.layers.end, b.layers.end)} ({a} and {b})")
    return found


def check_tiling(holders: list[Holder], n_layers: int) -> list[Holder]:
    """The holders in pipeline order if they tile [0, n_layers) exactly, else PlacementError."""
    problems = []
    for h in holders:
        if not 0 <= h.layers.start < h.layers.end <= n_layers:
            problems.append(f"{h} is beyond the model's {n_layers} layers")
    problems += overlaps(holders)
    problems += [f"gap {g} (no node holds these layers)" for g in uncovered(holders, n_layers)]
    if problems:
        raise PlacementError(
            f"layer ranges do not tile [0, {n_layers}): {'; '.join(problems)}; ranges: {describe(holders)}"
        )
    return sorted(holders, key=lambda h: h.layers.start)


def split_range(gap: LayerRange, nodes: list[Capacity]) -> list[Holder]:
    """Contiguous sub-ranges of `gap`, sized in proportion to speed within memory caps.

    Nodes beyond the number of layers (slowest first) get nothing: they stay standbys.
    """
    n = len(gap)
    usable = [c for c in nodes if c.max_layers >= 1]
    usable = sorted(usable, key=lambda c: -c.speed)[:n]
    if sum(c.max_layers for c in usable) < n:
        raise PlacementError(
            f"the workers without a range can hold {sum(c.max_layers for c in usable)} layers "
            f"by their memory; layers {gap} need {n}"
        )
    while True:  # a node too slow to earn half a layer is more use as a standby
        share = _water_fill(usable, n)
        slow = [c for c in usable if share[c.node_id] < 0.5]
        if not slow:
            break
        slowest = min(slow, key=lambda c: c.speed)
        if sum(c.max_layers for c in usable) - slowest.max_layers < n:
            break
        usable.remove(slowest)
    weights = {c.node_id: max(c.speed, 1e-9) for c in usable}
    caps = {c.node_id: c.max_layers for c in usable}
    # integer layers: floors (at least one each), then to whoever is furthest below its share
    count = {k: min(caps[k], max(1, math.floor(v))) for k, v in share.items()}
    while sum(count.values()) < n:
        k = max((k for k in count if count[k] < caps[k]), key=lambda k: (share[k] - count[k], weights[k]))
        count[k] += 1
    while sum(count.values()) > n:  # the at-least-one rule overshot: take from whoever is most above
        k = max((k for k in count if count[k] > 1), key=lambda k: (count[k] - share[k], -weights[k]))
        count[k] -= 1
    holders, start = [], gap.start
    for c in usable:  # fastest first, from the front of the gap
        holders.append(Holder(c.node_id, LayerRange(start, start + count[c.node_id])))
        start += count[c.node_id]
    return holders


def _water_fill(nodes: list[Capacity], n: int) -> dict[str, float]:
    """Real-valued shares of n layers proportional to speed; a node whose share exceeds its
    cap gets the cap and the others share the rest."""
    weights = {c.node_id: max(c.speed, 1e-9) for c in nodes}
    caps = {c.node_id: c.max_layers for c in nodes}
    share: dict[str, float] = {}
    free, left = set(weights), float(n)
    while free:
        total = sum(weights[k] for k in free)
        over = {k for k in free if left * weights[k] / total >= caps[k]}
        if not over:
            share.update({k: left * weights[k] / total for k in free})
            break
        for k in over:
            share[k] = caps[k]
            left -= caps[k]
        free -= over
    return share


def plan_flexible(gaps: list[LayerRange], nodes: list[Capacity]) -> list[Holder]:
    """Ranges for nodes without one so that, with the gaps filled, the pipeline is complete."""
    if not gaps:
        return []
    if len(nodes) < len(gaps):
        raise PlacementError(
            f"{len(gaps)} uncovered layer ranges ({', '.join(map(str, gaps))}) but only "
            f"{len(nodes)} worker(s) without a range"
        )
    # each gap gets one node (largest gap, fastest node), then extra nodes go where layers per node is highest
    order = sorted(nodes, key=lambda c: -c.speed)
    groups: dict[LayerRange, list[Capacity]] = {g: [] for g in gaps}
    for g, c in zip(sorted(gaps, key=lambda g: -len(g)), order, strict=False):
        groups[g].append(c)
    for c in order[len(gaps) :]:
        g = max(gaps, key=lambda g: len(g) / (len(groups[g]) + 1))
        groups[g].append(c)
    return [h for g in gaps for h in split_range(g, groups[g])]


# --- failover and audit choices ---------------------------------------------------------

SPARE, STANDBY, COORDINATOR = "spare", "standby", "coordinator"


@dataclass(frozen=True)
class Candidate:
    """A live, admitted, non-banned worker as the backup and auditor choices see it."""

    node_id: str
    layers: LayerRange | None
    backend: str = "cpu"
    standby: bool = False
    speed: float = 0.0
    max_layers: int = 0  # layers its memory holds in its compute format


@dataclass(frozen=True)
class BackupChoice:
    node_id: str
    kind: str  # spare | standby | coordinator


def backup_plan(
    layers: LayerRange, candidates: list[Candidate], busy: set[str], coordinator: str | None
) -> list[BackupChoice]:
    """Who takes over `layers` from a failed or caught node, in the order to try: live workers
    already holding exactly those layers and not in the session (spares, by id); then standbys,
    which load the layers (those with the memory first, then the fastest, then by id); then the
    coordinator itself (None: it does not back up). Deterministic, so that it can be logged."""
    free = [c for c in candidates if c.node_id not in busy]
    spares = sorted(c.node_id for c in free if c.layers == layers)
    standbys = sorted(
        (c for c in free if c.standby and c.layers is None),
        key=lambda c: (c.max_layers < len(layers), -c.speed, c.node_id),
    )
    plan = [BackupChoice(n, SPARE) for n in spares] + [BackupChoice(c.node_id, STANDBY) for c in standbys]
    return plan + ([BackupChoice(coordinator, COORDINATOR)] if coordinator is not None else [])


def choose_auditor(
    layers: LayerRange, audited_backend: str, candidates: list[Candidate], exclude: set[str]
) -> str | None:
    """A worker holding exactly `layers` and not one of `exclude` audits them: one on another
    backend than the audited node first (DESIGN.md §4), then by id. None: the coordinator audits."""
    able = [c for c in candidates if c.layers == layers and c.node_id not in exclude]
    if not able:
        return None
    return min(able, key=lambda c: (c.backend == audited_backend, c.node_id)).node_id


def choose_tiling(holders: list[Holder], n_layers: int) -> list[Holder] | None:
    """Holders whose ranges tile [0, n_layers) exactly, or None if none do. `holders` come in
    order of preference (clean audit history, then who took the range first): of the tilings,
    the one with the fewest stages wins (fewer hops), then the most preferred holders. Extra,
    duplicate or overlapping ranges never block a session: their holders are spares."""
    best: dict[int, tuple[int, int, list[Holder]] | None] = {n_layers: (0, 0, [])}
    for pos in range(n_layers - 1, -1, -1):
        options = []
        for rank, h in enumerate(holders):
            rest = best.get(h.layers.end) if h.layers.start == pos and h.layers.end <= n_layers else None
            if rest is not None:
                options.append((rest[0] + 1, rest[1] + rank, [h, *rest[2]]))
        best[pos] = min(options, key=lambda o: o[:2]) if options else None
    found = best.get(0)
    return found[2] if found else None
