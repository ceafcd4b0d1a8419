"""Placement: exact tiling of fixed ranges, proportional split for workers without one."""

from __future__ import annotations

import pytest

from consortium.core.config import LayerRange
from consortium.core.placement import (
    COORDINATOR,
    SPARE,
    STANDBY,
    Candidate,
    Capacity,
    Holder,
    PlacementError,
    backup_plan,
    check_tiling,
    choose_auditor,
    choose_tiling,
    plan_flexible,
    split_range,
    uncovered,
)
from consortium.errors import ConsortiumError

L = LayerRange


def test_layer_range_parse_is_half_open():
    r = L.parse("10-20")
    assert (r.start, r.end, len(r), str(r)) == (10, 20, 10, "10-20")
    for bad in ("10", "20-10", "5-5", "a-b", "-3-4"):
        with pytest.raises(ConsortiumError):
            L.parse(bad)
    with pytest.raises(ConsortiumError, match="beyond the model's 30 layers"):
        L(20, 31).check(30)


def test_tiling_in_pipeline_order():
    hs = [Holder("c", L(20, 30)), Holder("a", L(0, 10)), Holder("b", L(10, 20))]
    assert [h.node_id for h in check_tiling(hs, 30)] == ["a", "b", "c"]


def test_gap_and_overlap_are_listed():
    hs = [Holder("c", L(20, 30)), Holder("a", L(0, 12)), Holder("b", L(10, 15))]
    with pytest.raises(PlacementError) as e:
        check_tiling(hs, 30)
    msg = str(e.value)
    assert "overlap 10-12 (a 0-12 and b 10-15)" in msg
    assert "gap 15-20" in msg
    assert "ranges: a 0-12, b 10-15, c 20-30" in msg
    with pytest.raises(PlacementError, match="gap 0-30"):
        check_tiling([], 30)
    with pytest.raises(PlacementError, match="beyond the model's 30 layers"):
        check_tiling([Holder("a", L(0, 31))], 30)


def test_uncovered():
    assert uncovered([Holder("a", L(3, 5))], 8) == [L(0, 3), L(5, 8)]
    assert uncovered([Holder("a", L(0, 8))], 8) == []


def test_split_is_proportional_to_speed():
    hs = split_range(L(0, 20), [Capacity("slow", 1, 100), Capacity("fast", 3, 100)])
    assert hs == [Holder("fast", L(0, 15)), Holder("slow", L(15, 20))]


def test_split_respects_memory_caps():
    hs = split_range(L(0, 20), [Capacity("fast", 10, 4), Capacity("slow", 1, 100)])
    assert {h.node_id: len(h.layers) for h in hs} == {"fast": 4, "slow": 16}
    with pytest.raises(PlacementError, match="can hold 5 layers"):
        split_range(L(0, 20), [Capacity("a", 1, 2), Capacity("b", 1, 3)])


def test_very_slow_nodes_stay_standby():
    hs = split_range(L(0, 4), [Capacity("fast", 100, 100), Capacity("crawl", 1, 100)])
    assert hs == [Holder("fast", L(0, 4))]
    # ... unless memory needs them
    hs = split_range(L(0, 4), [Capacity("fast", 100, 3), Capacity("crawl", 1, 100)])
    assert {h.node_id: len(h.layers) for h in hs} == {"fast": 3, "crawl": 1}


def test_split_tiles_the_gap_exactly():
    for n in range(1, 12):
        for speeds in ([1.0], [1, 1], [5, 1, 1], [1, 2, 3, 4]):
            caps = [Capacity(f"n{i}", s, 100) for i, s in enumerate(speeds)]
            hs = split_range(L(7, 7 + n), caps)
            check_tiling(hs + [Holder("x", L(0, 7))], 7 + n)


def test_plan_flexible_fills_several_gaps():
    caps = [Capacity("a", 1, 100), Capacity("b", 1, 100), Capacity("c", 1, 100)]
    plan = plan_flexible([L(0, 10), L(20, 30)], caps)
    check_tiling(plan + [Holder("coord", L(10, 20))], 30)
    with pytest.raises(PlacementError, match="only 1 worker"):
        plan_flexible([L(0, 10), L(20, 30)], caps[:1])


def test_backup_plan_tries_spares_then_standbys_then_the_coordinator():
    r = LayerRange(10, 20)
    nodes = [
        Candidate("w9", r),  # a spare
        Candidate("w2", r),  # a spare, but it serves the session
        Candidate("w1", r),  # a spare
        Candidate("slow", None, standby=True, speed=1.0, max_layers=30),
        Candidate("fast", None, standby=True, speed=9.0, max_layers=30),
        Candidate("small", None, standby=True, speed=99.0, max_layers=5),  # fastest, but 10 layers don't fit
        Candidate("busy", None),  # no range, not a standby: placement's, not a backup
        Candidate("other", LayerRange(0, 10)),
    ]
    plan = backup_plan(r, nodes, busy={"w2", "dead"}, coordinator="coordinator")
    assert [(c.node_id, c.kind) for c in plan] == [
        ("w1", SPARE),
        ("w9", SPARE),
        ("fast", STANDBY),
        ("slow", STANDBY),
        ("small", STANDBY),
        ("coordinator", COORDINATOR),
    ]
    assert backup_plan(r, [], busy=set(), coordinator=None) == []  # --no-backup and nobody else


def test_auditor_is_another_backend_first_then_by_id_and_never_an_excluded_node():
    r = LayerRange(0, 10)
    nodes = [
        Candidate("b", r, "cpu"),
        Candidate("a", r, "cpu"),
        Candidate("z", r, "cuda"),
        Candidate("x", None),
    ]
    assert choose_auditor(r, "cpu", nodes, exclude=set()) == "z"
    assert choose_auditor(r, "cuda", nodes, exclude=set()) == "a"
    assert choose_auditor(r, "cpu", nodes, exclude={"z", "a"}) == "b"
    assert choose_auditor(r, "cpu", nodes, exclude={"z", "a", "b"}) is None
    assert choose_auditor(LayerRange(0, 5), "cpu", nodes, exclude=set()) is None


def test_overlapping_and_duplicate_ranges_never_block_a_tiling():
    holders = [
        Holder("a", L(0, 10)),
        Holder("stranger", L(5, 15)),  # overlaps a and b: a spare, not a reason to refuse
        Holder("b", L(10, 20)),
        Holder("c", L(20, 30)),
        Holder("dup", L(10, 20)),  # the same range as b, less preferred
        Holder("wide", L(10, 30)),  # one stage instead of two: fewer hops
    ]
    assert [h.node_id for h in choose_tiling(holders, 30)] == ["a", "wide"]
    without_wide = [h for h in holders if h.node_id != "wide"]
    assert [h.node_id for h in choose_tiling(without_wide, 30)] == ["a", "b", "c"]
    preferred_dup = [without_wide[4]] + without_wide[:4]  # dup first: clean audit history
    assert [h.node_id for h in choose_tiling(preferred_dup, 30)] == ["a", "dup", "c"]
    assert choose_tiling([Holder("a", L(0, 10)), Holder("x", L(5, 30))], 30) is None  # no exact tiling
    assert choose_tiling([], 4) is None


def test_registry_serves_a_tiling_and_keeps_strangers_as_spares(tmp_path):
    from consortium.coordinator.registry import Node, Registry
    from consortium.verification.ledger import Ledger

    def node(nid: str, layers: LayerRange, address: str = "127.0.0.1:1") -> Node:
        return Node(nid, address, "cpu", "cpu", "fp32", False, 0, 1.0, layers, "d")

    led = Ledger(tmp_path / "l.db")
    reg = Registry("d", "m", 30, node_timeout_s=8.0, ledger=led)
    for n in (node("w0", L(0, 10)), node("stranger", L(5, 15)), node("w1", L(10, 20)), node("w2", L(20, 30))):
        reg.register(n)
    serving, spares = reg.serving()
    assert [n.node_id for n in serving] == ["w0", "w1", "w2"] and [n.node_id for n in spares] == ["stranger"]
    # a holder with a failed audit on record serves only when nothing cleaner tiles
    reg.register(node("w1b", L(10, 20)))
    led.upsert_node("w1", b"k" * 32, "127.0.0.1:1", "cpu", "fp32")
    led.add_audit("s", 1, 3, "w1", "coordinator", False, "strict", 0.5, 3.0, 0)
    assert [n.node_id for n in reg.serving()[0]] == ["w0", "w1b", "w2"]
    # a live id is never swapped for a registration from elsewhere; the same address may re-register
    with pytest.raises(ConsortiumError, match="registered and alive"):
        reg.register(node("w0", L(0, 10), address="127.0.0.2:1"))
    reg.register(node("w0", L(0, 10)))
