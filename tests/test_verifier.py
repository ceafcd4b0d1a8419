"""The verifier in one process (tests/helpers/inprocess.py), every unit audited: a cheat (a
wrong result an audit finds, a signed receipt that contradicts the order, a signed unusable
result) is caught, banned and rolled back so the tokens stay the single-node ones; a remote
auditor's mismatch is confirmed by the coordinator before anyone is banned (a lying auditor
is banned instead), a colluding one is caught by the re-check; an auditor lost mid-audit
moves the audit without calling anyone a cheat; audits run serially per session, sessions in
parallel."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from helpers.inprocess import coordinators, single_node_tokens

from consortium.core.config import LayerRange
from consortium.core.records import RollbackRecord
from consortium.model.sampling import SamplingParams
from consortium.transport.proto import consortium_pb2 as pb

PROMPT = "the cat sat on the"
TOKENS = 24
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, top_k=50, seed=11)
W0, W1 = LayerRange(0, 1), LayerRange(1, 2)
EVERY_UNIT = {"audit_probability": 1.0, "audit_seed": 1}
WAIT_S = 60.0  # deadline of every wait on another thread


@pytest.fixture
def coordinator(tiny_gguf, tmp_path):
    yield from coordinators(tiny_gguf, tmp_path)


def _baseline(tiny_gguf, sampling: SamplingParams) -> list[int]:
    return single_node_tokens(tiny_gguf, PROMPT, TOKENS, sampling)


def _settled(r) -> None:
    counts = r.session.audits.counts()
    assert counts.pending == 0 and counts.passed > 0, counts


def _auditors(c, r, stage: int) -> set[str]:
    return {a["auditor"] for a in c.ledger.audits(r.session.session_id) if a["stage"] == stage}


@pytest.mark.parametrize(
    ("cheat", "stage", "spare", "sampling", "reason"),
    [
        ("noise=0.05", 1, False, GREEDY, "failed audit"),
        ("noise=0.05", 1, True, SEEDED, "failed audit"),
        ("replay", 0, False, SEEDED, "bad receipt"),
        ("nan", 1, False, GREEDY, "bad result"),
        ("wrong-weights", 1, False, SEEDED, "failed audit"),
    ],
    ids=["noise", "noise-spare", "replay", "nan", "wrong-weights"],
)
def test_a_cheat_is_caught_banned_and_rolled_back(
    coordinator, tiny_gguf, cheat, stage, spare, sampling, reason
):
    c = coordinator()
    c.add_node("w0", W0, misbehave=cheat if stage == 0 else None)
    c.add_node("w1", W1, misbehave=cheat if stage == 1 else None)
    # the spare audits stage 1 (the coordinator confirms its mismatch), then replaces w1
    auditor = c.add_node("spare", W1) if spare else None
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, sampling, **EVERY_UNIT)
    assert r.tokens == _baseline(tiny_gguf, sampling)  # the cheat's work was withdrawn and redone
    cheater, new_node = f"w{stage}", "spare" if spare else "coordinator"
    assert [(b.stage, b.node, b.new_node) for b in r.rollbacks] == [(stage, cheater, new_node)]
    b = r.rollbacks[0]
    assert b.reason.startswith(reason) and b.kept_tokens == max(0, b.position + 1 - len(r.session.prompt_ids))
    assert "rollback" in r.kinds and list(r.summary.banned_nodes) == [cheater]
    assert [RollbackRecord.from_dict(e) for e in c.ledger.events(r.session.session_id, "rollback")] == [b]
    assert c.ledger.banned_nodes() == [cheater]
    # a set: another audit may find the same fraud again before the loop rolls it back
    assert {e["kind"] for e in c.ledger.evidence(cheater)} == {reason}
    assert r.session.stages[stage].node_id == new_node and r.failovers == []
    _settled(r)
    if auditor is not None:
        assert auditor.audit_calls > 0 and c.ledger.evidence("spare") == []


def test_a_lying_auditor_is_banned_and_the_honest_node_is_not(coordinator, tiny_gguf):
    """The spare audits stage 1 with noisy results: it reports a mismatch on honest work, the
    coordinator recomputes, finds it honest, bans the auditor and audits the stage itself."""
    c = coordinator()
    c.add_node("w0", W0)
    c.add_node("w1", W1)
    liar = c.add_node("liar", W1, misbehave="noise=0.05")
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, **EVERY_UNIT)
    assert r.tokens == _baseline(tiny_gguf, GREEDY)
    assert liar.audit_calls > 0 and r.rollbacks == [] and list(r.summary.banned_nodes) == []
    assert c.ledger.banned_nodes() == ["liar"] and not c.ledger.is_banned("w1")
    evidence = c.ledger.evidence("liar")
    assert [e["kind"] for e in evidence] == ["false audit"] and evidence[0]["detail"]["stage"] == 1
    assert c.ledger.evidence("w1") == []
    assert _auditors(c, r, 1) == {"coordinator"}  # the coordinator's verdict is the one recorded
    rechecks = c.ledger.events(r.session.session_id, "recheck")  # what /metrics counts
    assert [(e["auditor"], e["remote_passed"], e["agreed"]) for e in rechecks] == [("liar", False, False)]
    assert r.session.audits.counts().failed == 0
    _settled(r)


def test_an_auditor_colluding_with_a_cheat_is_caught_by_the_recheck(coordinator, tiny_gguf):
    """w1 and its auditor run the same wrong weights, so the auditor passes the cheat; the
    coordinator re-checks every remote pass (recheck 1.0), bans both and rolls back."""
    c = coordinator(audit_recheck_probability=1.0)
    c.add_node("w0", W0)
    c.add_node("w1", W1, misbehave="wrong-weights")
    c.add_node("colluder", W1, misbehave="wrong-weights")
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, **EVERY_UNIT)
    assert r.tokens == _baseline(tiny_gguf, GREEDY)
    assert [(b.stage, b.node, b.new_node) for b in r.rollbacks] == [(1, "w1", "coordinator")]
    assert c.ledger.banned_nodes() == ["colluder", "w1"] and list(r.summary.banned_nodes) == ["w1"]
    assert [e["kind"] for e in c.ledger.evidence("colluder")] == ["false audit"]
    assert [(e["auditor"], e["agreed"]) for e in c.ledger.events(r.session.session_id, "recheck")][:1] == [
        ("colluder", False)
    ]
    assert {e["kind"] for e in c.ledger.evidence("w1")} == {"failed audit"}
    _settled(r)


def _after_tokens(n: int, then: Callable[[], object]) -> Callable[[pb.GenerateEvent], None]:
    """An on_event callback: `then()` once `n` tokens have streamed (the token loop waits for it)."""
    count = 0

    def on_event(ev) -> None:
        nonlocal count
        count += ev.HasField("token")
        if count == n and ev.HasField("token"):
            then()

    return on_event


def _release_when_waiting(node, gate: threading.Event):
    def release() -> None:
        assert node.audit_waiting.wait(WAIT_S), "the auditor's first audit call never came"
        gate.set()

    return release


def test_an_auditor_lost_mid_audit_moves_the_audit_and_nobody_is_called_a_cheat(coordinator, tiny_gguf):
    """The spare audits stage 1 and dies on its second audit call: an `auditor_lost` event, the
    audit goes on on the coordinator, no false fraud. Its first call is held until 10 tokens
    have streamed, so that a second call (the units after them) is sure to come."""
    c = coordinator()
    c.add_node("w0", W0)
    c.add_node("w1", W1)
    gate = threading.Event()
    auditor = c.add_node("auditor", W1, die_on_audit_call=2, audit_gate=gate)
    on_event = _after_tokens(10, _release_when_waiting(auditor, gate))
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, SEEDED, on_event=on_event, **EVERY_UNIT)
    assert r.tokens == _baseline(tiny_gguf, SEEDED)
    assert auditor.audit_calls == 2 and auditor.failed is not None
    lost = c.ledger.events(r.session.session_id, "auditor_lost")
    assert [(e["stage"], e["node"]) for e in lost] == [(1, "auditor")] and "auditor" in c.cluster.dead
    assert _auditors(c, r, 1) == {"auditor", "coordinator"} and _auditors(c, r, 0) == {"coordinator"}
    assert r.session.audits.counts().failed == 0 and r.rollbacks == []
    assert c.ledger.banned_nodes() == [] and c.ledger.evidence() == []
    _settled(r)


def test_audits_are_serial_within_a_session_and_sessions_do_not_wait_for_each_other(coordinator, tiny_gguf):
    """Session A's stage-1 auditor blocks: A's later audits wait behind it (serial: its auditors
    extend their KV caches in order), while session B, on the same pool, is audited to the end."""
    c = coordinator(audit_wait_timeout_s=WAIT_S)
    c.add_node("w0", W0)
    c.add_node("w1", W1)
    gate = threading.Event()
    slow = c.add_node("slow", W1, audit_gate=gate)
    # A: w0, w1, the coordinator; "slow" audits stage 1 and blocks. The loop goes on once it
    # does, so A's later stage-0 units are sure to queue behind the blocked audit.
    hold = _after_tokens(1, lambda: slow.audit_waiting.wait(WAIT_S))
    a = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, on_event=hold, wait_audits=False, **EVERY_UNIT)
    assert a.tokens == _baseline(tiny_gguf, GREEDY) and slow.audit_waiting.is_set()
    a_audits = a.session.audits
    recorded = len(c.ledger.audits(a.session.session_id))
    # B: "slow" serves stage 1, w1 audits it; B's result waits for its audits
    b = c.generate(["w0", "slow"], PROMPT, TOKENS, SEEDED, **EVERY_UNIT)
    assert b.tokens == _baseline(tiny_gguf, SEEDED)
    _settled(b)
    assert _auditors(c, b, 1) == {"w1"} and b.summary.audits.pending == 0
    # meanwhile nothing of A was audited: its stage-0 units wait behind the blocked audit
    assert len(c.ledger.audits(a.session.session_id)) == recorded and not gate.is_set()
    with a_audits.lock:
        assert a_audits.requested.get(0) and a_audits.requested.get(1)
    gate.set()
    assert c.verifier.wait(a_audits, WAIT_S)
    assert a_audits.counts().failed == 0 and a_audits.counts().pending == 0
    assert _auditors(c, a, 1) == {"slow"} and c.ledger.banned_nodes() == []
