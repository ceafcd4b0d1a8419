"""Failover with real processes: a worker killed (-9) at any point of a session, including
its prefill, is replaced by the coordinator and the session ends with exactly the tokens of
an uninterrupted single-node run.

- SmolLM2 (the demo's topology: workers 0-10 and 10-20, the coordinator 20-30 with the
  head): the worker of layers 10-20 dying at token 20 of 64 exactly (greedy; `--misbehave
  die-at=20`: it SIGKILLs itself on the decode order of step 20), and a worker killed from
  outside when the session starts, while a long prompt's prefill runs;
- the tiny model (workers 0-1 and 1-2, the coordinator 2-4), seeded sampling: kills at
  seeded-random token indices of either worker.

Every kill gets a fresh cluster (a killed worker is not restarted); each baseline is
computed once per module.
"""

from __future__ import annotations

import random
import signal
import time
from functools import cache

import pytest
from helpers.cluster import SMOLLM_SPLIT, ledger_cluster, start_cluster

from consortium.core.config import LayerRange, SessionRequest
from consortium.model.generate import generate, load_single_node
from consortium.model.sampling import SamplingParams
from consortium.verification.ledger import Ledger
from consortium.verification.misbehave import ENABLE_ENV

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, top_k=50, seed=11)

SMOLLM_PROMPT = "Explain in one paragraph why the sky appears blue."
SMOLLM_TOKENS = 64
SMOLLM_DIE_AT = 20  # worker-1 SIGKILLs itself on the decode order of step 20: the failover is at token 20
# (c): a no-chat prompt of several hundred tokens, so that the first stage's prefill takes a
# while (hundreds of ms on one CPU thread)
PARAGRAPH = (
    "A river begins as rain on the hills, gathers in small streams between the stones, and "
    "grows as it runs down through the valley, past the mill, the orchards and the old bridge, "
    "until it reaches the sea and the tide carries it away."
)
LONG_PROMPT = " ".join([PARAGRAPH] * 9)
LONG_TOKENS = 12

TINY_PROMPT = "the cat sat on the"
TINY_TOKENS = 24
DRAW_SEED = 20240611


def _draw_kills(n: int = 5) -> list[tuple[str, int]]:
    """n (worker, token index) pairs: kill that worker after that many streamed tokens."""
    rng = random.Random(DRAW_SEED)
    return [(rng.choice(["worker-0", "worker-1"]), rng.randint(1, TINY_TOKENS - 1)) for _ in range(n)]


KILLS = _draw_kills()


def _proc(cluster, name: str):
    return next(p for p in cluster.processes if p.name == name)


def _kill_after(cluster, name: str, after: int) -> tuple:
    """An on_text callback that kills `name` (SIGKILL to its group) once `after` tokens have
    streamed, and the list of the kill's perf_counter() time."""
    count, killed = 0, []

    def on_text(_text: str) -> None:
        nonlocal count
        count += 1
        if count == after:
            _proc(cluster, name).signal_group(signal.SIGKILL)
            killed.append(time.perf_counter())

    return on_text, killed


def _ledger_failovers(path, session_id: str) -> list[dict]:
    led = Ledger(path, create=False, readonly=True)
    try:
        return led.events(session_id, "failover")
    finally:
        led.close()


@pytest.fixture(scope="module")
def smollm_single(smollm_path):
    """Single-node SmolLM2 generation, each (prompt, chat, tokens, sampling) computed once."""
    _, stage, tok = load_single_node(str(smollm_path))

    @cache
    def run(prompt: str, chat: bool, max_tokens: int, sampling: SamplingParams) -> tuple[int, ...]:
        ids = tok.encode_prompt(prompt, chat=chat)
        return tuple(generate(stage, tok, ids, max_tokens, sampling).tokens)

    return run


@pytest.fixture(scope="module")
def tiny_seeded(tiny_gguf) -> list[int]:
    """The tiny model's single-node tokens (seeded sampling), the baseline of every kill."""
    _, stage, tok = load_single_node(str(tiny_gguf))
    return generate(stage, tok, tok.encode_prompt(TINY_PROMPT, chat=True), TINY_TOKENS, SEEDED).tokens


def _smollm_cluster(request, smollm_path, tmp_path, worker_args=()):
    return ledger_cluster(request, smollm_path, tmp_path, SMOLLM_SPLIT, worker_args=worker_args)


@pytest.mark.model
def test_smollm_worker_killed_at_token_20(
    request, smollm_path, tmp_path, client_for, smollm_single, monkeypatch
):
    monkeypatch.setenv(ENABLE_ENV, "1")
    die = [[], ["--misbehave", f"die-at={SMOLLM_DIE_AT}"]]
    cluster, ledger = _smollm_cluster(request, smollm_path, tmp_path, die)
    req = SessionRequest(SMOLLM_PROMPT, SMOLLM_TOKENS, GREEDY, audit_probability=0.0)
    r = client_for(cluster).run(req)
    assert _proc(cluster, "worker-1").proc.wait(10) == -signal.SIGKILL
    assert len(r.tokens) == SMOLLM_TOKENS and r.stop_reason == "max_tokens"
    assert r.tokens == list(smollm_single(SMOLLM_PROMPT, True, SMOLLM_TOKENS, GREEDY))
    assert [(f.stage, f.failed_node, f.backup_node) for f in r.failovers] == [(1, "worker-1", "coordinator")]
    f = r.failovers[0]
    assert f.token_index == SMOLLM_DIE_AT
    # the replay rebuilt every position the stage had committed before the failed step
    assert f.replayed_positions == r.prompt_tokens + f.token_index - 1
    assert [s.node_id for s in r.stages] == ["worker-0", "coordinator", "coordinator"]
    events = _ledger_failovers(ledger, r.session_id)
    assert [(e["stage"], e["failed_node"], e["backup_node"], e["token_index"]) for e in events] == [
        (1, "worker-1", "coordinator", f.token_index)
    ]


@pytest.mark.parametrize(("worker", "after"), KILLS, ids=[f"{w}-after-token-{k}" for w, k in KILLS])
def test_tiny_kill_at_a_random_token(request, tiny_gguf, tmp_path, client_for, tiny_seeded, worker, after):
    cluster = start_cluster(
        request, tiny_gguf, tmp_path / "logs", LayerRange(2, 4), [LayerRange(0, 1), LayerRange(1, 2)]
    )
    on_text, killed = _kill_after(cluster, worker, after)
    req = SessionRequest(TINY_PROMPT, TINY_TOKENS, SEEDED, audit_probability=0.0)
    r = client_for(cluster).run(req, on_text=on_text)
    assert killed and _proc(cluster, worker).proc.wait(10) == -signal.SIGKILL
    assert r.tokens == tiny_seeded
    # The kill lands while the worker computes the step after token `after` (or just before
    # it); a kill after one of the last tokens may land after the last step: no failover then.
    expected = [(int(worker.removeprefix("worker-")), worker, "coordinator")]
    got = [(f.stage, f.failed_node, f.backup_node) for f in r.failovers]
    assert got == expected or (got == [] and after >= TINY_TOKENS - 2), r.failovers
    for f in r.failovers:
        assert after <= f.token_index < TINY_TOKENS
        assert f.replayed_positions == r.prompt_tokens + f.token_index - 1


@pytest.mark.model
@pytest.mark.parametrize("worker", ["worker-0", "worker-1"])
def test_smollm_worker_killed_during_the_prefill(
    request, smollm_path, tmp_path, client_for, smollm_single, worker
):
    """Killed when the session starts (SessionStarted comes before the prefill): worker-0
    before its prefill call arrives or while it computes it, worker-1 before worker-0's
    prefill is done. Either way the failed step is the prefill: token index 0, and nothing
    committed to replay."""
    cluster, ledger = _smollm_cluster(request, smollm_path, tmp_path)
    victim = _proc(cluster, worker)
    dead_at = []

    def on_start(_started) -> None:
        victim.signal_group(signal.SIGKILL)
        victim.proc.wait(10)
        dead_at.append(time.perf_counter())

    first_token_at = []

    def on_text(_text: str) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())

    req = SessionRequest(LONG_PROMPT, LONG_TOKENS, GREEDY, chat=False, audit_probability=0.0)
    r = client_for(cluster).run(req, on_start=on_start, on_text=on_text)
    assert victim.exited() == -signal.SIGKILL and dead_at[0] < first_token_at[0]
    assert r.prompt_tokens > 300
    assert r.tokens == list(smollm_single(LONG_PROMPT, False, LONG_TOKENS, GREEDY))
    stage = int(worker.removeprefix("worker-"))
    assert [(f.stage, f.token_index, f.failed_node, f.backup_node) for f in r.failovers] == [
        (stage, 0, worker, "coordinator")
    ]
    assert r.failovers[0].replayed_positions == 0
    assert [s.node_id for s in r.stages][stage] == "coordinator"
    assert len(_ledger_failovers(ledger, r.session_id)) == 1
