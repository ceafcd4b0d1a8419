"""The HTTP API of a real cluster (a coordinator with --http-port 0 hosting layers 2-4, workers
0-1 and 1-2 as processes, audits on): /health before and after every layer is covered, the
official openai client against `consortium generate`, the errors, a disconnect that frees the
caches on every node, and /metrics after the sessions."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from helpers.cluster import STARTUP_S, add_worker, start_cluster, wait_for, worker_stub
from helpers.serving import Metrics, long_tiny_gguf, single_node_text

from consortium.core.config import LayerRange
from consortium.transport.proto import consortium_pb2 as pb

PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def api(request, tmp_path_factory):
    """The cluster, and /health as it answered before worker-1 (layers 1-2) joined."""
    logs = tmp_path_factory.mktemp("api-cluster")
    model = long_tiny_gguf(logs / "long.gguf")
    args = ["--http-port", "0", "--audit-probability", "0.5"]
    cluster = start_cluster(
        request, model, logs, LayerRange(2, 4), [LayerRange(0, 1)], False, coordinator_args=args
    )
    http = httpx.Client(base_url=cluster.http_url, timeout=120)
    request.addfinalizer(http.close)
    before = http.get("/health")
    add_worker(cluster, "worker-1", model, logs / "worker-1.log", "--layers", "1-2")
    wait_for(lambda: http.get("/health").status_code == 200, STARTUP_S, "/health to answer 200")
    client = openai.OpenAI(api_key="unused", base_url=cluster.http_url + "/v1", max_retries=0, timeout=120)
    return cluster, model, http, client, before


def test_health_is_503_until_every_layer_is_covered(api):
    _, _, http, _, before = api
    assert before.status_code == 503 and before.json()["error"]["code"] == "no_pipeline"
    assert "gap 1-2" in before.json()["error"]["message"]
    assert http.get("/health").json() == {"status": "ok", "stages": 3, "n_layers": 4}


def test_openai_client_gets_the_single_node_text(api):
    _, model, _, client, _ = api
    text, tokens = single_node_text(model, PROMPT, 16)
    msgs = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="long", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == text and r.usage.completion_tokens == len(tokens)
    info = r.model_extra["consortium"]
    assert (
        info["verification"] == "strict" and info["audits"]["failed"] == 0 and info["audits"]["pending"] == 0
    )
    stream = client.chat.completions.create(
        model="long", messages=msgs, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_errors_through_the_openai_client(api):
    _, _, _, client, _ = api
    msgs = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="long", messages=msgs, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llama-70b", messages=msgs)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="long", messages=[{"role": "user", "content": "word " * 3000}])
    assert e.value.body["code"] == "context_length_exceeded"


def _worker_sessions(cluster, node_id: str) -> int:
    channel, stub = worker_stub(cluster, node_id)  # signing as the coordinator
    try:
        return stub.GetStatus(pb.WorkerStatusRequest(), timeout=10).active_sessions
    finally:
        channel.close()


def test_a_client_disconnect_cancels_the_session_on_every_node(api):
    cluster, _, http, _, _ = api
    body = {
        "model": "long",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1900,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        sid = json.loads(next(lines)[6:])["id"].removeprefix("chatcmpl-")
        next(lines)
        workers = [n["node_id"] for n in http.get("/api/status").json()["nodes"] if not n["local"]]
        assert workers == ["worker-0", "worker-1"] and all(_worker_sessions(cluster, w) >= 1 for w in workers)

    def state() -> str:
        return next(s["state"] for s in http.get("/api/status").json()["sessions"] if s["session_id"] == sid)

    wait_for(lambda: state() != "running", 60, "the session to end")
    assert state() == "cancelled"
    for w in workers:
        wait_for(lambda w=w: _worker_sessions(cluster, w) == 0, 10, f"{w} to free the session's cache")


def test_metrics_after_the_sessions(api):
    _, _, http, _, _ = api
    m = Metrics(http.get("/metrics").text)
    assert m.value("consortium_requests_total", endpoint="chat", outcome="length") >= 2
    assert m.value("consortium_requests_total", endpoint="chat", outcome="cancelled") == 1
    assert m.value("consortium_requests_total", endpoint="chat", outcome="rejected") == 3
    assert m.value("consortium_generation_tokens_total") >= 32
    assert m.value("consortium_time_to_first_token_seconds_count") >= 3
    assert m.value("consortium_e2e_request_latency_seconds_count") >= 3
    assert m.value("consortium_nodes", role="serving", backend="cpu") == 3
    assert m.value("consortium_layer_min_holders") == 1
    audits = sum(
        m.value("consortium_audits_total", result="passed", auditor=a) for a in ("coordinator", "remote")
    )
    assert audits >= 4 and m.value("consortium_audits_total", result="failed", auditor="coordinator") == 0
    assert m.value("consortium_step_seconds_count", stage="0", node="worker-0", phase="prefill") >= 2
    assert m.value("consortium_step_seconds_count", stage="1", node="worker-1", phase="decode") >= 15
    assert m.value("consortium_failovers_total") == 0 and m.value("consortium_rollbacks_total") == 0
    assert m.value("consortium_bans_total") == 0 and m.value("consortium_sessions", state="cancelled") == 1
