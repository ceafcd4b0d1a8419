"""The coordinator decides which numeric classes it admits (issue 10): strict by default;
loose (bf16, packed) only when allowed, and then a session's summary says so."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from consortium.coordinator.audits import SessionAudits
from consortium.coordinator.loop import TokenLoop
from consortium.coordinator.registry import Node, Registry
from consortium.core.config import CoordinatorConfig, EngineConfig, LayerRange, SessionRequest
from consortium.core.records import SessionReport
from consortium.core.session import Session, StageRef
from consortium.errors import ConsortiumError
from consortium.model.gguf_file import GGUFModel
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.rpc import PreconditionError


def _node(nid: str, dtype: str, packed: bool = False) -> Node:
    return Node(nid, "127.0.0.1:1", "cpu", "cpu", dtype, packed, 0, 1.0, LayerRange(0, 2), "d")


def test_strict_is_the_default_and_loose_nodes_are_refused_unless_admitted():
    strict = Registry("d", "m", 4, node_timeout_s=8.0)
    strict.register(_node("a", "fp32"))
    strict.register(_node("b", "fp16"))
    for n in (_node("c", "bf16"), _node("p", "bf16", packed=True)):
        with pytest.raises(PreconditionError, match="loose verification class.*--tolerance-classes strict"):
            strict.register(n)
    both = Registry("d", "m", 4, node_timeout_s=8.0, classes=frozenset({"strict", "loose"}))
    both.register(_node("c", "bf16"))
    assert CoordinatorConfig(Path("m.gguf")).tolerance_classes == "strict"
    with pytest.raises(ConsortiumError, match="own stage computes in the loose class"):
        CoordinatorConfig(Path("m.gguf"), layers=LayerRange(2, 4), engine=EngineConfig(dtype="bf16"))
    CoordinatorConfig(
        Path("m.gguf"), layers=LayerRange(2, 4), engine=EngineConfig(dtype="bf16"), tolerance_classes="all"
    )
    with pytest.raises(ConsortiumError, match="tolerance classes"):
        CoordinatorConfig(Path("m.gguf"), tolerance_classes="lax")


@pytest.mark.parametrize(("dtype", "weaker"), [("fp16", False), ("bf16", True)])
def test_a_session_summary_names_its_weakest_class(tiny_gguf, dtype, weaker):
    g = GGUFModel(tiny_gguf)
    loop = TokenLoop(CoordinatorConfig(tiny_gguf), g.args, GGUFTokenizer(g), None, None, None)
    stages = [
        StageRef(0, "w0", "127.0.0.1:1", LayerRange(0, 2), "cpu", dtype, False),
        StageRef(1, "coordinator", "127.0.0.1:2", LayerRange(2, 4), "cpu", "fp32", True),
    ]
    s = Session("s", SessionRequest("p"), [1, 2], 4, stages, audits=SessionAudits("s", random.Random(0), 0.0))
    report = SessionReport.from_proto(loop.summary(s))
    assert report.verification == ("loose" if weaker else "strict")
    assert bool(report.verification_note) == weaker and (not weaker or "int8" in report.verification_note)
