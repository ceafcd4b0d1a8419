"""Continuous batching through the verified pipeline, with real processes on SmolLM2 (fp16,
whose kernels are batch-invariant): concurrent sessions share each stage's forwards, and
every session still gets exactly its single-node tokens, through a cheat on one of them
and through a worker dying in the middle of a batch."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.cluster import SMOLLM_SPLIT, ledger_cluster

from consortium.core.config import EngineConfig, SessionRequest
from consortium.core.records import SessionReport
from consortium.model.generate import generate, load_single_node
from consortium.model.sampling import SamplingParams
from consortium.verification.misbehave import ENABLE_ENV

ENGINE = EngineConfig(dtype="fp16")
TOKENS = 8
PROMPTS = [
    "the cat sat on the",
    "Name three colours.",
    "What is 2+2?",
    "Write a haiku about rain.",
    "Say hello in French.",
    "List two planets.",
    "Why is the sea salty?",
    "Count to five.",
]


def _requests(n: int, audit: float) -> list[SessionRequest]:
    """n sessions: different prompts, greedy and seeded alternately."""
    reqs = []
    for i in range(n):
        sampling = SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.8, top_k=40, seed=100 + i)
        reqs.append(
            SessionRequest(
                PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
                TOKENS,
                sampling,
                audit_probability=audit,
            )
        )
    return reqs


@pytest.fixture(scope="module")
def alone(smollm_path):
    """Each request's tokens on one node, alone (the same engine)."""
    _, stage, tok = load_single_node(str(smollm_path), dtype=ENGINE.dtype, progress=lambda *_: None)
    cache: dict[tuple, list[int]] = {}

    def run(req: SessionRequest) -> list[int]:
        key = (req.prompt, req.sampling)
        if key not in cache:
            ids = tok.encode_prompt(req.prompt, chat=True)
            cache[key] = generate(stage, tok, ids, req.max_tokens, req.sampling).tokens
        return cache[key]

    return run


def _together(client_for, cluster, reqs: list[SessionRequest]) -> list[SessionReport]:
    """All sessions at once, each from its own client, started together."""
    go = threading.Barrier(len(reqs))

    def one(req: SessionRequest) -> SessionReport:
        client = client_for(cluster)
        go.wait(60)
        return client.run(req)

    with ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(one, reqs))


def _cluster(request, smollm_path, tmp_path, worker_args=()):
    cluster, _ = ledger_cluster(
        request,
        smollm_path,
        tmp_path,
        SMOLLM_SPLIT,
        coordinator_args=["--max-sessions-per-client", "16", "--max-sessions", "16"],
        worker_args=worker_args,
        engine=ENGINE,
    )
    return cluster


def test_sixteen_concurrent_sessions_each_equal_their_run_alone(
    request, smollm_path, tmp_path, client_for, alone
):
    cluster = _cluster(request, smollm_path, tmp_path)
    reqs = _requests(16, audit=0.2)
    reports = _together(client_for, cluster, reqs)
    for req, r in zip(reqs, reports, strict=True):
        assert r.tokens == alone(req), req.prompt
        assert r.audits.failed == 0 and r.rollbacks == []
    batches = [s.mean_batch for r in reports for s in r.stages]
    assert max(batches) > 1.5  # the stages did compute several sessions per forward


def test_a_cheat_on_one_batched_session_rolls_back_that_session_only(
    request, smollm_path, tmp_path, client_for, alone, monkeypatch
):
    """worker-1 steers only the second session it opens; with every unit audited that session
    is caught and rolled back, and the others finish with their own tokens (those still running
    on worker-1 when it is banned move off it, the move's replay re-checking its work)."""
    monkeypatch.setenv(ENABLE_ENV, "1")
    cluster = _cluster(request, smollm_path, tmp_path, worker_args=[[], ["--misbehave", "steer=0.5@2"]])
    reqs = _requests(4, audit=1.0)
    reports = _together(client_for, cluster, reqs)
    cheated = [r for r in reports if r.rollbacks]
    assert len(cheated) == 1 and cheated[0].banned_nodes == ["worker-1"]
    for req, r in zip(reqs, reports, strict=True):
        assert r.tokens == alone(req), req.prompt
        if r is not cheated[0]:  # untouched; still running when worker-1 was banned: moved off it
            assert r.audits.failed == 0 and r.rollbacks == []
            assert all(f.failed_node == "worker-1" and f.replay_check.passed for f in r.failovers)


def test_a_worker_dying_in_the_middle_of_a_batch_fails_over_every_session_in_it(
    request, smollm_path, tmp_path, client_for, alone, monkeypatch
):
    monkeypatch.setenv(ENABLE_ENV, "1")
    cluster = _cluster(request, smollm_path, tmp_path, worker_args=[[], ["--misbehave", "die-at=4"]])
    reqs = _requests(4, audit=0.0)
    reports = _together(client_for, cluster, reqs)
    for req, r in zip(reqs, reports, strict=True):
        assert r.tokens == alone(req), req.prompt
        assert [(f.stage, f.failed_node) for f in r.failovers] == [(1, "worker-1")]
