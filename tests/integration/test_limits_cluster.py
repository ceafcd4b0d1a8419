"""Limits that fail fast against a real coordinator (issue 10): a stranger's huge or
overlong prompts are refused before any heavy work, and the coordinator keeps answering."""

from __future__ import annotations

import time

import pytest

from consortium.core.config import SessionRequest
from consortium.errors import ConsortiumError


def test_huge_and_overlong_prompts_are_refused_fast_and_the_coordinator_keeps_serving(
    tiny_cluster, client_for
):
    client = client_for(tiny_cluster)
    t0 = time.monotonic()
    with pytest.raises(ConsortiumError, match="RESOURCE_EXHAUSTED|larger than max"):
        client.run(SessionRequest("x" * (5 * 2**20), max_tokens=2))  # over the 4 MiB request limit
    with pytest.raises(
        ConsortiumError, match=r"cannot fit the model's context of 128 tokens.*INVALID_ARGUMENT"
    ):
        client.run(
            SessionRequest("word " * 20_000, max_tokens=2)
        )  # 100 kB: far more bytes than 128 tokens hold
    assert time.monotonic() - t0 < 10
    status = client.cluster_status()
    assert all(n["alive"] for n in status["nodes"]) and status["route"]
    r = client.run(SessionRequest("a short prompt", max_tokens=4, chat=False))
    assert r.stop_reason in ("eos", "max_tokens") and r.prompt_tokens > 0
