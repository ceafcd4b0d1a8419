"""The HTTP API on a real coordinator in this process (its own stage holds every layer of a tiny
model; gRPC and uvicorn on port 0): the official openai client, plain HTTP, API keys, errors,
stop strings, a disconnect that cancels the session, /metrics. No child processes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from helpers.cluster import wait_for
from helpers.serving import Metrics, long_tiny_gguf, single_node_text

from consortium.coordinator.server import build_coordinator
from consortium.core.config import CoordinatorConfig, LayerRange
from consortium.serving.config import ServeConfig
from consortium.serving.server import Served

KEY = "test-key-0123456789abcdef"
PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def long_gguf(tmp_path_factory):
    return long_tiny_gguf(tmp_path_factory.mktemp("long") / "long.gguf")


@pytest.fixture(scope="module")
def server(long_gguf, tmp_path_factory):
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.db"
    cfg = CoordinatorConfig(long_gguf, port=0, layers=LayerRange(0, 4), ledger=ledger, max_sessions=1)
    node = Served(build_coordinator(cfg), ServeConfig(http_port=0, api_keys=frozenset({KEY})))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server.http.url + "/v1", max_retries=0)


def test_keys_guard_everything_but_health_and_the_page(server, http):
    bare = httpx.Client(base_url=server.http.url, timeout=30)
    assert bare.get("/health").json()["status"] == "ok"
    page = bare.get("/")
    assert page.status_code == 200 and "Layer coverage" in page.text and "cdn" not in page.text.lower()
    assert bare.get("/static/status.js").status_code == 200
    for path in ("/v1/models", "/metrics", "/api/status"):
        r = bare.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert (
            r.json()["error"]["type"] == "authentication_error"
            and r.json()["error"]["code"] == "invalid_api_key"
        )
    assert bare.get("/v1/models", headers={"Authorization": "Bearer " + "x" * 24}).status_code == 401
    assert http.get("/v1/models").json()["data"][0]["id"] == "long"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            api_key="wrong-key-0123456789", base_url=server.http.url + "/v1", max_retries=0
        ).models.list()


def test_chat_and_completions_equal_single_node_generation(long_gguf, client):
    text, tokens = single_node_text(long_gguf, PROMPT, 12)
    r = client.chat.completions.create(
        model="long", messages=[{"role": "user", "content": PROMPT}], max_tokens=12
    )
    assert r.choices[0].message.content == text and r.usage.completion_tokens == len(tokens)
    assert r.choices[0].finish_reason == ("length" if len(tokens) == 12 else "stop")
    info = r.model_extra["consortium"]
    assert info["session_id"] in r.id and info["verification"] == "strict" and info["release"] == "verified"
    assert info["rollbacks"] == [] and info["failovers"] == [] and info["audits"]["pending"] == 0
    chunks = list(
        client.chat.completions.create(
            model="long",
            messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    raw, _ = single_node_text(long_gguf, PROMPT, 8, chat=False)
    c = client.completions.create(model="long", prompt=PROMPT, max_tokens=8)
    assert c.choices[0].text == raw and c.usage.prompt_tokens > 3


def test_stop_strings_end_the_text(long_gguf, client):
    text, _ = single_node_text(long_gguf, PROMPT, 24)
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip())
    r = client.chat.completions.create(
        model="long", messages=[{"role": "user", "content": PROMPT}], max_tokens=24, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_errors_are_openai_errors(server, client, http):
    msgs = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="long", messages=msgs, n=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="long", prompt="word " * 5000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    big = http.post("/v1/completions", content=b"{" + b" " * (2 * 2**20) + b"}")
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = http.post("/v1/completions", content=b"{not json")
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]["message"]
    nowhere = http.get("/v1/engines")
    assert nowhere.status_code == 404 and set(nowhere.json()["error"]) == {"message", "type", "param", "code"}


def test_a_disconnect_cancels_the_session_and_frees_its_cache(server, http):
    body = {
        "model": "long",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1900,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        sid = first["id"].removeprefix("chatcmpl-")
        assert server.runner.pool and server.sessions.get(sid).state == "running"
        busy = http.post("/v1/chat/completions", json={**body, "stream": False})  # max_sessions=1
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
    session = server.sessions.get(sid)
    wait_for(lambda: session.state != "running", 30, "the session to end")
    assert session.state == "cancelled" and len(session.tokens) < 1900
    wait_for(lambda: len(server.runner.pool) == 0, 10, "the session's KV cache to be freed")


def test_metrics_count_requests_tokens_and_latencies(server, http, client):
    """Counts what this test asks for itself (after less before), so it holds alone and in any
    order; it used to read what the tests above it did."""
    before = Metrics(http.get("/metrics").text)
    msgs = [{"role": "user", "content": PROMPT}]
    client.chat.completions.create(model="long", messages=msgs, max_tokens=12)
    list(client.chat.completions.create(model="long", messages=msgs, max_tokens=12, stream=True))
    client.completions.create(model="long", prompt=PROMPT, max_tokens=8)
    for bad in ({"n": 2}, {"model": "gpt-4o"}):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(**{"model": "long", "messages": msgs, **bad})
    body = {"model": "long", "messages": msgs, "max_tokens": 1900, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:  # left after its first text
        chunks = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))
        next(c for c in chunks if c["choices"][0]["delta"].get("content"))

    def added(name: str, **labels: str) -> float:
        return m.value(name, **labels) - before.value(name, **labels)

    def cancelled() -> bool:
        nonlocal m
        m = Metrics(http.get("/metrics").text)
        return added("consortium_requests_total", endpoint="chat", outcome="cancelled") == 1

    m = before
    wait_for(cancelled, 30, "the disconnected request to count as cancelled")
    wait_for(lambda: len(server.runner.pool) == 0, 10, "the cancelled session's KV cache to be freed")
    assert added("consortium_requests_total", endpoint="chat", outcome="length") == 2
    assert added("consortium_requests_total", endpoint="chat", outcome="rejected") == 2
    assert added("consortium_requests_total", endpoint="completion", outcome="length") == 1
    assert added("consortium_generation_tokens_total") >= 12 + 12 + 8
    assert added("consortium_time_to_first_token_seconds_count") >= 4
    assert added("consortium_inter_token_latency_seconds_count") >= 11
    assert m.value("consortium_nodes", role="serving", backend="cpu") == 1
    assert m.value("consortium_layer_min_holders") == 1 and m.value("consortium_bans_total") == 0
    assert added("consortium_step_seconds_count", stage="0", node="coordinator", phase="prefill") >= 4
    assert added("consortium_step_seconds_sum", stage="0", node="coordinator", phase="decode") > 0
    for name in (
        "consortium_e2e_request_latency_seconds_count",
        "consortium_rollbacks_total",
        "consortium_failovers_total",
    ):
        assert name in m


def test_https_with_a_certificate_and_a_bad_pair_refused(server, tmp_path):
    import ssl

    from consortium.errors import ConsortiumError
    from consortium.identity.tls import TlsIdentity
    from consortium.serving.server import HttpServer

    tls = TlsIdentity.generate()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(tls.cert_pem)
    key.write_bytes(tls.key_pem)
    https = HttpServer(server.coordinator, ServeConfig(http_port=0, http_tls_cert=cert, http_tls_key=key))
    https.start()
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False  # the certificate names consortium-node, not 127.0.0.1
        assert https.url.startswith("https://")
        assert httpx.get(https.url + "/health", verify=ctx).json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError):
            httpx.get(https.url + "/health")  # an unknown certificate is refused by default
    finally:
        https.stop()
    key.write_text("not a key")
    with pytest.raises(ConsortiumError, match="cannot use .* for HTTPS"):
        HttpServer(server.coordinator, ServeConfig(http_port=0, http_tls_cert=cert, http_tls_key=key))
