"""Failover pieces without processes: the adaptive call deadline and the registry's view of a
node that failed a call (end to end: tests/integration/test_failover.py)."""

from __future__ import annotations

import time
from pathlib import Path

from consortium.coordinator.loop import TokenLoop
from consortium.coordinator.registry import Node, Registry
from consortium.core.config import CoordinatorConfig, LayerRange, SessionRequest
from consortium.core.session import Session, StageRef, StepRecord
from consortium.transport.tensors import WireTensor


def _loop(**kw) -> TokenLoop:
    return TokenLoop(CoordinatorConfig(Path("m.gguf"), **kw), None, None, None, None, None, None)


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
