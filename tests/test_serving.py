"""Serving's parts without processes: release of tokens around audits and rollbacks, stop
strings, request validation, config files and CONSORTIUM_* variables, exposure rules."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from consortium.cli.main import cli
from consortium.coordinator.audits import Fraud, SessionAudits
from consortium.core.config import LayerRange, SessionRequest
from consortium.core.records import RollbackRecord, StageRef
from consortium.core.session import Session
from consortium.errors import ConsortiumError
from consortium.serving.config import ServeConfig, read_api_keys
from consortium.serving.metrics import histogram, receipt_reason
from consortium.serving.release import Releaser, Retracted, StopMatcher, secured_tokens
from consortium.serving.schemas import ApiError, ChatRequest, CompletionRequest, parse

PROMPT = [1, 2, 3]  # token k of the sessions below stands once rows [0, 3 + k) passed


def session(coverage: str = "full", probability: float = 1.0) -> Session:
    """A session on a remote stage 0 (audited) and the coordinator's own stage 1 (never)."""
    stages = [
        StageRef(0, "worker-1", "w:1", LayerRange(0, 1), "cpu", "fp16", False),
        StageRef(1, "coordinator", "c:1", LayerRange(1, 2), "cpu", "fp16", True),
    ]
    s = Session("s", SessionRequest("p"), PROMPT, 16, stages)
    s.audits = SessionAudits("s", random.Random(0), probability, coverage)
    return s


def passed(s: Session, to: int) -> None:
    s.audits.verified_to[0] = to


def rollback(kept: int) -> RollbackRecord:
    return RollbackRecord(0, 10 + kept, "worker-1", "failed audit: rel-L2 0.3", kept, "coordinator")


def release(r: Releaser, s: Session, final: bool = False) -> list[str]:
    return r.release(secured_tokens(s, r.rollbacks_seen), final)


def test_verified_release_holds_each_token_until_its_rows_passed_their_audits():
    s, r = session(), Releaser(verified=True)
    for t in "abc":
        r.token(t)
    assert release(r, s) == [] and r.held == ["a", "b", "c"]  # nothing audited yet
    passed(s, 4)  # rows 0..3: tokens a (row 2) and b (row 3)
    assert release(r, s) == ["a", "b"] and r.released == 2 and r.held == ["c"]
    assert release(r, s) == []  # no audit pending, yet c's row is unchecked: a later audit may fail it
    assert release(r, s, final=True) == ["c"]  # the session's summary came: everything settled


def test_verified_release_without_audits_or_for_a_sampled_out_stage_sends_at_once():
    s, r = session(probability=0.0), Releaser(verified=True)
    r.token("a")
    assert release(r, s) == ["a"]
    s, r = session("sampled"), Releaser(verified=True)
    r.token("a")
    assert release(r, s) == []  # sampled: held until the end draws
    s.audits.drawn[0] = False
    assert release(r, s) == ["a"]


def test_verified_release_drops_what_a_rollback_withdraws_and_never_retracts():
    s, r = session(), Releaser(verified=True)
    a = s.audits
    r.token("a")
    passed(s, 4)
    assert release(r, s) == ["a"]
    for t in "bcd":
        r.token(t)
    a.fraud = Fraud(0, 5, "worker-1", "failed audit")
    assert release(r, s) == []  # fraud set, rollback not yet done (b's row passed, but wait)
    a.fraud, a.caught = None, {"worker-1"}  # the loop took the fraud: its event is still queued
    assert release(r, s) == []  # caught grew: a rollback is on its way to this stream
    s.stages[0] = StageRef(0, "coordinator", "c:1", LayerRange(0, 1), "cpu", "fp16", True)
    r.rollback(rollback(kept=2))  # tokens a, b stand; c, d are withdrawn
    assert r.held == ["b"] and release(r, s) == ["b"]  # the stage is the coordinator's now
    r.token("C")
    assert release(r, s) == ["C"] and r.released == 3


def test_optimistic_release_sends_at_once_and_a_withdrawing_rollback_is_an_error():
    s, r = session(), Releaser(verified=False)
    for t in "abc":
        r.token(t)
    assert release(r, s) == ["a", "b", "c"]
    r.rollback(rollback(kept=3))  # withdraws nothing sent: the stream goes on
    with pytest.raises(Retracted) as e:
        r.rollback(rollback(kept=1))
    assert "rollback: stage 0 node worker-1 was caught (failed audit: rel-L2 0.3)" in str(e.value)
    assert "withdrawing 2 of the 3 tokens sent" in str(e.value)


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start():
    m = StopMatcher(["###", "END"])
    assert m.push("hello #") == "hello " and not m.stopped  # '#' may begin '###'
    assert m.push("# x") == "## x"
    assert m.push(" E") == " " and m.push("N") == ""
    assert m.push("Dless") == "" and m.stopped
    m = StopMatcher(["\n\n"])
    assert m.push("a\n") == "a" and m.push("b") == "\nb" and m.flush() == ""
    assert StopMatcher([]).push("anything") == "anything"


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "only n=1"),
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
            "temperature",
            "greater than or equal to 0",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0},
            "top_p",
            "greater than 0",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "required"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": list("abcde")},
            "stop",
            "at most 4",
        ),
    ],
)
def test_bad_requests_name_the_field(body, param, match):
    with pytest.raises(ApiError) as e:
        parse(ChatRequest, body)
    assert e.value.status == 400 and e.value.param == param and match in e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_requests_ignore_unknown_fields_and_take_text_parts():
    req = parse(
        ChatRequest,
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "logit_bias": {},
            "user": "u",
            "max_completion_tokens": 5,
            "stop": "x",
        },
    )
    assert [(m.role, m.content) for m in req.chat()] == [("user", "hi")] and req.stops == ["x"]
    assert not req.include_usage and req.max_completion_tokens == 5
    image = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    }
    with pytest.raises(ApiError, match="only text content"):
        parse(ChatRequest, image).chat()
    assert parse(CompletionRequest, {"model": "m", "prompt": ["one"]}).text() == "one"
    with pytest.raises(ApiError, match="exactly one prompt"):
        parse(CompletionRequest, {"model": "m", "prompt": ["one", "two"]}).text()
    with pytest.raises(ApiError, match="must be a JSON object"):
        parse(CompletionRequest, ["not", "an", "object"])


def test_exposure_needs_keys_or_no_auth(tmp_path):
    ServeConfig(http_port=0).check_exposure()  # loopback: fine without keys
    with pytest.raises(ConsortiumError, match="refusing to serve the HTTP API on 0.0.0.0 without --api-keys"):
        ServeConfig(http_port=0, http_host="0.0.0.0").check_exposure()
    ServeConfig(http_port=0, http_host="0.0.0.0", no_auth=True).check_exposure()
    ServeConfig(http_port=0, http_host="0.0.0.0", api_keys=frozenset({"k" * 20})).check_exposure()
    keys = tmp_path / "keys"
    keys.write_text("# the ops team\n" + "a" * 32 + "\n\n" + "b" * 32 + "  # ci\n")
    assert read_api_keys(keys) == {"a" * 32, "b" * 32}
    keys.write_text("short\n")
    with pytest.raises(ConsortiumError, match="at least 16 characters"):
        read_api_keys(keys)
    with pytest.raises(ConsortiumError, match="release must be"):
        ServeConfig(release="eventually")


def test_metric_helpers():
    assert (
        receipt_reason("bad receipt", {"error": "receipt's input digest is not ... (chain broken)"})
        == "chain"
    )
    assert (
        receipt_reason("bad receipt", {"error": "receipt describes (...), not the work order"})
        == "order_mismatch"
    )
    assert receipt_reason("bad result", {"error": "NaN in output"}) == "bad_result"
    h = histogram("x_seconds", "x", [0.1, 0.3, 7.0], (0.25, 1.0))
    assert [(s.labels.get("le"), s.value) for s in h.samples if s.name == "x_seconds_bucket"] == [
        ("0.25", 1),
        ("1.0", 2),
        ("+Inf", 3),
    ]


# --- config files and CONSORTIUM_* variables -----------------------------------------------


def _parsed(command, *args) -> dict:
    return dict(command.make_context(command.name, list(args)).params)


def test_config_precedence_cli_then_env_then_file_then_defaults(tmp_path, monkeypatch):
    from consortium.cli.pipeline import coordinator_start

    f = tmp_path / "c.yaml"
    f.write_text("port: 1111\nkv-cache-mb: 7\naudit_probability: 0.5\nbackup: false\nlayers: 20-30\n")
    opts = _parsed(coordinator_start, "--config", str(f))
    assert (opts["port"], opts["kv_cache_bytes"], opts["audit_probability"]) == (1111, 7 * 2**20, 0.5)
    assert opts["backup"] is False and str(opts["layers"]) == "20-30" and opts["max_sessions"] == 16
    monkeypatch.setenv("CONSORTIUM_PORT", "2222")
    monkeypatch.setenv("CONSORTIUM_HTTP_PORT", "8080")
    opts = _parsed(coordinator_start, "--config", str(f))
    assert opts["port"] == 2222 and opts["http_port"] == 8080 and opts["kv_cache_bytes"] == 7 * 2**20
    assert _parsed(coordinator_start, "--config", str(f), "--port", "3333")["port"] == 3333
    monkeypatch.setenv("CONSORTIUM_CONFIG", str(f))  # the file itself may come from the environment
    assert _parsed(coordinator_start)["kv_cache_bytes"] == 7 * 2**20


@pytest.mark.parametrize(
    ("command", "text", "match"),
    [
        (["coordinator", "start"], "kv-cache-mb: lots\n", "kv-cache-mb: Input should be a valid integer"),
        (["coordinator", "start"], "prot: 5\n", "prot: Extra inputs are not permitted"),
        (
            ["coordinator", "start"],
            "release: eventually\n",
            "release: Input should be 'verified' or 'optimistic'",
        ),
        (["coordinator", "start"], "port: [1\n", "not valid YAML (line 2)"),
        (["coordinator", "start"], "- port\n", "expected option names and values"),
        (["worker", "start"], "standby: maybe\n", "standby: Input should be a valid boolean"),
        (["demo"], "max-tokens: 0\nmodel: none.gguf\n", "max-tokens must be positive, got 0"),
    ],
)
def test_a_bad_config_file_is_one_error_line(tmp_path, command, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = CliRunner().invoke(cli, [*command, "--config", str(f)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert match in lines[0] and "Traceback" not in r.output


def test_a_missing_config_file_is_one_error_line(tmp_path):
    r = CliRunner().invoke(cli, ["coordinator", "start", "--config", str(tmp_path / "none.yaml")])
    assert (
        r.exit_code == 1
        and r.stderr.strip()
        == f"error: cannot read config {tmp_path / 'none.yaml'}: No such file or directory"
    )


CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_the_example_configs_are_valid(path):
    from consortium.cli.pipeline import coordinator_start, worker_start
    from consortium.cli.session import demo
    from consortium.serving.config_file import load

    command = (
        demo
        if path.name == "demo.yaml"
        else coordinator_start
        if "coordinator" in path.name
        else worker_start
    )
    values = load(path, command)
    assert values and all(isinstance(k, str) and k.isidentifier() for k in values)


def test_there_are_example_configs():
    names = {str(p.relative_to(p.parents[1] if p.parent.name != "configs" else p.parent)) for p in CONFIGS}
    assert {"demo.yaml", "seed/coordinator.yaml", "seed/worker-a.yaml", "8b/coordinator.yaml"} <= names
