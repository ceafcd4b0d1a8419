"""Failover end to end (DESIGN.md §5): a worker killed (-9) or hung (SIGSTOP) mid-generation
is replaced, the replacement's KV cache rebuilt by replaying the stage's committed inputs,
and the session ends with exactly the tokens of an uninterrupted single-node run.

A worker meant to fail at a token is started with `--misbehave die-at=N` (it SIGKILLs itself)
or `hang-at=N` (it SIGSTOPs itself) on the decode order of step N, so the failover happens at
token N exactly; signals from outside remain for kills not tied to a worker's step (the
coordinator, an auditor mid-audit, a hang before the session, the demo's --kill-at).

The tiny model's cluster: worker-0 holds layers 0-1, worker-1 layers 1-2, the coordinator
2-4 (and is the backup of any range: no standby worker holds the same layers).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import grpc
import pytest
from helpers.cli import assert_one_line_error, consortium
from helpers.cluster import (
    STARTUP_S,
    TINY_SPLIT,
    add_worker,
    ledger_cluster,
    processes_mentioning,
    start_cluster,
    wait_for,
)

from consortium.coordinator.client import Client
from consortium.core.config import ClientConfig, LayerRange, SessionRequest
from consortium.model.generate import generate, load_single_node
from consortium.model.sampling import SamplingParams
from consortium.transport.rpc import RemoteError
from consortium.verification.ledger import Ledger
from consortium.verification.misbehave import ENABLE_ENV

PROMPT = "the cat sat on the"
SEEDED = SamplingParams(temperature=0.8, top_k=50, seed=11)
GREEDY = SamplingParams(temperature=0.0)
TOKENS = 24
FAIL_AT = 8  # die-at / hang-at: the worker fails on the decode order of step 8, the failover is at token 8


@pytest.fixture(scope="module")
def single_node(tiny_gguf):
    gguf, stage, tok = load_single_node(tiny_gguf)

    def run(sampling: SamplingParams) -> list[int]:
        return generate(stage, tok, tok.encode_prompt(PROMPT, chat=True), TOKENS, sampling).tokens

    return run


def _cluster(request, tiny_gguf, tmp_path, coordinator_args=(), worker_args=()):
    return ledger_cluster(request, tiny_gguf, tmp_path, TINY_SPLIT, coordinator_args, worker_args)


def _faults(monkeypatch, *faults: str | None) -> list[list[str]]:
    """worker_args: worker-i starts with `--misbehave faults[i]` (e.g. die-at=8), None: honest."""
    monkeypatch.setenv(ENABLE_ENV, "1")
    return [["--misbehave", f] if f else [] for f in faults]


def _proc(cluster, name: str):
    return next(p for p in cluster.processes if p.name == name)


def _signals(cluster, actions: dict[int, list[tuple[str, int]]]):
    """An on_text callback: after k streamed tokens, send each (process, signal) of actions[k]."""
    count = 0

    def on_text(_text: str) -> None:
        nonlocal count
        count += 1
        for name, sig in actions.get(count, []):
            _proc(cluster, name).signal_group(sig)

    return on_text


@contextlib.contextmanager
def _read_ledger(path):
    led = Ledger(path, create=False, readonly=True)
    try:
        yield led
    finally:
        led.close()


def _run(client_for, cluster, sampling: SamplingParams):
    """Runs a session without audits."""
    return client_for(cluster).run(SessionRequest(PROMPT, TOKENS, sampling, audit_probability=0.0))


def test_killed_worker_fails_over_to_the_coordinator(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    worker_args = _faults(monkeypatch, None, f"die-at={FAIL_AT}")
    cluster, ledger = _cluster(request, tiny_gguf, tmp_path, worker_args=worker_args)
    r = _run(client_for, cluster, GREEDY)
    assert _proc(cluster, "worker-1").proc.wait(10) == -signal.SIGKILL
    assert r.tokens == single_node(GREEDY)
    assert [(f.stage, f.failed_node, f.backup_node) for f in r.failovers] == [(1, "worker-1", "coordinator")]
    f = r.failovers[0]
    assert f.token_index == FAIL_AT and f.latency_ms > 0
    assert f.replayed_positions == r.prompt_tokens + FAIL_AT - 1  # every position committed before
    assert r.rollbacks == [] and r.banned_nodes == []
    assert [s.node_id for s in r.stages] == ["worker-0", "coordinator", "coordinator"]
    assert json.loads(json.dumps(r.to_dict()))["failovers"][0]["failed_node"] == "worker-1"
    with _read_ledger(ledger) as led:
        events = led.events(r.session_id, "failover")
    assert len(events) == 1 and events[0]["backup_node"] == "coordinator" and events[0]["stage"] == 1
    assert events[0]["replay_check"]["passed"]  # the replay matched the committed outputs (a free audit)
    # the next session runs on the coordinator's backup of layers 1-2 without failing over
    again = client_for(cluster).run(SessionRequest(PROMPT, TOKENS, SEEDED, audit_probability=0.0))
    assert again.tokens == single_node(SEEDED) and again.failovers == []
    assert [s.node_id for s in again.stages] == ["worker-0", "coordinator", "coordinator"]


def test_hung_worker_is_detected_and_fails_over(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    worker_args = _faults(monkeypatch, None, f"hang-at={FAIL_AT}")
    cluster, _ = _cluster(request, tiny_gguf, tmp_path, worker_args=worker_args)
    request.addfinalizer(lambda: _proc(cluster, "worker-1").signal_group(signal.SIGCONT))  # before the stop
    t0 = time.monotonic()
    r = _run(client_for, cluster, SEEDED)
    assert time.monotonic() - t0 < 30  # the adaptive deadline (2 s floor), not the 60 s step timeout
    assert r.tokens == single_node(SEEDED)
    assert [(f.stage, f.token_index, f.failed_node, f.backup_node) for f in r.failovers] == [
        (1, FAIL_AT, "worker-1", "coordinator")
    ]


def test_two_stages_fail_in_one_session(request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch):
    """worker-0 (the first stage, fed tokens) dies and worker-1 hangs on the same step: the
    token loop meets worker-0 first, fails it over, then worker-1 hangs on that step's order."""
    worker_args = _faults(monkeypatch, "die-at=5", "hang-at=5")
    cluster, _ = _cluster(request, tiny_gguf, tmp_path, worker_args=worker_args)
    request.addfinalizer(lambda: _proc(cluster, "worker-1").signal_group(signal.SIGCONT))
    r = _run(client_for, cluster, SEEDED)
    assert r.tokens == single_node(SEEDED)
    assert [(f.stage, f.token_index, f.failed_node, f.backup_node) for f in r.failovers] == [
        (0, 5, "worker-0", "coordinator"),
        (1, 5, "worker-1", "coordinator"),
    ]
    assert {s.node_id for s in r.stages} == {"coordinator"}


def test_demo_kill_at_shows_a_failover(tiny_gguf, tmp_path, single_node):
    session = ["--model", str(tiny_gguf), "--prompt", PROMPT, "--max-tokens", str(TOKENS)]
    opts = ["--temperature", "0", "--kill-at", "6", "--audit-probability", "0", "--json"]
    done = consortium("demo", *session, *opts, "--log-dir", str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["tokens"] == single_node(GREEDY)
    assert [(f["stage"], f["failed_node"], f["backup_node"]) for f in out["failovers"]] == [
        (1, "worker-1", "coordinator")
    ]
    assert "killed worker-1" in done.stderr and "all processes stopped" in done.stderr
    assert processes_mentioning(str(tmp_path)) == []


def test_failover_with_every_unit_audited(request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch):
    """Interplay with verification: the failed node's committed work is still audited (and
    passes); no rollback, no ban; the backup (the coordinator) is not audited."""
    worker_args = _faults(monkeypatch, None, f"die-at={FAIL_AT}")
    cluster, _ = _cluster(request, tiny_gguf, tmp_path, worker_args=worker_args)
    req = SessionRequest(PROMPT, TOKENS, SEEDED, audit_probability=1.0, audit_seed=1)
    r = client_for(cluster).run(req)
    assert r.tokens == single_node(SEEDED)
    assert [(f.stage, f.token_index, f.failed_node) for f in r.failovers] == [(1, FAIL_AT, "worker-1")]
    assert r.rollbacks == [] and r.banned_nodes == []
    assert r.audits.failed == 0 and r.audits.pending == 0 and r.audits.passed > 0


def _standby_cluster(request, tiny_gguf, tmp_path, worker_1_args=()):
    """worker-0 0-1, worker-1 1-2, worker-2 a standby (no layers), the coordinator 2-4."""
    return start_cluster(
        request,
        tiny_gguf,
        tmp_path / "logs",
        LayerRange(2, 4),
        [LayerRange(0, 1), LayerRange(1, 2), None],
        coordinator_args=["--ledger", str(tmp_path / "ledger.db")],
        worker_args=[[], list(worker_1_args), ["--standby"]],
    )


def _roles(client) -> dict[str, str]:
    return {n["node_id"]: n["role"] for n in client.cluster_status()["nodes"]}


def test_standby_takes_over_and_the_restarted_worker_rejoins_as_spare(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    cluster = _standby_cluster(request, tiny_gguf, tmp_path, *_faults(monkeypatch, f"die-at={FAIL_AT}"))
    client = client_for(cluster)
    assert _roles(client) == {
        "coordinator": "serving",
        "worker-0": "serving",
        "worker-1": "serving",
        "worker-2": "standby",
    }
    live = []
    req = SessionRequest(PROMPT, TOKENS, SEEDED, audit_probability=0.0)
    r = client.run(req, on_failover=live.append)
    assert r.tokens == single_node(SEEDED)
    assert [(f.stage, f.failed_node, f.backup_node) for f in r.failovers] == [(1, "worker-1", "worker-2")]
    assert [ev.backup_node for ev in live] == ["worker-2"]  # streamed while the session ran
    f = r.failovers[0]
    assert f.token_index == FAIL_AT and f.load_ms > 0
    assert f.replayed_positions == r.prompt_tokens + FAIL_AT - 1
    assert [s.node_id for s in r.stages] == ["worker-0", "worker-2", "coordinator"]
    assert "loading layers 1-2: 1/1" in (tmp_path / "logs" / "worker-2.log").read_text()

    # worker-1 restarted with the same identity (and its die-at, but a spare gets no work here):
    # registers again and waits as a spare of 1-2
    _proc(cluster, "worker-1").start(dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for(lambda: _roles(client).get("worker-1") == "spare", what="worker-1 to rejoin as a spare")
    assert _roles(client)["worker-2"] == "serving"
    again = client.run(SessionRequest(PROMPT, TOKENS, GREEDY, audit_probability=0.0))
    assert again.tokens == single_node(GREEDY) and again.failovers == []
    assert [s.node_id for s in again.stages] == ["worker-0", "worker-2", "coordinator"]


def test_a_hung_worker_that_comes_back_drops_its_stale_caches(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    cluster = _standby_cluster(request, tiny_gguf, tmp_path, *_faults(monkeypatch, f"hang-at={FAIL_AT}"))
    request.addfinalizer(lambda: _proc(cluster, "worker-1").signal_group(signal.SIGCONT))
    client = client_for(cluster)
    r = _run(client_for, cluster, GREEDY)
    assert r.tokens == single_node(GREEDY)
    assert [(f.token_index, f.failed_node, f.backup_node) for f in r.failovers] == [
        (FAIL_AT, "worker-1", "worker-2")
    ]
    _proc(cluster, "worker-1").signal_group(signal.SIGCONT)
    log_file = tmp_path / "logs" / "worker-1.log"
    # gone either by the close the coordinator sent while it hung (served on SIGCONT) or by the
    # heartbeat reply naming it (whichever comes first; the placement test covers the latter alone)
    gone = (f"dropped the KV cache of session {r.session_id}", f"session {r.session_id} closed")
    wait_for(lambda: any(g in log_file.read_text() for g in gone), what="worker-1 to drop the stale cache")
    # back, it queues behind the standby that replaced it
    wait_for(lambda: _roles(client).get("worker-1") == "spare", what="worker-1 to be a spare")
    again = client.run(SessionRequest(PROMPT, TOKENS, SEEDED, audit_probability=0.0))
    assert again.tokens == single_node(SEEDED) and [s.node_id for s in again.stages][1] == "worker-2"


def test_no_backup_fails_the_session_clearly_and_keeps_its_tokens(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    worker_args = _faults(monkeypatch, None, f"die-at={FAIL_AT}")
    cluster, ledger = _cluster(request, tiny_gguf, tmp_path, ["--no-backup"], worker_args)
    client = client_for(cluster)
    started = []
    req = SessionRequest(PROMPT, TOKENS, GREEDY, audit_probability=0.0)
    with pytest.raises(RemoteError, match="no backup is available") as exc:
        client.run(req, on_start=started.append)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    sid = started[0].session_id
    st = client.session_status(sid)
    baseline = single_node(GREEDY)
    assert st["state"] == "failed" and "no backup" in st["error"]
    assert len(st["tokens"]) == FAIL_AT and st["tokens"] == baseline[:FAIL_AT]
    with _read_ledger(ledger) as led:
        assert led.tokens(sid) == st["tokens"] and led.session(sid)["status"] == "failed"
    assert st["resumable"]  # once a node can take the layers, the session goes on exactly
    _add_spare(cluster, tiny_gguf, tmp_path, "late", role="serving")  # worker-1 is dead
    assert client.resume(sid).tokens == baseline


def test_hang_during_prefill_is_caught_by_missing_heartbeats(
    request, tiny_gguf, tmp_path, client_for, single_node
):
    """The prefill's deadline is long (a slow node may need it); a stopped node's heartbeats
    stop, and the call is given up after --hang-after (3 s) of silence."""
    cluster, _ = _cluster(request, tiny_gguf, tmp_path)
    request.addfinalizer(lambda: _proc(cluster, "worker-1").signal_group(signal.SIGCONT))
    client = client_for(cluster)
    client.cluster_status()
    _proc(cluster, "worker-1").signal_group(signal.SIGSTOP)  # still "alive" for the route (8 s)
    t0 = time.monotonic()
    r = client.run(SessionRequest(PROMPT, TOKENS, SEEDED, audit_probability=0.0))
    assert r.tokens == single_node(SEEDED)
    assert [(f.stage, f.token_index, f.failed_node) for f in r.failovers] == [(1, 0, "worker-1")]
    assert "stopped heartbeating" in r.failovers[0].error
    assert time.monotonic() - t0 < 60


def test_coordinator_restart_keeps_the_session_and_resume_continues_it_exactly(
    request, tiny_gguf, tmp_path, client_for, single_node
):
    cluster, ledger = _cluster(request, tiny_gguf, tmp_path)
    started = []
    on_text = _signals(cluster, {10: [("coordinator", signal.SIGKILL)]})
    req = SessionRequest(PROMPT, TOKENS, SEEDED, audit_probability=0.5, audit_seed=3)
    with pytest.raises(RemoteError):
        client_for(cluster).run(req, on_text=on_text, on_start=started.append)
    sid = started[0].session_id
    coordinator = _proc(cluster, "coordinator")
    coordinator.proc.wait(10)
    coordinator.start(dict(os.environ, PYTHONUNBUFFERED="1"))  # same port, same ledger
    cluster.wait_ready(STARTUP_S)  # the workers register again
    client = client_for(cluster)
    baseline = single_node(SEEDED)
    st = client.session_status(sid)  # read back from the ledger
    assert st["state"] == "interrupted" and st["resumable"]
    assert 10 <= len(st["tokens"]) < TOKENS and st["tokens"] == baseline[: len(st["tokens"])]
    assert st["text"]
    shown = consortium("session", "status", "--coordinator", cluster.address, "--session-id", sid)
    assert shown.returncode == 0, shown.stderr
    assert (
        f"session {sid}: interrupted" in shown.stdout
        and "resumable: consortium session resume" in shown.stdout
    )

    done = consortium("session", "resume", "--coordinator", cluster.address, "--session-id", sid, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["tokens"] == baseline and r["session_id"] == sid
    assert client.session_status(sid)["state"] == "finished"
    with pytest.raises(RemoteError, match="finished"):
        client.resume(sid)
    with pytest.raises(RemoteError, match="unknown session") as exc:
        client.resume("no-such-session")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    missing = consortium("session", "resume", "--coordinator", cluster.address, "--session-id", "nope")
    assert_one_line_error(missing, "unknown session")
    with _read_ledger(ledger) as led:
        summary = led.verify_session(sid)  # receipts from before and after the restart chain up
        assert summary.tokens == TOKENS
        assert [e["kind"] for e in led.events(sid)].count("resumed") == 1
    show = consortium("session", "show", "--ledger", str(ledger), "--session-id", sid)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["tokens"] == baseline


def _add_spare(cluster, tiny_gguf, tmp_path, name: str, extra_args=(), role: str = "spare"):
    """Starts one more worker holding layers 1-2 after the cluster is up (a spare while another
    node serves 1-2)."""
    identity = str(tmp_path / f"{name}.identity")
    args = ["--layers", "1-2", "--threads", "1", "--data-dir", identity, *extra_args]
    p = add_worker(cluster, name, tiny_gguf, tmp_path / "logs" / f"{name}.log", *args)
    client = Client(ClientConfig(cluster.address))
    try:
        wait_for(
            lambda: _roles(client).get(name) == role,
            timeout=STARTUP_S,
            what=lambda: f"{name} to register as {role}: {_roles(client)}",
        )
    finally:
        client.close()
    return p


def _audits(ledger, sid: str) -> list[dict]:
    with _read_ledger(ledger) as led:
        return led.audits(sid)


def test_a_spare_audits_and_its_death_mid_audit_moves_the_audit(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    """A worker holding the audited layers (not in the pipeline) is the auditor; killed while it
    audits (SIGKILL to itself on its 2nd audit call: after one audit is recorded, whatever the
    machine's load), the audit is reassigned (to the coordinator) and nobody is called a cheat."""
    monkeypatch.setenv("CONSORTIUM_ALLOW_MISBEHAVE", "1")
    cluster, ledger = _cluster(request, tiny_gguf, tmp_path)
    auditor = _add_spare(cluster, tiny_gguf, tmp_path, "auditor", ["--misbehave", "die-on-audit=2"])
    req = SessionRequest(PROMPT, TOKENS, SEEDED, audit_probability=1.0, audit_seed=1)
    r = client_for(cluster).run(req)
    assert auditor.proc.wait(30) == -signal.SIGKILL
    assert r.tokens == single_node(SEEDED)
    assert r.audits.failed == 0 and r.audits.pending == 0 and r.banned_nodes == [] and r.rollbacks == []
    auditors = {(a["stage"], a["auditor"]) for a in _audits(ledger, r.session_id)}
    assert (1, "auditor") in auditors and (1, "coordinator") in auditors and (0, "coordinator") in auditors
    with _read_ledger(ledger) as led:
        assert [e["node"] for e in led.events(r.session_id, "auditor_lost")] == ["auditor"]


def test_a_lying_auditor_is_caught_and_the_honest_node_is_not_banned(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    monkeypatch.setenv("CONSORTIUM_ALLOW_MISBEHAVE", "1")
    cluster, ledger = _cluster(request, tiny_gguf, tmp_path)
    _add_spare(cluster, tiny_gguf, tmp_path, "liar", ["--misbehave", "noise=0.05"])
    req = SessionRequest(PROMPT, TOKENS, GREEDY, audit_probability=1.0, audit_seed=2)
    r = client_for(cluster).run(req)
    assert r.tokens == single_node(GREEDY)
    assert r.rollbacks == [] and r.banned_nodes == [] and r.audits.pending == 0
    with _read_ledger(ledger) as led:
        assert led.is_banned("liar") and not led.is_banned("worker-1")
        assert [e["kind"] for e in led.evidence("liar")] == ["false audit"]
    assert {a["auditor"] for a in _audits(ledger, r.session_id) if a["stage"] == 1} == {"coordinator"}


def test_an_auditor_colluding_with_a_cheat_is_caught_by_the_coordinators_recheck(
    request, tiny_gguf, tmp_path, client_for, single_node, monkeypatch
):
    """worker-1 and its auditor run the same wrong weights, so the auditor passes the cheat;
    the coordinator re-checks the remote passes (--audit-recheck 1), bans both and rolls back."""
    monkeypatch.setenv("CONSORTIUM_ALLOW_MISBEHAVE", "1")
    cluster, ledger = _cluster(
        request, tiny_gguf, tmp_path, ["--audit-recheck", "1"], [[], ["--misbehave", "wrong-weights"]]
    )
    _add_spare(cluster, tiny_gguf, tmp_path, "colluder", ["--misbehave", "wrong-weights"])
    req = SessionRequest(PROMPT, TOKENS, GREEDY, audit_probability=1.0, audit_seed=4)
    r = client_for(cluster).run(req)
    assert r.tokens == single_node(GREEDY)  # the cheat's work was withdrawn and redone honestly
    assert r.banned_nodes == ["worker-1"] and r.rollbacks[0].node == "worker-1"
    with _read_ledger(ledger) as led:
        assert led.is_banned("colluder") and led.is_banned("worker-1")
        assert [e["kind"] for e in led.evidence("colluder")] == ["false audit"]
