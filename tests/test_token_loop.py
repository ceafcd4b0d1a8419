"""The token loop in one process (tests/helpers/inprocess.py): a pipeline of in-process
workers (signing, as over gRPC) and the coordinator's own stage yields exactly the
single-node tokens, with every receipt checked and stored; a worker that dies or hangs at
step N fails over at token N exactly, to a spare or the coordinator, or fails the session
when no backup may take its layers."""

from __future__ import annotations

import grpc
import pytest
from helpers.inprocess import coordinators, single_node_tokens

from consortium.coordinator.cluster import NoBackupError
from consortium.core.config import LayerRange
from consortium.core.records import FailoverRecord
from consortium.core.session import FAILED
from consortium.core.spill import SpilledTensor
from consortium.model.sampling import SamplingParams
from consortium.transport.tensors import WireTensor

NoneType = type(None)
PROMPT = "the cat sat on the"
TOKENS = 24
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, top_k=50, seed=11)
SAMPLINGS = pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
W0, W1 = LayerRange(0, 1), LayerRange(1, 2)
FAIL_AT = 7  # die-at / hang-at step: the failover reports this token index


@pytest.fixture
def coordinator(tiny_gguf, tmp_path):
    yield from coordinators(tiny_gguf, tmp_path)


def _baseline(tiny_gguf, sampling: SamplingParams) -> list[int]:
    return single_node_tokens(tiny_gguf, PROMPT, TOKENS, sampling)


# (worker ranges, the coordinator's own range or None)
TOPOLOGIES = {
    "remote-remote-local": ([W0, W1], LayerRange(2, 4)),
    "remote-local": ([LayerRange(0, 2)], LayerRange(2, 4)),
    "remote-remote-remote": ([W0, LayerRange(1, 3), LayerRange(3, 4)], None),
}


@SAMPLINGS
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_an_honest_pipeline_equals_one_node_and_its_receipts_verify(
    coordinator, tiny_gguf, topology, sampling
):
    ranges, own = TOPOLOGIES[topology]
    c = coordinator(layers=own)
    names = [c.add_node(f"w{i}", r).node_id for i, r in enumerate(ranges)]
    r = c.generate(names, PROMPT, TOKENS, sampling, audit_probability=1.0, audit_seed=1)
    assert r.tokens == _baseline(tiny_gguf, sampling)
    assert r.kinds == ["started", *["token"] * len(r.tokens), "done"]
    done = r.summary
    assert list(done.tokens) == r.tokens and done.text == c.tokenizer.decode(r.tokens)
    assert [s.stage.node_id for s in done.stages] == names + (["coordinator"] if own else [])
    # every remote unit audited (on the coordinator: no other node holds the layers) and passed
    counts = r.session.audits.counts()
    assert counts.failed == 0 and counts.pending == 0 and counts.passed > 0
    audited = {(a["stage"], a["node"], a["auditor"]) for a in c.ledger.audits(r.session.session_id)}
    assert audited == {(i, n, "coordinator") for i, n in enumerate(names)}
    summary = c.ledger.verify_session(r.session.session_id)  # every receipt stored chains up
    assert summary.nodes == sorted(names) and summary.tokens == len(r.tokens)
    assert summary.receipts == len(names) * summary.steps
    assert c.ledger.tokens(r.session.session_id) == r.tokens
    assert r.failovers == [] and r.rollbacks == [] and c.ledger.banned_nodes() == []
    # what stays: every stage's inputs and the workers' outputs (for audits and replays); a
    # remote last stage's logits on disk (the audits above read them back), the coordinator's
    # own not at all
    vocab = c.gguf.args.vocab_size
    for i, h in enumerate(r.session.history):
        last = i == len(r.session.history) - 1
        want = (NoneType if own else SpilledTensor) if last else WireTensor
        assert {type(s.output) for s in h.steps} == {want}, (i, topology)
    if own is None:
        assert all(s.committed().nbytes == 4 * vocab for s in r.session.history[-1].steps)
        assert not [p for p in c.ledger.path.parent.iterdir() if "spill" in p.name]  # unlinked


def _failovers(r) -> list[tuple]:
    return [(f.stage, f.token_index, f.failed_node, f.backup_node) for f in r.failovers]


@SAMPLINGS
@pytest.mark.parametrize(
    ("fault", "code"),
    [("die-at", grpc.StatusCode.UNAVAILABLE), ("hang-at", grpc.StatusCode.DEADLINE_EXCEEDED)],
)
@pytest.mark.parametrize("stage", [0, 1])
def test_a_worker_failing_at_step_n_fails_over_to_the_coordinator_at_token_n(
    coordinator, tiny_gguf, stage, fault, code, sampling
):
    c = coordinator()
    faults = [f"{fault}={FAIL_AT}" if i == stage else None for i in range(2)]
    nodes = [
        c.add_node(f"w{i}", r, misbehave=m) for i, (r, m) in enumerate(zip([W0, W1], faults, strict=True))
    ]
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, sampling)
    assert r.tokens == _baseline(tiny_gguf, sampling)
    assert nodes[stage].failed == code
    assert _failovers(r) == [(stage, FAIL_AT, f"w{stage}", "coordinator")]
    # streamed right after token FAIL_AT - 1, before token FAIL_AT
    assert r.kinds == ["started", *["token"] * FAIL_AT, "failover", *["token"] * (TOKENS - FAIL_AT), "done"]
    f = r.failovers[0]
    n_prompt = len(r.session.prompt_ids)
    assert f.position == f.replayed_positions == n_prompt + FAIL_AT - 1  # everything committed before
    assert f.replay_check is not None and f.replay_check.passed  # the replay matched (a free audit)
    assert f.latency_ms > 0 and f"w{stage}" in f.error
    expected_stages = ["w0", "w1", "coordinator"]
    expected_stages[stage] = "coordinator"
    assert [s.node_id for s in r.session.stages] == expected_stages
    events = c.ledger.events(r.session.session_id, "failover")
    assert [FailoverRecord.from_dict(e) for e in events] == [f]
    assert r.summary.failovers[0].token_index == FAIL_AT and r.rollbacks == []
    assert c.ledger.tokens(r.session.session_id) == r.tokens and c.ledger.banned_nodes() == []


def test_two_workers_failing_at_the_same_step_both_fail_over_in_stage_order(coordinator, tiny_gguf):
    c = coordinator()
    c.add_node("w0", W0, misbehave=f"die-at={FAIL_AT}")
    c.add_node("w1", W1, misbehave=f"hang-at={FAIL_AT}")
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, SEEDED)
    assert r.tokens == _baseline(tiny_gguf, SEEDED)
    assert _failovers(r) == [(0, FAIL_AT, "w0", "coordinator"), (1, FAIL_AT, "w1", "coordinator")]
    assert [s.node_id for s in r.session.stages] == ["coordinator"] * 3


@SAMPLINGS
def test_a_spare_holding_the_layers_takes_over_before_the_coordinator(coordinator, tiny_gguf, sampling):
    c = coordinator()
    c.add_node("w0", W0)
    c.add_node("w1", W1, misbehave=f"die-at={FAIL_AT}")
    spare = c.add_node("spare", W1)
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, sampling)
    assert r.tokens == _baseline(tiny_gguf, sampling)
    assert _failovers(r) == [(1, FAIL_AT, "w1", "spare")]
    assert r.failovers[0].replay_check.passed
    assert [s.node_id for s in r.session.stages] == ["w0", "spare", "coordinator"]
    # the spare signed the steps after the failover, and the receipts still chain up
    steps = {rc.step for rc, _ in c.ledger.receipts(r.session.session_id) if rc.node_id == "spare"}
    assert min(steps) == FAIL_AT and spare.failed is None
    assert c.ledger.verify_session(r.session.session_id).nodes == ["spare", "w0", "w1"]


def test_without_a_backup_the_session_fails_and_keeps_its_tokens(coordinator, tiny_gguf):
    c = coordinator(backup=False)
    c.add_node("w0", W0)
    c.add_node("w1", W1, misbehave=f"die-at={FAIL_AT}")
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, raises=NoBackupError)
    assert isinstance(r.error, NoBackupError) and "no backup is available" in str(r.error)
    assert r.kinds == ["started", *["token"] * FAIL_AT]
    assert r.session.state == FAILED and "no backup" in r.session.error
    assert r.tokens == _baseline(tiny_gguf, GREEDY)[:FAIL_AT]
    sid = r.session.session_id
    assert c.ledger.tokens(sid) == r.tokens and c.ledger.session(sid)["status"] == FAILED


@pytest.mark.parametrize("stage", [0, 1])
def test_a_badly_signed_result_is_no_evidence_the_stage_fails_over(coordinator, tiny_gguf, stage):
    """Nothing binds a result with a bad signature to its node: no ban, no rollback; the stage
    fails over at the step whose result it was (the prefill) and the backup redoes it."""
    c = coordinator()
    for i, r in enumerate([W0, W1]):
        c.add_node(f"w{i}", r, misbehave="bad-signature" if i == stage else None)
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, SEEDED, audit_probability=1.0, audit_seed=1)
    assert r.tokens == _baseline(tiny_gguf, SEEDED)
    assert _failovers(r) == [(stage, 0, f"w{stage}", "coordinator")]
    assert "bad signature" in r.failovers[0].error and r.failovers[0].replayed_positions == 0
    assert r.rollbacks == [] and c.ledger.banned_nodes() == [] and c.ledger.evidence() == []
    assert r.session.audits.counts().failed == 0


@pytest.mark.parametrize(
    ("ranges", "own", "failing"),
    [([W0, W1], LayerRange(2, 4), 0), ([W0, LayerRange(1, 3), LayerRange(3, 4)], None, 1)],
    ids=["first-stage", "middle-stage"],
)
def test_receipts_verify_after_a_stage_failed_over_to_the_coordinator(coordinator, ranges, own, failing):
    c = coordinator(layers=own)
    for i, r in enumerate(ranges):
        c.add_node(f"w{i}", r, misbehave=f"die-at={FAIL_AT}" if i == failing else None)
    r = c.generate([f"w{i}" for i in range(len(ranges))], PROMPT, TOKENS, GREEDY)
    assert _failovers(r) == [(failing, FAIL_AT, f"w{failing}", "coordinator")]
    assert c.ledger.verify_session(r.session.session_id).tokens == TOKENS


def _ban_after(c, node_id: str, tokens: int):
    """An on_event callback: bans node_id (as if caught in another session) after `tokens` tokens."""
    seen = 0

    def on_event(ev) -> None:
        nonlocal seen
        if ev.WhichOneof("event") == "token":
            seen += 1
            if seen == tokens:
                c.cluster.ban(node_id, "caught in another session")

    return on_event


@SAMPLINGS
def test_a_node_banned_in_another_session_is_left_at_once_and_its_work_rechecked(
    coordinator, tiny_gguf, sampling
):
    """Honest here: the move's replay matches what it committed, nothing is rolled back."""
    c = coordinator()
    c.add_node("w0", W0)
    c.add_node("w1", W1)
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, sampling, on_event=_ban_after(c, "w1", 5))
    assert r.tokens == _baseline(tiny_gguf, sampling)
    # left before its next step: steps already under way may still finish on it
    [(stage, at, failed, backup)] = _failovers(r)
    assert (stage, failed, backup) == (1, "w1", "coordinator") and 5 <= at < TOKENS
    assert r.failovers[0].replay_check.passed and "banned" in r.failovers[0].error
    assert r.rollbacks == [] and [s.node_id for s in r.session.stages] == ["w0", "coordinator", "coordinator"]


def test_a_cheat_banned_elsewhere_is_rolled_back_here_by_the_replay(coordinator, tiny_gguf):
    """Unaudited here, w1 steered every row; banned in another session, its stage moves to the
    coordinator, whose replay differs from what w1 committed: evidence, and a rollback to the
    first bad position, after which the tokens are the honest ones."""
    c = coordinator()
    c.add_node("w0", W0)
    c.add_node("w1", W1, misbehave="steer=0.5")
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, on_event=_ban_after(c, "w1", 5))
    assert r.tokens == _baseline(tiny_gguf, GREEDY)
    f = r.failovers[0]
    assert (f.stage, f.failed_node, f.backup_node) == (1, "w1", "coordinator") and not f.replay_check.passed
    assert [(b.stage, b.node, b.position) for b in r.rollbacks] == [
        (1, "w1", f.replay_check.first_bad_position)
    ]
    assert c.ledger.evidence("w1")  # the coordinator's own replay is evidence
