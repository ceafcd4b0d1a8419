"""Packed int4 forms kept on disk (model/pack_cache.py): a second load maps them and computes
the same bits; a torn entry is repacked, a rewritten file gets a fresh folder (the old one
goes), and --no-pack-cache writes nothing."""

from __future__ import annotations

import os

import pytest
import torch

from consortium.core.config import EngineConfig
from consortium.model import model as M
from consortium.model import pack_cache
from consortium.model import synth as S
from consortium.model.model import Stage, StageSpec
from consortium.model.pack_cache import PackCache, default_root, open_model
from consortium.model.quants import int4_mm

pytestmark = pytest.mark.skipif(int4_mm is None, reason="this PyTorch has no CPU int4 kernel")
SPEC = StageSpec(0, 2, dtype="bf16", packed=True)
PACKED = EngineConfig(dtype="bf16", packed=True)


@pytest.fixture(autouse=True)
def _small_models_cached(monkeypatch):
    monkeypatch.setattr(pack_cache, "MIN_MODEL_BYTES", 0)


@pytest.fixture
def gguf_path(tmp_path):
    return S.synth("tiny", "q4_k_m", tmp_path / "t.gguf", layers=2)


def _run(stage: Stage) -> torch.Tensor:
    return stage(torch.tensor([1, 2, 3, 4, 5, 6, 7]), stage.new_cache(16))


def _packs(monkeypatch) -> list[str]:
    """The matrices packed from GGUF blocks (not mapped from the cache) from now on."""
    packed: list[str] = []
    real = M.pack_into

    def counted(raw, kind, *a, **kw):
        packed.append(kind)
        return real(raw, kind, *a, **kw)

    monkeypatch.setattr(M, "pack_into", counted)
    return packed


def _load(path, engine: EngineConfig = PACKED) -> Stage:
    g = open_model(path, engine)
    stage = Stage(g, SPEC)
    if g.pack_cache is not None:
        g.pack_cache.flush()  # entries are written in the background
    return stage


def test_a_second_load_maps_the_cache_and_computes_the_same_bits(gguf_path, monkeypatch):
    first = _load(gguf_path)
    assert any(default_root().glob("*/blk.0.attn_q.weight+3.int4.pt"))
    packs = _packs(monkeypatch)
    second = _load(gguf_path)
    assert packs == []  # nothing repacked
    for a, b in zip(first.layers[0].ffn.w13.packed, second.layers[0].ffn.w13.packed, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.sz, b.sz) and a.layout == b.layout
    assert torch.equal(_run(first), _run(second))


def test_a_torn_entry_is_repacked_not_trusted(gguf_path, monkeypatch, caplog):
    ref = _run(_load(gguf_path))
    [entry] = default_root().glob("*/blk.1.ffn_down.weight+1.int4.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    packs = _packs(monkeypatch)
    assert torch.equal(_run(_load(gguf_path)), ref)
    assert len(packs) == 1 and "unreadable" in caplog.text  # that matrix only, and rewritten
    assert torch.load(entry, weights_only=True)["names"] == ["blk.1.ffn_down.weight"]


def test_a_rewritten_file_gets_a_fresh_folder_and_the_old_one_goes(gguf_path):
    _load(gguf_path)
    cache = PackCache(default_root())
    old = cache.folder(gguf_path)
    st = gguf_path.stat()
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.folder(gguf_path) != old
    _load(gguf_path)
    assert not old.exists() and cache.folder(gguf_path).is_dir()


def test_no_pack_cache_writes_nothing(gguf_path):
    g = open_model(gguf_path, EngineConfig(dtype="bf16", packed=True, pack_cache=False))
    assert g.pack_cache is None
    Stage(g, SPEC)
    assert not default_root().exists()


def test_fp32_forms_are_cached_and_mapped_with_the_same_bits(gguf_path, monkeypatch):
    """The strict kernel's forms (packed fp32) are cached too: a second load packs nothing."""
    from consortium.model import model as M

    spec = StageSpec(0, 2, dtype="fp32", packed=True)
    g = open_model(gguf_path, EngineConfig())
    first = Stage(g, spec)
    g.pack_cache.flush()
    assert any(default_root().glob("*/blk.0.attn_q.weight+3.fp32.pt"))
    packed: list[str] = []
    real = M.pack_rows_into
    monkeypatch.setattr(
        M, "pack_rows_into", lambda raw, kind, *a, **kw: packed.append(kind) or real(raw, kind, *a, **kw)
    )
    second = Stage(open_model(gguf_path, EngineConfig()), spec)
    assert packed == []
    assert torch.equal(_run(first), _run(second))
