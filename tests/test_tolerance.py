"""Tolerances per layer range and numeric class, the unit mean bound, the per-node sequential test,
and the steering / scaling cheats (issue 10, item 6)."""

from __future__ import annotations

import math
from dataclasses import astuple

import pytest
import torch

from consortium.errors import ConsortiumError
from consortium.model import model
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.tensors import WireTensor
from consortium.verification.audit import AuditResult, judge
from consortium.verification.calibrate import PROMPTS, calibrate, validate
from consortium.verification.misbehave import STEER_TOKEN, Misbehaviour, steer_direction
from consortium.verification.sequential import NodeErrorStats
from consortium.verification.sweep import Config, chain, run_sweep
from consortium.verification.tolerance import (
    RowComparison,
    Tolerance,
    admitted_classes,
    calibration_report,
    class_of,
    tolerance_class,
    tolerance_for,
    worst_class,
)

TOL = Tolerance("strict", rel_l2=0.01, max_rel=1.0, mean_rel_l2=0.002)


def test_classes_and_admission():
    assert class_of("fp32") == class_of("fp16") == class_of("fp16", device="cuda") == "strict"
    assert class_of("bf16") == class_of("bf16", packed=True) == "loose"
    assert class_of("fp32", packed=True) == "strict"  # the strict kernel: exact weights, fp32 sums
    assert worst_class("strict", "loose") == worst_class("loose") == "loose"
    assert admitted_classes("strict") == {"strict"}
    assert admitted_classes("strict,loose") == admitted_classes("all") == admitted_classes("loose")
    assert admitted_classes(" loose ") == {"strict", "loose"}  # strict is always admitted
    for bad in ["", ",", "bf16", "strict,fast"]:
        with pytest.raises(ConsortiumError, match="tolerance classes"):
            admitted_classes(bad)


def test_thresholds_per_range_from_the_committed_report():
    rep = calibration_report()
    n, digest, starts = rep["ranges"]["n_layers"], rep["model_digest"], rep["ranges"]["sampled_starts"]

    def tol(klass: str, a: int, b: int) -> Tolerance:
        return tolerance_for(klass, (a, b), n, digest)

    # the false fraud: honest fp16 over layers 0-3 of SmolLM2 reached rel-L2 7.64e-3
    assert tol("strict", 0, 3).rel_l2 > 1.5 * 7.64e-3
    for a in range(n):
        for b in range(a + 1, n + 1):
            s, lo = tol("strict", a, b), tol("loose", a, b)
            assert s.layers == (a, b) and 0 < s.mean_rel_l2 <= s.rel_l2 and s.max_rel > 0
            assert lo.rel_l2 >= s.rel_l2 and lo.mean_rel_l2 >= s.mean_rel_l2
            assert s.rel_l2 < 0.05  # steer=0.07 and scale=1.05 fail every strict row bound
            a0 = max(x for x in starts if x <= a)  # between samples: the sampled start before
            assert s == Tolerance("strict", *astuple(tol("strict", a0, b))[1:4], (a, b))
    fallback = tolerance_for("strict", (0, 3), n, "0" * 64)  # another model: the class-wide bound
    assert fallback.layers is None and fallback.rel_l2 == rep["proposed"]["strict"]["rel_l2"]
    assert fallback.rel_l2 >= max(tol("strict", a, n).rel_l2 for a in range(n))
    assert tolerance_class("fp32", "bf16", layers=(0, 3), n_layers=n, model_digest=digest) == tol(
        "loose", 0, 3
    )
    assert tolerance_class("fp32") == tolerance_for("strict")
    with pytest.raises(ValueError):
        tol("strict", 3, 3)


def test_mean_bound_fails_units_that_sit_near_the_row_threshold():
    assert TOL.mean_bound(1) == TOL.rel_l2 and math.isclose(
        TOL.mean_bound(10**9), TOL.mean_rel_l2, rel_tol=1e-6
    )
    zeros = torch.zeros(8, dtype=torch.float64)
    near = RowComparison(torch.full((8,), 0.9 * TOL.rel_l2, dtype=torch.float64), zeros)
    assert near.failing_rows(TOL) == [] and near.mean_fails(TOL) == 0
    honest = torch.full((8,), 0.0005, dtype=torch.float64)
    honest[3] = 0.009  # one outlier row, as honest fp16 has: passes
    assert RowComparison(honest, zeros).mean_fails(TOL) is None
    mixed = torch.cat([torch.full((6,), 0.0005), torch.full((6,), 0.008)]).double()
    assert RowComparison(mixed, torch.zeros(12)).mean_fails(TOL) == 6  # where the bias starts


def _unit(rel: list[float], start: int, tol: Tolerance = TOL, seed: int = 0) -> AuditResult:
    """judge() on rows whose committed values are off the recomputed ones by exactly `rel` each."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(len(rel), 64, generator=g) * 3
    u = torch.randn(len(rel), 64, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    committed = ref + torch.tensor(rel)[:, None] * ref.norm(dim=-1, keepdim=True) * u
    out = [WireTensor.from_torch(committed[i : i + 1]) for i in range(len(rel))]
    positions = [range(start + i, start + i + 1) for i in range(len(rel))]
    return judge(out, positions, ref, False, tol)


def test_judge_reports_the_mean_failure_from_the_first_biased_row():
    ok = _unit([0.0005] * 10, start=20)
    assert ok.passed and ok.first_bad_position is None and ok.first_position == 20
    assert math.isclose(ok.mean_rel_l2, 0.0005, rel_tol=1e-3) and ok.excess < 0 and ok.excess_tail == 0
    bad = _unit([0.0005] * 4 + [0.008] * 6, start=20)
    assert not bad.passed and bad.worst_rel_l2 < TOL.rel_l2  # no row out of bounds
    assert bad.first_bad_position == 24 and "mean rel-L2" in bad.reason
    assert bad.excess_tail == pytest.approx(6 * (0.008 / TOL.mean_rel_l2 - 1), rel=1e-3)
    row = _unit([0.0005, 0.02, 0.0005], start=5)
    assert not row.passed and row.first_bad_position == 6 and "row rel-L2" in row.reason


def test_sequential_test_passes_honest_nodes_and_flags_a_steady_bias():
    stats = NodeErrorStats({"strict": 20.0, "loose": 20.0})
    g = torch.Generator().manual_seed(1)
    for i in range(400):  # honest: rows around tau_mean / 3, one in 25 an outlier at 0.9 tau
        rel = 0.9 * TOL.rel_l2 if i % 25 == 7 else float(torch.rand(1, generator=g)) * TOL.mean_rel_l2 / 1.5
        assert stats.update("honest", _unit([rel], i, seed=i)).passed
    assert stats.statistic("honest") < 20
    units = [_unit([0.5 * TOL.rel_l2], i, seed=i) for i in range(20)]  # rows at half the row bound
    assert all(u.passed for u in units)  # each audit alone passes
    verdicts = [stats.update("biased", u) for u in units]
    first = next(i for i, v in enumerate(verdicts) if not v.passed)
    assert first == 13  # each row adds 0.5 * tau / tau_mean - 1 = 1.5: 14 rows pass h = 20
    assert "sequential test" in verdicts[first].reason and stats.statistic("honest") < 20
    stats.forget("biased")
    assert stats.statistic("biased") == 0


@pytest.fixture
def one_thread():
    """Many tiny ops: two OpenMP threads on a shared 2-core machine are ~30x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_calibration_per_range_has_no_false_fraud_on_held_out_prompts_and_starts(tiny_gguf, one_thread):
    gguf = GGUFModel(tiny_gguf)
    prompts = ["Why is the sky blue?", "Count to five."]
    rep = calibrate(tiny_gguf, ["cpu"], ["fp32", "bf16"], 2, prompts, log=lambda s: None, starts=[0])
    assert rep["ranges"]["sampled_starts"] == [0, 2]  # the split's starts are always sampled
    for klass in ("strict", "loose"):
        assert rep["proposed"][klass]["cusum_h"] >= 2.0
    assert rep["proposed"]["strict"]["separates_all_required"]
    tok = GGUFTokenizer(gguf)
    held = ["A held-out prompt: 1, 2, 3.", "Something else."]
    ids = [torch.tensor(tok.encode_prompt(p, chat=True)) for p in held]
    cheats = ["steer=0.07", "scale=1.05"]
    fp32 = [Config("cpu_fp32_decode", "cpu", "fp32", decode=True)]
    bf16 = [Config("cpu_bf16_prefill", "cpu", "bf16"), Config("cpu_bf16_decode", "cpu", "bf16", decode=True)]
    sweep = run_sweep(gguf, ids, fp32, cheats, [0, 1, 3], log=lambda s: None)
    sweep_bf16 = run_sweep(gguf, ids, bf16, cheats, [1], log=lambda s: None)  # no strict pair: loose only
    for sw in (sweep, sweep_bf16):
        out = validate(sw, rep, gguf.digest)
        assert out["strict"]["false_fraud_ranges"] == [] and out["loose"]["false_fraud_ranges"] == []
        assert all(out["strict"]["cheats"][c]["unit"] for c in cheats)


# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm_path):
    """SmolLM2 and the reference pipeline's input of every layer for PROMPTS[0] (whose row 29
    reaches rel-L2 7.6e-3 in fp16 over layers 0-3)."""
    gguf = GGUFModel(smollm_path)
    ids = torch.tensor(GGUFTokenizer(gguf).encode_prompt(PROMPTS[0], chat=True))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield gguf, [ids, *chain(Stage(gguf, StageSpec(0, gguf.args.n_layers)), 0, ids, False)[:-1]]
    torch.set_num_threads(n)


def _out(gguf: GGUFModel, inputs: list[torch.Tensor], a: int, b: int, dtype: str) -> torch.Tensor:
    """What a stage [a, b) in `dtype` commits for the reference pipeline's input of layer a."""
    st = Stage(gguf, StageSpec(a, b, dtype=dtype))
    return st(inputs[a], st.new_cache(len(inputs[0])), all_logits=True).float()


def _judge_rows(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> AuditResult:
    return judge([WireTensor.from_torch(out)], [range(len(out))], ref, False, tol)


@pytest.mark.model
@pytest.mark.parametrize("a,b", [(0, 3), (0, 5), (5, 11), (12, 14)])
def test_honest_fp16_and_bf16_pass_on_splits_that_a_global_threshold_failed(smol, a, b, monkeypatch):
    gguf, inputs = smol
    # fp16 rows as decode steps compute them (one matrix-vector product per row): the larger
    # error; a prefill's fp32-GEMM path (model._fp16_wide) stays closer to fp32
    monkeypatch.setattr(model, "WIDE_ROWS", 1 << 30)
    n, digest = gguf.args.n_layers, gguf.digest
    ref, fp16 = _out(gguf, inputs, a, b, "fp32"), _out(gguf, inputs, a, b, "fp16")
    res = _judge_rows(
        fp16, ref, tolerance_class("fp32", "fp16", layers=(a, b), n_layers=n, model_digest=digest)
    )
    assert res.passed, res.reason
    if (a, b) == (0, 3):  # the row that got an honest node banned under the old 6.9e-3
        assert res.worst_rel_l2 > 6.9e-3
    bf16 = _out(gguf, inputs, a, b, "bf16")
    res = _judge_rows(
        bf16, ref, tolerance_class("fp32", "bf16", layers=(a, b), n_layers=n, model_digest=digest)
    )
    assert res.passed and res.tolerance == "loose", res.reason


@pytest.mark.model
def test_packed_fp32_is_within_float_rounding_of_dense_fp32(smol, monkeypatch):
    """The strict kernel (packed fp32) multiplies the exact fp32 weights: its rows, decode path
    included, differ from dense fp32 by summation order alone and pass the strict class."""
    gguf, inputs = smol
    monkeypatch.setattr(model, "WIDE_ROWS", 1 << 30)  # every row through the kernel, as decode steps
    n, digest = gguf.args.n_layers, gguf.digest
    for a, b in [(0, 3), (25, n)]:  # the second with the Q8_0 head
        ref = _out(gguf, inputs, a, b, "fp32")
        st = Stage(gguf, StageSpec(a, b, dtype="fp32", packed=True))
        got = st(inputs[a], st.new_cache(len(inputs[0])), all_logits=True).float()
        assert float((got - ref).norm() / ref.norm()) < 1e-5
        res = _judge_rows(got, ref, tolerance_for("strict", (a, b), n, digest))
        assert res.passed and res.tolerance == "strict", res.reason


@pytest.mark.model
@pytest.mark.parametrize("cheat", ["steer=0.07", "scale=1.05"])
def test_steer_and_scale_are_caught_in_every_class(smol, cheat):
    gguf, inputs = smol
    n, digest = gguf.args.n_layers, gguf.digest
    m = Misbehaviour.parse(cheat, enabled=True)
    for a, b in [(0, 3), (10, 20)]:
        ref = _out(gguf, inputs, a, b, "fp32")
        bad = m.corrupt_output(ref, step=1, gguf=gguf)  # exact fp32 work plus the cheat: the least visible
        strict = tolerance_for("strict", (a, b), n, digest)
        res = _judge_rows(bad, ref, strict)
        assert not res.passed and res.first_bad_position == 0 and "row rel-L2" in res.reason
        loose = tolerance_for("loose", (a, b), n, digest)  # a node declaring bf16: the prompt's unit fails
        res = _judge_rows(bad, ref, loose)
        assert not res.passed and res.first_bad_position == 0, res
        stats = NodeErrorStats()  # one-row units (decode steps): the node fails within a few rows
        verdicts = [
            stats.update("cheat", _judge_rows(bad[i : i + 1], ref[i : i + 1], loose)) for i in range(len(ref))
        ]
        assert not all(v.passed for v in verdicts)


def test_steer_and_scale_cheats(tiny_gguf):
    gguf = GGUFModel(tiny_gguf)
    steer, scale = (
        Misbehaviour.parse("steer=0.07", enabled=True),
        Misbehaviour.parse("scale=1.05", enabled=True),
    )
    assert (steer.amount, scale.amount) == (0.07, 1.05)
    for bad in ["steer", "steer=x", "scale=", "scale=1.05=2"]:
        with pytest.raises(ConsortiumError, match="needs"):
            Misbehaviour.parse(bad, enabled=True)
    x = torch.randn(5, gguf.args.dim) * 4
    pushed = steer.corrupt_output(x, 0, gguf) - x
    assert torch.allclose(pushed.norm(dim=-1) / x.norm(dim=-1), torch.full((5,), 0.07), rtol=1e-5)
    u = steer_direction(gguf, gguf.args.dim)  # toward one token's embedding row, the same for every row
    assert torch.allclose(pushed / pushed.norm(dim=-1, keepdim=True), u.expand_as(pushed), atol=1e-6)
    logits = torch.randn(2, gguf.args.vocab_size)
    raised = steer.corrupt_output(logits, 0, gguf) - logits  # on logits: that token's logit only
    assert (raised[:, STEER_TOKEN % gguf.args.vocab_size] > 0).all() and (raised != 0).sum() == 2
    assert torch.allclose(scale.corrupt_output(x, 0), x * 1.05)
    with pytest.raises(ValueError, match="needs the model"):
        steer.corrupt_output(x, 0)
