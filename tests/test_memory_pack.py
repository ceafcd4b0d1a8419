"""Packing fused matrices straight into one segment gives the bits the per-matrix pack and
concatenation gave, and file pages are dropped only where a chunk owns them whole."""

from __future__ import annotations

import mmap

import torch

from consortium.model import quants
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import _packed


def _concatenated(g: GGUFModel, names: list[str]) -> list[quants.Int4Segment]:
    """The former way: each matrix packed alone, runs of one layout concatenated."""
    segments: list[quants.Int4Segment] = []
    for name in names:
        kind = g.tensor(name).tensor_type.name
        seg = quants.Int4Segment(*quants.pack(g.raw(name), kind), quants.LAYOUTS[kind])
        if segments and segments[-1].layout == seg.layout:
            last = segments.pop()
            seg = quants.Int4Segment(
                torch.cat([last.weight, seg.weight]), torch.cat([last.sz, seg.sz], 1), seg.layout
            )
        segments.append(seg)
    return segments


def test_fused_segments_are_bit_identical(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    groups = [
        [f"blk.{i}.{n}.weight" for n in ns]
        for i in range(g.args.n_layers)
        for ns in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("ffn_down",))
    ]
    packable = [ns for ns in groups if all(g.tensor(n).tensor_type.name in quants.PACKABLE for n in ns)]
    assert any(len(ns) > 1 for ns in packable)
    for names in packable:
        ours, ref = _packed(g, names).packed, _concatenated(g, names)
        assert [s.layout for s in ours] == [s.layout for s in ref], names
        for a, b in zip(ours, ref, strict=True):
            assert a.weight.is_contiguous() and a.sz.is_contiguous()
            assert torch.equal(a.weight, b.weight) and torch.equal(
                a.sz.view(torch.int16), b.sz.view(torch.int16)
            )


class _Recorder:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def madvise(self, option: int, start: int, length: int) -> None:
        assert option == mmap.MADV_DONTNEED
        self.calls.append((start, length))


def test_row_release_keeps_partial_pages(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    rec = g.reader.mapped._mmap = _Recorder()
    name = max(g.tensors, key=lambda n: g.tensors[n].n_bytes)
    t, page = g.tensor(name), mmap.PAGESIZE
    rows = int(t.shape[1])
    row_bytes = t.n_bytes // rows
    for lo, hi in ((0, rows // 2), (rows // 3, rows), (0, 1)):
        rec.calls.clear()
        g.release(name, slice(lo, hi))
        first, last = t.data_offset + lo * row_bytes, t.data_offset + hi * row_bytes
        for start, length in rec.calls:
            assert start % page == 0 and length % page == 0 and length > 0
            assert first <= start and start + length <= last
        assert sum(n for _, n in rec.calls) > last - first - 2 * page
    rec.calls.clear()
    g.release(name)
    ((start, length),) = rec.calls
    assert start <= t.data_offset < start + page and start + length == t.data_offset + t.n_bytes
