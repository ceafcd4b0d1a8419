"""Release modes against a real cheater: worker-1 adds noise to its outputs and every unit is
audited. Three requests run at once; each session is rolled back when its audit catches the
cheat. Verified release never shows the withdrawn text: the client gets exactly the honest
single-node text. Optimistic release had already sent it: the stream ends with an error
event naming the rollback. A full (non-streaming) response is the honest text in any mode."""

from __future__ import annotations

import json
import threading

import httpx
from helpers.cluster import start_cluster
from helpers.serving import long_tiny_gguf, single_node_text

from consortium.core.config import LayerRange

PROMPT = "the cat sat on"
TOKENS = 24


def _request(url: str, release: str, stream: bool, out: dict) -> None:
    body = {
        "model": "long",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": TOKENS,
        "stream": stream,
        "release": release,
    }
    if not stream:  # a full response: sent at the end, whatever the release mode
        out["full"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()
        return
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        out[release] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _cheat_cluster(request, tmp_path, monkeypatch, audits: list[str]):
    """The API cluster with worker-1 cheating, and the honest single-node text."""
    model = long_tiny_gguf(tmp_path / "long.gguf")
    honest, _ = single_node_text(model, PROMPT, TOKENS)
    monkeypatch.setenv("CONSORTIUM_ALLOW_MISBEHAVE", "1")
    cluster = start_cluster(
        request,
        model,
        tmp_path / "logs",
        LayerRange(2, 4),
        [LayerRange(0, 1), LayerRange(1, 2)],
        coordinator_args=["--http-port", "0", *audits],
        worker_args=[[], ["--misbehave", "noise=0.5"]],
    )
    return cluster, honest


def test_verified_release_never_retracts_and_optimistic_names_the_rollback(request, tmp_path, monkeypatch):
    cluster, honest = _cheat_cluster(request, tmp_path, monkeypatch, ["--audit-probability", "1"])
    out: dict[str, list[str]] = {}
    runs = [("verified", True), ("optimistic", True), ("optimistic", False)]
    threads = [threading.Thread(target=_request, args=(cluster.http_url, r, s, out)) for r, s in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)

    verified = [json.loads(e) for e in out["verified"][:-1]]
    assert out["verified"][-1] == "[DONE]" and not any("error" in e for e in verified)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in verified if e["choices"]) == honest
    info = verified[-1]["consortium"]
    assert info["release"] == "verified" and info["rollbacks"] and info["audits"]["failed"] >= 1
    assert info["rollbacks"][0]["node"] == "worker-1"

    optimistic = [json.loads(e) for e in out["optimistic"][:-1]]
    assert out["optimistic"][-1] == "[DONE]"
    error = optimistic[-1]["error"]
    assert error["type"] == "rollback" and error["code"] == "rollback"
    assert "rollback: stage 1 node worker-1 was caught (failed audit" in error["message"]
    sent = "".join(e["choices"][0]["delta"].get("content") or "" for e in optimistic[:-1] if e["choices"])
    assert sent and "withdrawing" in error["message"]  # text had gone out before the rollback withdrew it
    assert optimistic[-1]["consortium"]["rollbacks"][0]["node"] == "worker-1"

    full = out["full"]
    assert full["choices"][0]["message"]["content"] == honest and full["consortium"]["rollbacks"]


def test_verified_release_holds_tokens_past_the_last_audit_when_units_are_sampled(
    request, tmp_path, monkeypatch
):
    """At p = 0.25 a stage's newest rows wait for its next audit (or the session's end): no
    audit is pending meanwhile, yet one may still fail on them, so they are not released."""
    audits = ["--audit-probability", "0.25", "--audit-seed", "3"]
    cluster, honest = _cheat_cluster(request, tmp_path, monkeypatch, audits)
    out: dict[str, list[str]] = {}
    _request(cluster.http_url, "verified", True, out)
    events = [json.loads(e) for e in out["verified"][:-1]]
    assert out["verified"][-1] == "[DONE]" and not any("error" in e for e in events)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == honest
    assert events[-1]["consortium"]["rollbacks"][0]["node"] == "worker-1"
