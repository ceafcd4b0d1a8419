"""The real model through 3 processes (workers 0-10 and 10-20, the coordinator 20-30 with
the head): `session run` gives exactly the tokens of `consortium generate`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.cli import consortium
from helpers.cluster import start_cluster

from consortium.coordinator.client import Client
from consortium.core.config import ClientConfig, LayerRange, SessionRequest
from consortium.model.sampling import SamplingParams

pytestmark = pytest.mark.model
PROMPT = "Explain in one paragraph why the sky appears blue."


@pytest.fixture(scope="module")
def smollm_cluster(request, smollm_path, tmp_path_factory):
    return start_cluster(
        request,
        smollm_path,
        tmp_path_factory.mktemp("smollm-cluster"),
        LayerRange(20, 30),
        [LayerRange(0, 10), LayerRange(10, 20)],
    )


@pytest.mark.parametrize(
    "sampling",
    [[], ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--seed", "1234"]],
    ids=["greedy", "seeded-sampling"],
)
def test_session_run_equals_generate(smollm_cluster, smollm_path, sampling):
    common = ["--prompt", PROMPT, "--max-tokens", "64", "--json", *sampling]
    ran = consortium("session", "run", "--coordinator", smollm_cluster.address, *common)
    assert ran.returncode == 0, ran.stderr
    single = consortium("generate", "--model", str(smollm_path), *common)
    assert single.returncode == 0, single.stderr
    dist, base = json.loads(ran.stdout), json.loads(single.stdout)
    assert len(dist["tokens"]) == 64
    assert dist["tokens"] == base["tokens"] and dist["text"] == base["text"]
    assert dist["prompt_tokens"] == base["prompt_tokens"]
    assert [(s["node_id"], s["layers"]) for s in dist["stages"]] == [
        ("worker-0", [0, 10]),
        ("worker-1", [10, 20]),
        ("coordinator", [20, 30]),
    ]


def test_four_concurrent_sessions_equal_alone(smollm_cluster):
    reqs = [
        SessionRequest("Name three colors.", 16),
        SessionRequest("What is 2+2?", 16, SamplingParams(temperature=0.9, seed=5)),
        SessionRequest("Write a haiku about rain.", 16, SamplingParams(temperature=0.7, top_p=0.9, seed=6)),
        SessionRequest("Say hello in French.", 16, SamplingParams(temperature=1.0, top_k=20, seed=7)),
    ]
    with Client(ClientConfig(smollm_cluster.address)) as c:
        alone = [c.run(r).tokens for r in reqs]

    def run(r: SessionRequest) -> list[int]:
        with Client(ClientConfig(smollm_cluster.address)) as c:
            return c.run(r).tokens

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, reqs)) == alone
