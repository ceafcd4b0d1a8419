"""fp16 on a CPU: one session's many rows (prefill, audit, replay) take fp32 GEMM over the fp16
weights (model._fp16_wide), decode rows of a batch never do (they keep the bits they have alone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from consortium.model import model
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec


def test_the_wide_path_is_an_fp16_rounding_of_fp32_sums_in_bounded_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1000, 576, generator=g) * 0.02).half()
    x = torch.randn(16, 576, generator=g).half()
    exact = F.linear(x.float(), w.float())
    wide = model._fp16_wide(x, w)
    assert wide.dtype == torch.float16 and wide.shape == (16, 1000)
    assert torch.equal(wide, exact.half())  # one chunk: fp32 sums rounded once
    narrow = F.linear(x, w)
    assert (wide.float() - exact).abs().max() <= (narrow.float() - exact).abs().max() + 1e-6
    monkeypatch.setattr(model, "WIDE_CHUNK", 576 * 300)  # 4 chunks of output rows, the last short
    chunked = model._fp16_wide(x, w)
    assert (chunked.float() - exact).abs().max() <= 2 * (wide.float() - exact).abs().max() + 1e-3


def test_a_prefill_goes_wide_and_batched_decode_rows_do_not(tiny_gguf, monkeypatch):
    stage = Stage(GGUFModel(tiny_gguf), StageSpec(0, 4, dtype="fp16"))
    calls: list[int] = []
    real = model._fp16_wide

    def counted(x, w):
        calls.append(x.shape[0])
        return real(x, w)

    monkeypatch.setattr(model, "_fp16_wide", counted)
    caches = [stage.new_cache(32) for _ in range(6)]
    stage(torch.arange(1, model.WIDE_ROWS + 2), caches[0])
    assert calls and set(calls) == {model.WIDE_ROWS + 1}
    calls.clear()
    stage(torch.arange(1, model.WIDE_ROWS), caches[1])  # below the threshold
    stage.forward_batch([torch.tensor([i]) for i in range(4)], caches[2:])  # 4 decode rows
    assert calls == []
