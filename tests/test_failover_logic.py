"""Failover pieces without processes: the adaptive call deadline, the registry's view of a
node that failed a call, spares and standbys, the ledger across a coordinator restart
(end to end: tests/integration/test_failover.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from consortium.coordinator.loop import TokenLoop
from consortium.coordinator.registry import Node, Registry
from consortium.core.config import CoordinatorConfig, LayerRange, SessionRequest, WorkerConfig
from consortium.core.session import Session, StageRef, StepRecord
from consortium.errors import ConsortiumError
from consortium.transport.tensors import WireTensor
from consortium.verification.ledger import Ledger


def _loop(**kw) -> TokenLoop:
    return TokenLoop(CoordinatorConfig(Path("m.gguf"), **kw), None, None, None, None, None)


def _session(rtts_ms: list[float], prefill_ms: float = 5000.0) -> Session:
    ref = StageRef(0, "w", "127.0.0.1:1", LayerRange(0, 1), "cpu", "fp32", False)
    s = Session("s", SessionRequest("p"), [1, 2, 3], 8, [ref])
    prompt = WireTensor.from_tokens([1, 2, 3])
    s.history[0].append(StepRecord(0, 0, prompt, prompt, "w", prefill_ms, 1.0))  # the prefill
    for i, rtt in enumerate(rtts_ms):
        tok = WireTensor.from_tokens([4])
        s.history[0].append(StepRecord(i + 1, 3 + i, tok, tok, "w", rtt, 1.0))
    return s


def test_prefill_keeps_its_long_deadline():
    loop = _loop(prefill_timeout_s=300.0)
    assert loop.deadline(_session([1.0, 1.0]), 0, rows=5) == 300.0


def test_decode_deadline_follows_the_median_round_trip_with_a_floor_and_a_cap():
    loop = _loop(step_timeout_s=60.0, failover_floor_s=2.0, failover_rtt_factor=20.0)
    assert loop.deadline(_session([]), 0, rows=1) == 60.0  # no decode yet: 20 x the 5 s prefill, capped
    assert loop.deadline(_session([], prefill_ms=150.0), 0, rows=1) == 3.0
    assert loop.deadline(_session([1.0, 2.0, 900.0]), 0, rows=1) == 2.0  # 20 x 2 ms < floor; outlier ignored
    assert loop.deadline(_session([400.0, 500.0, 600.0]), 0, rows=1) == 10.0
    assert loop.deadline(_session([5000.0] * 3), 0, rows=1) == 60.0


def test_a_node_that_failed_a_call_is_dead_until_its_next_heartbeat():
    reg = Registry("d", "m", 4, node_timeout_s=8.0)
    node = Node("w", "127.0.0.1:1", "cpu", "cpu", "fp32", False, 0, 1.0, LayerRange(0, 1), "d")
    reg.register(node)
    assert reg.is_alive("w")
    reg.mark_dead("w")
    assert not reg.is_alive("w") and reg.alive() == []
    time.sleep(0.01)
    reg.heartbeat("w")
    assert reg.is_alive("w")


def _node(nid: str, layers: LayerRange | None, standby: bool = False) -> Node:
    return Node(nid, "127.0.0.1:1", "cpu", "cpu", "fp32", False, 0, 1.0, layers, "d", standby=standby)


def test_of_two_holders_of_a_range_the_first_serves_and_one_back_from_the_dead_queues_behind():
    reg = Registry("d", "m", 4, node_timeout_s=8.0)
    for n in (_node("b", LayerRange(0, 2)), _node("a", LayerRange(0, 2)), _node("s", None, standby=True)):
        reg.register(n)
    serving, spares = reg.serving()
    assert [n.node_id for n in serving] == ["b"] and [n.node_id for n in spares] == ["a"]
    reg.mark_dead("b")  # b failed a call: a serves
    assert [n.node_id for n in reg.serving()[0]] == ["a"] and reg.serving()[1] == []
    reg.heartbeat("b")  # b is back: a spare now, behind the node that replaced it
    assert [n.node_id for n in reg.serving()[0]] == ["a"] and [n.node_id for n in reg.serving()[1]] == ["b"]
    reg.set_layers("s", LayerRange(2, 4), "x")  # a standby that took a range serves it
    assert [n.node_id for n in reg.serving()[0]] == ["a", "s"]
    assert reg.silent_for("a") < 1.0 and reg.silent_for("nobody") == float("inf")


def test_config_refuses_a_standby_with_layers_and_a_hang_limit_below_the_heartbeat():
    with pytest.raises(ConsortiumError, match="standby"):
        WorkerConfig("127.0.0.1:1", Path("m.gguf"), layers=LayerRange(0, 1), standby=True)
    with pytest.raises(ConsortiumError, match="hang-after"):
        CoordinatorConfig(Path("m.gguf"), heartbeat_interval_s=2.0, hang_after_s=1.0)


def test_ledger_marks_cut_off_sessions_interrupted_and_resumes_them_with_fresh_step_numbers(tmp_path):
    led = Ledger(tmp_path / "l.db")
    led.create_session("s1", [1, 2], {"max_tokens": 8}, [])
    led.create_session("s2", [1, 2], {"max_tokens": 8}, [])
    led.set_session_status("s2", "finished")
    for pos, tok in ((2, 5), (3, 6), (4, 7)):
        led.commit_step("s1", [], pos, tok)
    assert led.interrupt_running() == ["s1"]
    assert led.session("s1")["status"] == "interrupted" and led.session("s2")["status"] == "finished"
    assert led.interrupt_running() == []
    assert led.resume_session("s1", [{"node": "w", "layers": [0, 4]}]) == 4  # 3 tokens: steps 0..3 used
    rec = led.session("s1")
    assert rec["status"] == "running" and rec["error"] is None and rec["tokens"] == [5, 6, 7]
