"""Audit coverage (core/config.py AUDIT_COVERAGES), in one process on the tiny model. Full: a
session's end is a checkpoint of every audited stage, so a cheat in rows after the last drawn
unit is still caught. Sampled: nothing is audited during generation; at the end each remote
stage is drawn with the audit probability and a drawn one is recomputed in full."""

from __future__ import annotations

import pytest
from helpers.inprocess import coordinators, single_node_tokens

from consortium.core.config import CoordinatorConfig, LayerRange, SessionRequest
from consortium.errors import ConsortiumError, InvalidRequestError
from consortium.model.sampling import SamplingParams

PROMPT = "the cat sat on the"
TOKENS = 12
GREEDY = SamplingParams(temperature=0.0)
W0, W1 = LayerRange(0, 1), LayerRange(1, 2)


@pytest.fixture
def coordinator(tiny_gguf, tmp_path):
    yield from coordinators(tiny_gguf, tmp_path)


def _cluster(coordinator, cheat: str | None = None):
    c = coordinator()
    c.add_node("w0", W0)
    c.add_node("w1", W1, misbehave=cheat)
    return c


def _audited_ends(c, r) -> dict[int, list[int]]:
    """stage -> the last position of each of its audits, from the ledger."""
    out: dict[int, list[int]] = {}
    for a in c.ledger.audits(r.session.session_id):
        out.setdefault(a["stage"], []).append(a["position"])
    return out


def test_full_coverage_checks_the_tail_after_the_last_drawn_unit(coordinator, tiny_gguf):
    """At p = 0.01 (seed 2) no unit is drawn during generation: only the end's checkpoint
    audits, and it catches a cheat that ran from the first step."""
    c = _cluster(coordinator, "noise=0.05")
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, audit_probability=0.01, audit_seed=2)
    assert r.tokens == single_node_tokens(tiny_gguf, PROMPT, TOKENS, GREEDY)
    assert [(b.stage, b.node) for b in r.rollbacks] == [(1, "w1")]
    assert list(r.summary.banned_nodes) == ["w1"]
    # one audit of w1, over every row of the first run: the end's checkpoint
    [audit] = [a for a in c.ledger.audits(r.session.session_id) if a["node"] == "w1"]
    assert not audit["passed"] and audit["first_bad_position"] == 0


def test_full_coverage_with_every_unit_drawn_adds_no_audit_at_the_end(coordinator):
    c = _cluster(coordinator)
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, audit_probability=1.0, audit_seed=1)
    ends = _audited_ends(c, r)
    assert r.rollbacks == [] and sorted(ends) == [0, 1]
    assert all(len(v) == len(set(v)) for v in ends.values())  # no unit audited twice


def test_sampled_coverage_audits_only_at_the_end_and_catches_a_drawn_cheat(coordinator, tiny_gguf):
    c = _cluster(coordinator, "noise=0.05")
    r = c.generate(
        ["w0", "w1"], PROMPT, TOKENS, GREEDY, audit_probability=1.0, audit_seed=1, audit_coverage="sampled"
    )
    assert r.tokens == single_node_tokens(tiny_gguf, PROMPT, TOKENS, GREEDY)
    assert [(b.stage, b.node) for b in r.rollbacks] == [(1, "w1")]
    [audit] = [a for a in c.ledger.audits(r.session.session_id) if a["node"] == "w1"]
    assert not audit["passed"] and audit["first_bad_position"] == 0  # all of the stage, at its end
    honest = [a["position"] for a in c.ledger.audits(r.session.session_id) if a["node"] == "w0"]
    assert honest and min(honest) >= audit["position"]  # w0: only at an end, none mid-generation


def test_sampled_coverage_checks_a_share_of_stages_in_full(coordinator):
    """p = 0.5 over 8 sessions (seeded): some stages are checked, some not; a checked one is
    recomputed in one audit of all its rows, and none is audited during generation."""
    c = _cluster(coordinator)
    checked = 0
    for seed in range(8):
        r = c.generate(
            ["w0", "w1"], PROMPT, 4, GREEDY, audit_probability=0.5, audit_seed=seed, audit_coverage="sampled"
        )
        end = r.session.position - 1
        ends = _audited_ends(c, r)
        assert all(v == [end] for v in ends.values()), ends
        assert r.session.audits.counts().failed == 0
        checked += len(ends)
    assert 0 < checked < 16


def test_sampled_coverage_at_zero_audits_nothing(coordinator):
    c = _cluster(coordinator, "noise=0.05")
    r = c.generate(["w0", "w1"], PROMPT, 4, GREEDY, audit_probability=0.0, audit_coverage="sampled")
    assert _audited_ends(c, r) == {} and r.rollbacks == []


def test_unknown_coverage_is_refused(tiny_gguf):
    with pytest.raises(InvalidRequestError, match="unknown audit coverage 'most'"):
        SessionRequest("hi", audit_coverage="most").check()
    with pytest.raises(ConsortiumError, match="unknown audit coverage"):
        CoordinatorConfig(model=tiny_gguf, audit_coverage="")
