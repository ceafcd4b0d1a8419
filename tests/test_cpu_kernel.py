"""The strict compact CPU kernel (model/cpu_kernel.py): every GGUF format's form reproduces
llama.cpp's fp32 weights exactly, products are fp32-accurate, and a row's bits do not depend on
its batch, its place in it or the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from test_scale import _raw

from consortium.model import cpu_kernel as ck

ROWS, COLS = 72, 512  # 72: tiles of 4 outputs and a remainder per thread


def _segment(kind: str, rows: int = ROWS, cols: int = COLS) -> tuple[ck.QuantSegment, np.ndarray]:
    raw = _raw(kind, rows, cols)
    seg = ck.empty_segment(kind, rows, cols)
    ck.pack_rows_into(raw, kind, seg)
    return seg, dequantize(raw, Q[kind]).reshape(rows, cols)


@pytest.mark.parametrize("kind", sorted(ck.FORMS))
def test_form_is_exact_and_products_fp32_accurate(kind):
    seg, w = _segment(kind)
    dense = ck.kernel().dequant(seg.codes, seg.scale, seg.zero, 0, ROWS)
    torch.testing.assert_close(dense, torch.from_numpy(w), rtol=2e-7, atol=0)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(0))
    ref = x.double() @ torch.from_numpy(w).double().T
    y = seg.matmul(x)
    assert y.dtype == torch.float32 and y.shape == (5, ROWS)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6
    assert seg.nbytes == ck.segment_bytes(kind, ROWS, COLS)


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_rows_have_the_same_bits_in_any_batch_and_thread_count(kind):
    seg, _ = _segment(kind)
    x = torch.randn(11, COLS, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([seg.matmul(x[i : i + 1]) for i in range(11)])
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            for a, b in ((0, 11), (3, 4), (2, 9), (5, 11), (0, 2)):
                assert torch.equal(seg.matmul(x[a:b]), alone[a:b]), (t, a, b)
    finally:
        torch.set_num_threads(threads)


def test_bad_inputs_are_clear_errors():
    """Refused in Python before the kernel (whose C++ checks are a last line, not the interface)."""
    seg, _ = _segment("Q4_1")
    with pytest.raises(ValueError, match="float32"):
        seg.matmul(torch.zeros(1, COLS, dtype=torch.float16))
    with pytest.raises(ValueError, match=f"float32 \\[..., {COLS}\\]"):
        seg.matmul(torch.zeros(1, COLS + 32))
    with pytest.raises(ValueError, match="inconsistent packed segment"):
        ck.QuantSegment(seg.codes, seg.scale[:, :-1].contiguous(), seg.zero)
    with pytest.raises(ValueError, match="inconsistent packed segment"):
        ck.QuantSegment(seg.codes[:-1], seg.scale[:-1], seg.zero[:-1])  # not whole tiles of 4
    with pytest.raises(ValueError, match="float32"):
        ck.rms_norm(torch.zeros(2, 576, dtype=torch.float16), torch.ones(576), 1e-5)
    assert seg.matmul(torch.zeros(0, COLS)).shape == (0, ROWS)


def test_fused_rms_norm_matches_the_composite_and_is_row_independent():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(7, 576, generator=g) * 30, torch.rand(576, generator=g)
    y = ck.kernel().rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (576,), w, 1e-5), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(ck.kernel().rms_norm(x[i : i + 1], w, 1e-5), y[i : i + 1]) for i in range(7))


def test_default_engine_is_the_strict_kernel_where_it_can_be_built(monkeypatch):
    from consortium.core.config import EngineConfig

    e = EngineConfig()
    assert (e.dtype, e.packed) == ("fp32", True)
    assert (EngineConfig(device="cuda").dtype, EngineConfig(device="cuda").packed) == ("fp16", False)
    assert not EngineConfig(dtype="fp16").packed and EngineConfig(dtype="bf16", packed=True).packed
    monkeypatch.setattr(ck, "buildable", lambda: False)  # no C++ compiler: the previous default
    assert (EngineConfig().dtype, EngineConfig().packed) == ("fp16", False)
    assert not EngineConfig(dtype="fp32").packed


def test_fused_decode_attention_matches_pytorch_and_batches_exactly(tmp_path):
    """Packed fp32 stages run a decode row's RoPE, cache write and attention in one kernel call:
    within fp32 rounding of PyTorch's ops over many positions, and a batched session's rows
    have the bits of its run alone."""
    from consortium.model.gguf_file import GGUFModel
    from consortium.model.model import Stage, StageSpec
    from consortium.model.synth import synth

    g = GGUFModel(synth("tiny", "q4_k_m", tmp_path / "t.gguf"))  # every matrix quantized: all packed
    fused = Stage(g, StageSpec(0, g.args.n_layers, dtype="fp32", packed=True))
    plain = Stage(g, StageSpec(0, g.args.n_layers, dtype="fp32", packed=True))
    for layer in plain.layers:
        layer.attn.fused = False
        layer.find_decode_weights()
    assert all(layer.attn.fused for layer in fused.layers) and fused.batch_invariant
    assert all(layer.decode is None for layer in plain.layers)
    prompt = torch.tensor([1, 5, 9, 200, 17, 3, 44])
    caches = {s: s.new_cache(64) for s in (fused, plain)}
    logits = {s: s(prompt, caches[s]) for s in (fused, plain)}
    tok = int(logits[fused][-1].argmax())
    for _ in range(40):  # positions 7..46: scores over growing caches, GQA heads
        out = {s: s(torch.tensor([tok]), caches[s]) for s in (fused, plain)}
        rel = float((out[fused] - out[plain]).norm() / out[plain].norm())
        assert rel < 1e-5, rel
        tok = int(out[fused][-1].argmax())
    # three sessions decoding together: each row as alone
    prompts = [torch.tensor([1, 7 + i, 30]) for i in range(3)]
    alone, together = [fused.new_cache(16) for _ in prompts], [fused.new_cache(16) for _ in prompts]
    for p, c in zip(prompts, alone, strict=True):
        fused(p, c)
    fused.forward_batch(prompts, together)
    for step in range(3):
        xs = [torch.tensor([10 + step + i]) for i in range(3)]
        want = [fused(x, c) for x, c in zip(xs, alone, strict=True)]
        got = fused.forward_batch(xs, together)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_a_decode_block_in_one_call_has_the_bits_of_its_ops_one_by_one(tmp_path):
    """Packed fp32 blocks run decode rows in one kernel call each (decode_layers): outputs and
    KV caches bit-identical to the blocks' ops called one by one, alone and batched."""
    from consortium.model.gguf_file import GGUFModel
    from consortium.model.model import Stage, StageSpec
    from consortium.model.synth import synth

    g = GGUFModel(synth("tiny", "q4_k_m", tmp_path / "t.gguf"))
    whole = Stage(g, StageSpec(0, g.args.n_layers, dtype="fp32", packed=True))
    ops = Stage(g, StageSpec(0, g.args.n_layers, dtype="fp32", packed=True))
    for layer in ops.layers:
        layer.decode = None
    assert all(layer.decode is not None for layer in whole.layers)
    prompts = [[1, 5, 9, 200], [3], [44, 45, 46]]
    caches = {s: [s.new_cache(32) for _ in prompts] for s in (whole, ops)}
    out = {s: s.forward_batch([torch.tensor(p) for p in prompts], caches[s]) for s in (whole, ops)}
    for step in range(8):
        ids = [torch.tensor([int(y[-1].argmax())]) for y in out[whole]]
        for s in (whole, ops):  # a single stream's row, then the other two batched
            out[s] = [s(ids[0], caches[s][0]), *s.forward_batch(ids[1:], caches[s][1:])]
        assert all(torch.equal(a, b) for a, b in zip(out[whole], out[ops], strict=True)), step
    for a, b in zip(caches[whole], caches[ops], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v, strict=True))
    blocks, c = [layer.decode for layer in whole.layers], caches[whole][0]
    with pytest.raises(ValueError, match="decode_layers"):  # refused before the kernel sees them
        ck.decode_layers(torch.zeros(2, g.args.dim), blocks, torch.zeros(1, 4, 2), [(c.k, c.v)], [0])
    with pytest.raises(ValueError, match="decode_layers"):  # a position past the cache
        ck.decode_layers(torch.zeros(1, g.args.dim), blocks, torch.zeros(1, 4, 2), [(c.k, c.v)], [32])


def test_fused_swiglu_matches_pytorch():
    x = torch.randn(3, 2 * 1536, generator=torch.Generator().manual_seed(4)) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ck.swiglu(x), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2F"):
        ck.swiglu(torch.zeros(2, 5))
