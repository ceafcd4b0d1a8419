"""The coordinator audits in the representation the audited stage declares (an fp16 node is
recomputed in fp16, a packed bf16 node packed), within a memory budget: an audit stage that does
not fit is refused before it loads, with both numbers, and the unit is unverifiable, never fraud.
Honest nodes pass and a cheat is caught with the representation-matched auditor."""

from __future__ import annotations

import click
import pytest
from helpers.inprocess import coordinators

from consortium.cli.common import fill
from consortium.cli.pipeline import coordinator_start
from consortium.core.config import CoordinatorConfig, EngineConfig, LayerRange
from consortium.model.gguf_file import GGUFModel
from consortium.model.memory import stage_bytes
from consortium.model.model import KVCache, StageSpec
from consortium.model.quants import int4_mm
from consortium.model.sampling import SamplingParams
from consortium.verification.audit import (
    AuditRefused,
    LocalAuditor,
    Representation,
    audit_representation,
)

PROMPT = "the cat sat on the"
TOKENS = 10
GREEDY = SamplingParams(temperature=0.0)
W0, W1 = LayerRange(0, 1), LayerRange(1, 2)
EVERY_UNIT = {"audit_probability": 1.0, "audit_seed": 1}
FP16 = EngineConfig(dtype="fp16")
PACKED = EngineConfig(dtype="bf16", packed=True)
needs_int4 = pytest.mark.skipif(int4_mm is None, reason="this PyTorch has no CPU int4 kernel")


@pytest.fixture
def coordinator(tiny_gguf, tmp_path):
    yield from coordinators(tiny_gguf, tmp_path)


def _weights(gguf: GGUFModel, layers: LayerRange, rep: Representation) -> int:
    return stage_bytes(gguf, StageSpec(layers.start, layers.end, "cpu", rep.dtype, rep.packed))


def _kv(gguf: GGUFModel, layers: LayerRange, rep: Representation, capacity: int) -> int:
    return KVCache.nbytes_for(
        gguf.args, layers.end - layers.start, capacity, StageSpec(0, 1, dtype=rep.dtype).torch_dtype
    )


# --- the auditor ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "declared",
    [
        Representation("fp16"),
        Representation("fp32"),
        pytest.param(Representation("bf16", True), marks=needs_int4),
    ],
    ids=str,
)
def test_the_audit_stage_is_built_in_the_declared_representation(tiny_gguf, declared):
    auditor = LocalAuditor(GGUFModel(tiny_gguf))
    lease = auditor.open(1, 2, declared, capacity=16)
    spec = lease.stage.spec
    assert (spec.dtype, spec.packed, lease.rep) == (declared.dtype, declared.packed, declared)
    assert lease.cache.k[0].dtype == spec.torch_dtype  # the KV cache too
    packed = [m for m in lease.stage.modules() if getattr(m, "packed", None)]
    assert bool(packed) == declared.packed
    assert auditor.held_bytes == _weights(auditor.gguf, W1, declared) + lease.kv_bytes
    lease.close()
    assert auditor.held_bytes == _weights(auditor.gguf, W1, declared)  # kept for reuse, KV freed


def test_packed_falls_back_to_the_same_dtype_dense_where_the_int4_kernel_cannot_run():
    # packed int4 runs on CPU only: elsewhere bf16 dense (2 bytes a weight, the same class), never fp32
    assert audit_representation(Representation("bf16", True), "cuda") == Representation("bf16")
    assert audit_representation(Representation("fp16"), "cuda") == Representation("fp16")
    assert Representation("bf16").klass == Representation("bf16", True).klass == "loose"


def test_the_budget_counts_what_is_held_drops_unused_stages_and_refuses_with_both_numbers(tiny_gguf):
    gguf = GGUFModel(tiny_gguf)
    fp16 = Representation("fp16")
    one = _weights(gguf, W0, fp16) + _kv(gguf, W0, fp16, 16)
    assert _weights(gguf, W1, fp16) + _kv(gguf, W1, fp16, 16) <= one  # W1 has no embedding
    auditor = LocalAuditor(gguf, budget=one)
    a = auditor.open(0, 1, fp16, 16)
    with pytest.raises(AuditRefused) as refused:  # W0's stage is in use: no room for W1's
        auditor.open(1, 2, fp16, 16)
    need = _weights(gguf, W1, fp16) + _kv(gguf, W1, fp16, 16)
    message = str(refused.value)
    assert f"layers 1-2 in fp16 needs about {need / 2**20:.1f} MiB" in message
    assert f"the audit memory budget is {one / 2**20:.1f} MiB" in message
    a.close()
    b = auditor.open(1, 2, fp16, 16)  # W0's stage is unused now: dropped to make room
    assert [k[:2] for k in auditor.loaded()] == [(1, 2)] and auditor.held_bytes <= one
    b.close()


# --- the verifier --------------------------------------------------------------------------


def _frauds(c) -> list[dict]:
    return [e for n in ("w0", "w1", "spare") for e in c.ledger.evidence(n)]


@pytest.mark.parametrize(
    ("engine", "klass"),
    [(FP16, "strict"), pytest.param(PACKED, "loose", marks=needs_int4)],
    ids=["fp16", "packed"],
)
def test_honest_nodes_pass_and_a_cheat_is_caught_by_the_matching_auditor(coordinator, engine, klass):
    c = coordinator(tolerance_classes="all")
    c.add_node("w0", W0, engine=engine)
    c.add_node("w1", W1, engine=engine)
    honest = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, **EVERY_UNIT)
    audits = c.ledger.audits(honest.session.session_id)
    assert audits and all(a["passed"] and a["tolerance"] == klass for a in audits)
    assert c.ledger.banned_nodes() == [] and honest.rollbacks == []
    rep = Representation(engine.dtype, engine.packed)
    assert set(c.verifier.auditor.loaded()) == {(0, 1, rep), (1, 2, rep)}  # no fp32 copies

    c.add_node("cheat", W1, misbehave="wrong-weights", engine=engine)
    caught = c.generate(["w0", "cheat"], PROMPT, TOKENS, GREEDY, **EVERY_UNIT)
    assert [(b.stage, b.node) for b in caught.rollbacks] == [(1, "cheat")]
    assert c.ledger.banned_nodes() == ["cheat"] and caught.session.audits.counts().failed >= 1


def test_an_audit_over_the_budget_is_unverifiable_and_nobody_is_called_a_cheat(coordinator):
    c = coordinator(audit_memory_bytes=4096)
    c.add_node("w0", W0, engine=FP16)
    c.add_node("w1", W1, engine=FP16, misbehave="noise=0.05")  # would fail any audit
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, **EVERY_UNIT)
    refused = c.ledger.events(r.session.session_id, "audit_refused")
    assert refused and {e["stage"] for e in refused} == {0, 1}
    assert (
        "in fp16 needs about" in refused[0]["reason"]
        and "audit memory budget is 0.0 MiB" in refused[0]["reason"]
    )
    counts = r.session.audits.counts()
    assert counts.failed == 0 and counts.passed == 0 and counts.pending == 0
    assert r.session.audits.unverified > 0
    assert c.ledger.banned_nodes() == [] and _frauds(c) == [] and r.rollbacks == []
    assert c.verifier.auditor.loaded() == []


def test_a_remote_auditor_is_used_first_and_its_mismatch_is_not_fraud_unconfirmed(coordinator):
    """The spare audits stage 1 remotely; the coordinator cannot afford the stage to confirm
    the spare's mismatch, so the unit is unverifiable: neither the node nor the spare is banned."""
    c = coordinator(audit_memory_bytes=4096, audit_recheck_probability=1.0)
    c.add_node("w0", W0, engine=FP16)
    c.add_node("w1", W1, engine=FP16, misbehave="noise=0.05")
    c.add_node("spare", W1, engine=FP16)
    r = c.generate(["w0", "w1"], PROMPT, TOKENS, GREEDY, **EVERY_UNIT)
    sid = r.session.session_id
    rechecks = c.ledger.events(sid, "recheck_refused")
    assert rechecks and rechecks[0]["auditor"] == "spare" and rechecks[0]["remote_passed"] is False
    assert any("could not be confirmed" in e["reason"] for e in c.ledger.events(sid, "audit_refused"))
    assert c.ledger.banned_nodes() == [] and _frauds(c) == [] and r.rollbacks == []
    assert r.session.audits.counts().failed == 0


def test_coordinator_start_takes_the_audit_memory_budget(tmp_path):
    ctx = coordinator_start.make_context("start", ["--audit-memory-mb", "512"])
    cfg = fill(CoordinatorConfig, dict(ctx.params), model=tmp_path / "m.gguf")
    assert cfg.audit_memory_bytes == 512 * 2**20
    assert CoordinatorConfig(model=tmp_path / "m.gguf").audit_memory_bytes is None  # free memory less 1 GiB
    with pytest.raises(click.BadParameter, match="must be positive"):
        coordinator_start.make_context("start", ["--audit-memory-mb", "0"])
