"""The stage model: pipeline splits, KV cache, dtypes, packed weights, RoPE scaling, errors."""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers.tiny_model import TinySpec, write_tiny_gguf

from consortium.errors import CacheError, ConsortiumError
from consortium.model.gguf_file import GGUFModel, ModelArgs, RopeScaling
from consortium.model.kv_pool import CachePool, UnknownSessionError
from consortium.model.model import KVCache, Stage, StageSpec, _packed, int4_mm, resolve_device, rope_freqs

IDS = torch.tensor([5, 17, 200, 33, 260, 7, 99, 120, 64, 3, 250, 11])


@pytest.fixture(scope="module")
def gguf(tiny_gguf):
    return GGUFModel(tiny_gguf)


@pytest.fixture(scope="module")
def full(gguf):
    return Stage(gguf, StageSpec(0, 4))


def test_split_stages_equal_full_model_bitwise(gguf, full):
    """A pipeline of stages computes exactly what one stage of all layers does."""
    ref = full(IDS, full.new_cache(32), all_logits=True)
    parts = [Stage(gguf, StageSpec(a, b)) for a, b in [(0, 1), (1, 3), (3, 4)]]
    caches = [p.new_cache(32) for p in parts]
    x = IDS
    for p, c in zip(parts, caches, strict=True):
        x = p(x, c, all_logits=True)
    assert torch.equal(x, ref)
    assert parts[0].is_first and not parts[0].is_last and parts[2].is_last


def test_decode_matches_prefill(full):
    """Logits of decoding one token at a time agree with one prefill (different kernels, tiny error)."""
    ref = full(IDS, full.new_cache(32), all_logits=True)
    cache = full.new_cache(32)
    rows = [full(IDS[i : i + 1], cache) for i in range(len(IDS))]
    dec = torch.cat(rows)
    assert cache.length == len(IDS)
    assert (dec - ref).abs().max() < 1e-4 * ref.abs().max()
    assert torch.equal(dec.argmax(-1), ref.argmax(-1))


def test_chunked_prefill_continues_cache(full):
    ref = full(IDS, full.new_cache(32), all_logits=True)
    cache = full.new_cache(32)
    a = full(IDS[:5], cache, all_logits=True)
    b = full(IDS[5:], cache, all_logits=True)
    assert (torch.cat([a, b]) - ref).abs().max() < 1e-4 * ref.abs().max()  # as decode vs prefill


def test_truncate_and_replay_is_exact(full):
    cache = full.new_cache(32)
    full(IDS[:8], cache)
    first = full(IDS[8:9], cache)
    cache.truncate(8)
    again = full(IDS[8:9], cache)
    assert torch.equal(first, again)
    with pytest.raises(CacheError):
        cache.truncate(20)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_dtypes_close_to_fp32(gguf, full, dtype):
    ref = full(IDS, full.new_cache(32), all_logits=True)
    st = Stage(gguf, StageSpec(0, 4, dtype=dtype))
    out = st(IDS, st.new_cache(32), all_logits=True)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.01 if dtype == "fp16" else 0.05)


def test_packed_int4_weights_match_dense_bf16(gguf):
    if int4_mm is None:
        pytest.skip("this PyTorch has no CPU int4 kernel")
    dense = Stage(gguf, StageSpec(0, 4, dtype="bf16"))
    packed = Stage(gguf, StageSpec(0, 4, dtype="bf16", packed=True))
    n_packed = sum(m.packed is not None for m in packed.modules() if hasattr(m, "packed"))
    assert n_packed > 0  # the Q4_0/Q4_1/Q4_K matrices
    a = dense(IDS, dense.new_cache(32), all_logits=True)
    b = packed(IDS, packed.new_cache(32), all_logits=True)
    assert (a - b).norm() / a.norm() < 0.05


def test_invalid_layer_ranges(gguf):
    for a, b in [(0, 5), (2, 2), (3, 1), (-1, 2)]:
        with pytest.raises(ConsortiumError, match="invalid layer range"):
            Stage(gguf, StageSpec(a, b))


def test_bad_engine_options(gguf):
    with pytest.raises(ConsortiumError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ConsortiumError, match="packed weights need"):
        Stage(gguf, StageSpec(0, 4, dtype="fp16", packed=True))
    with pytest.raises(ConsortiumError, match="unknown dtype"):
        Stage(gguf, StageSpec(0, 4, dtype="int3"))
    if not torch.cuda.is_available():
        with pytest.raises(ConsortiumError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cache_capacity_errors(full, gguf):
    cache = full.new_cache(8)
    full(IDS[:6], cache)
    with pytest.raises(CacheError, match="exceed the session's cache capacity 8"):
        full(IDS[:3], cache)
    assert cache.length == 6  # nothing was written
    with pytest.raises(CacheError, match="outside 1..128"):
        full.new_cache(gguf.args.context_length + 1)


def test_cache_pool_budget_expiry_and_unknown_sessions(full, gguf):
    per = KVCache.nbytes_for(gguf.args, 4, 16, torch.float32)
    pool = CachePool(full, max_bytes=2 * per, idle_timeout_s=60)
    pool.create("a", 16)
    pool.create("b", 16)
    with pytest.raises(CacheError, match="MiB free"):
        pool.create("c", 16)
    assert "c" not in pool and pool.used_bytes == 2 * per
    with pytest.raises(UnknownSessionError, match="unknown session 'zzz'"):
        pool.get("zzz")
    assert sorted(pool.expire(now=time.monotonic() + 61)) == ["a", "b"] and len(pool) == 0
    pool.create("c", 16)
    assert pool.drop("c") and not pool.drop("c")


def test_rope_llama3_scaling_formula():
    """High frequencies untouched, low ones divided by the factor, smooth in between."""
    base = ModelArgs(1, 64, 1, 1, 64, 10, 512, 1e-5, 500000.0, 64, 64, True)
    scaled = ModelArgs(**{**base.__dict__, "rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 64)})
    f0, f1 = rope_freqs(base).angle()[1], rope_freqs(scaled).angle()[1]  # angle at position 1 = inv freq
    inv0 = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    wavelen = 2 * math.pi / inv0
    hi, lo = wavelen < 64 / 4, wavelen > 64 / 1
    torch.testing.assert_close(f1[hi].double(), f0[hi].double())
    torch.testing.assert_close(f1[lo].double(), inv0[lo] / 8, rtol=1e-5, atol=1e-9)
    lin = ModelArgs(**{**base.__dict__, "rope_scaling": RopeScaling("linear", 2.0)})
    torch.testing.assert_close(rope_freqs(lin)[10], rope_freqs(base)[5])


def test_rope_scaled_model_runs(tmp_path):
    kv = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    p = write_tiny_gguf(tmp_path / "l3.gguf", TinySpec(extra_kv=kv))
    g = GGUFModel(p)
    st = Stage(g, StageSpec(0, 4))
    out = st(IDS, st.new_cache(16), all_logits=True)
    assert torch.isfinite(out).all()


def test_tied_head(tmp_path):
    g = GGUFModel(write_tiny_gguf(tmp_path / "tied.gguf", TinySpec(tied=True)))
    assert g.args.tied_head
    st = Stage(g, StageSpec(2, 4))
    out = st(torch.randn(3, 256), st.new_cache(8))
    assert out.shape == (1, g.args.vocab_size)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_K", "Q6_K"])
def test_packed_linear_reproduces_each_format(gguf, qtype):
    """The int4 kernel computes the GGUF matrix itself (only bf16 rounding), for each packable format."""
    if int4_mm is None:
        pytest.skip("this PyTorch has no CPU int4 kernel")
    name = next(
        t.name for t in gguf.tensors.values() if t.tensor_type.name == qtype and t.name.startswith("blk.")
    )
    lin = _packed(gguf, [name])
    layout = {"Q8_0": "dup", "Q5_K": "dup", "Q6_K": "pair16"}.get(qtype, "plain")
    assert [s.layout for s in lin.packed] == [layout]
    w = torch.from_numpy(gguf.dequantize(name))
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
    ref = x @ w.T
    out = lin(x.to(torch.bfloat16)).float()
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_stage_reads_only_its_own_layers(tiny_gguf):
    """A stage dequantizes the tensors of its own layers and nothing else (no embedding/head)."""
    touched: list[str] = []

    class Spy(GGUFModel):
        def dequantize(self, name, rows=None):
            touched.append(name)
            return super().dequantize(name, rows)

        def raw(self, name):
            touched.append(name)
            return super().raw(name)

    Stage(Spy(tiny_gguf), StageSpec(1, 3))
    layers = {n.split(".")[1] for n in touched if n.startswith("blk.")}
    assert layers == {"1", "2"}
    assert not [n for n in touched if not n.startswith("blk.")]
