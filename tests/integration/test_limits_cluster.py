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
    with pytest.raises(ConsortiumError, match=r"unknown audit coverage 'most'.*INVALID_ARGUMENT"):
        client.run(SessionRequest("hi", max_tokens=2, audit_coverage="most"))
    assert time.monotonic() - t0 < 10
    status = client.cluster_status()
    assert all(n["alive"] for n in status["nodes"]) and status["route"]
    r = client.run(SessionRequest("a short prompt", max_tokens=4, chat=False))
    assert r.stop_reason in ("eos", "max_tokens") and r.prompt_tokens > 0


def test_a_strangers_overlapping_range_blocks_no_session(tiny_cluster, client_for, tiny_gguf):
    """The 'blocking every session' attack: a properly registered stranger holding an overlapping
    range (1-3 across workers 0-1, 1-2 and the coordinator's 2-4) used to make every session fail
    "layer ranges do not tile". Placement now picks the tiling and the stranger is a spare."""
    import grpc
    from helpers.cluster import coordinator_link, signed_register
    from helpers.inprocess import single_node_tokens

    from consortium.identity import NodeIdentity
    from consortium.model.sampling import SamplingParams
    from consortium.transport.proto import consortium_pb2 as pb

    client = client_for(tiny_cluster)
    digest = client.cluster_status()["model_digest"]
    link, identity = coordinator_link(tiny_cluster), NodeIdentity.generate()
    try:
        req = signed_register(
            link,
            identity,
            node_id="stranger",
            address="127.0.0.1:9",
            dtype="fp32",
            model_digest=digest,
            layers=pb.LayerRange(start=1, end=3),
            public_key=identity.public_key,
        )
        link.stub.Register(req, timeout=30)
    except grpc.RpcError as e:
        pytest.fail(f"a properly signed registration was refused: {e.details()}")
    finally:
        link.channel.close()
    roles = {n["node_id"]: n["role"] for n in client.cluster_status()["nodes"]}
    assert roles["stranger"] == "spare" and roles["worker-1"] == "serving"
    greedy = SamplingParams()
    r = client.run(SessionRequest("still serving", 6, greedy, audit_probability=0.0))
    assert "stranger" not in {s.node_id for s in r.stages}
    assert r.tokens == single_node_tokens(tiny_gguf, "still serving", 6, greedy)


def test_a_session_whose_logits_the_disk_budget_cannot_hold_is_refused_and_others_run(
    request, tiny_gguf, tmp_path, client_for
):
    """A remote last stage's logits go to the coordinator's disk (core/spill.py) for the session's
    life. Each session reserves its worst case (a row a token) when it starts: one that does not
    fit is refused with RESOURCE_EXHAUSTED and holds nothing, and what a finished session did not
    write goes back."""
    from helpers.cluster import start_cluster

    from consortium.core.config import LayerRange
    from consortium.model.gguf_file import GGUFModel
    from consortium.model.sampling import SamplingParams

    row = GGUFModel(tiny_gguf).args.vocab_size * 4
    cluster = start_cluster(
        request,
        tiny_gguf,
        tmp_path / "logs",
        None,  # the coordinator holds no layers: the last stage is a worker's
        [LayerRange(0, 2), LayerRange(2, 4)],
        coordinator_args=["--spill-gb", f"{12 * row / 2**30:.12f}"],
    )
    client = client_for(cluster)
    greedy = SamplingParams()
    with pytest.raises(ConsortiumError, match=r"disk budget for committed logits.*RESOURCE_EXHAUSTED"):
        client.run(SessionRequest("too long", 13, greedy, chat=False))
    first = client.run(SessionRequest("the cat", 8, greedy, chat=False, audit_probability=1.0))
    assert first.audits.failed == 0 and first.audits.passed > 0  # audits read the spilled rows back
    # it wrote a row a step (<= 8): what it did not use is back, so 12 - 8 rows fit at least
    second = client.run(SessionRequest("the dog", 4, greedy, chat=False))
    assert second.tokens
    with pytest.raises(ConsortiumError, match="RESOURCE_EXHAUSTED"):
        client.run(SessionRequest("the cat", 12, greedy, chat=False))  # the first two still hold rows
    st = client.cluster_status()  # what the two finished sessions wrote, a whole row a step
    assert st["route"] and abs(st["spill_limit_bytes"] - 12 * row) <= 1
    assert 2 * row <= st["spill_held_bytes"] <= 12 * row and st["spill_held_bytes"] % row == 0
