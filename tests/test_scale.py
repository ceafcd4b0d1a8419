"""Scale paths on synthesised Llama-3-shaped files: packed int4 forms of every quant type against a
dense fp32 reference, bad files refused whole, memory checked first, and a 2-stage pipeline with
every unit audited."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from test_synth import synthesised

from consortium.errors import ConsortiumError, ModelFileError, UnsupportedModelError
from consortium.model import memory, quants
from consortium.model import synth as S
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec, int4_mm

BOUND = 0.01  # rel-L2 of a packed matmul vs fp32 x @ W (bf16 x, bf16 scale/zero; measured 0.3 %)
needs_int4 = pytest.mark.skipif(int4_mm is None, reason="this PyTorch has no CPU int4 kernel")


@pytest.fixture(scope="module")
def l1b(tmp_path_factory) -> GGUFModel:
    return GGUFModel(synthesised(tmp_path_factory, "llama3.2-1b", "q4_k_m", layers=2))


def _raw(kind: str, rows: int, cols: int) -> np.ndarray:
    """Blocks of a format: quantized from floats where gguf-py can, synthesised or random K-blocks else."""
    rng = np.random.default_rng(1)
    if kind in ("Q4_K", "Q6_K"):
        bits, centre = S.CENTERS[Q[kind]]
        codes = S.code_table(bits, centre)[0][rng.integers(0, 256, (rows, cols), dtype=np.uint8)]
        return S.encode(Q[kind], codes, rng.uniform(0.002, 0.01, (rows, cols // 32)).astype(np.float32))
    if kind == "Q5_K":
        raw = rng.integers(0, 256, (rows, cols // 256, 176), dtype=np.uint8)
        raw[..., :4] = rng.uniform(1e-4, 1e-3, (rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
        return raw.reshape(rows, -1)
    return quantize((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), Q[kind])


@needs_int4
@pytest.mark.parametrize("kind", sorted(quants.PACKABLE))
def test_int4_form_is_exact_and_kernel_within_bound(kind):
    """Codes reproduce the format exactly (fp32 rounding only); the kernel's result is within BOUND."""
    rows, cols = 128, 512
    raw = _raw(kind, rows, cols)
    w = dequantize(raw, Q[kind]).reshape(rows, cols)
    parts = quants.decode(raw, kind)
    assert parts.codes.max() <= 15 and parts.codes.shape[1] == cols * (
        1 if kind in ("Q4_0", "Q4_1", "Q4_K") else 2
    )
    w2 = (parts.codes.astype(np.float32) - 8).reshape(rows, -1, 32) * parts.scale[..., None] + parts.zero[
        ..., None
    ]
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(0))
    xp = quants.expand_input(x, quants.LAYOUTS[kind])
    ref = x @ torch.from_numpy(w).T
    exact = xp @ torch.from_numpy(w2.reshape(rows, -1)).T
    assert (exact - ref).norm() / ref.norm() < 1e-6
    packed, sz = quants.pack(raw, kind)
    out = int4_mm(quants.expand_input(x.bfloat16(), quants.LAYOUTS[kind]), packed, 32, sz).float()
    assert (out - ref).norm() / ref.norm() < BOUND


@needs_int4
def test_packed_q4_k_m_stage_vs_dense_fp32(l1b):
    """A llama3.2-1b-shaped Q4_K_M model (Q4_K, Q6_K and a Q6_K tied head): packed bf16 logits are
    within 2 % of dense fp32 (dense bf16 is the yardstick), in ~0.6 of dense bf16's bytes."""
    ids = torch.tensor([128000, 791, 3363, 1139, 5592, 389, 279, 13, 4387, 25, 12, 99])
    ref = Stage(l1b, StageSpec(0, 2))
    want = ref(ids, ref.new_cache(16), all_logits=True)
    del ref
    errs = {}
    for packed in (False, True):
        st = Stage(l1b, StageSpec(0, 2, dtype="bf16", packed=packed))
        got = st(ids, st.new_cache(16), all_logits=True)
        errs[packed] = float((got - want).norm() / want.norm())
    assert errs[True] < 0.02 and errs[False] < 0.02, errs
    dense = memory.stage_bytes(l1b, StageSpec(0, 2, dtype="bf16"))
    assert memory.stage_bytes(l1b, StageSpec(0, 2, dtype="bf16", packed=True)) < 0.65 * dense


def _patch(path, name: str, dims: list[int] | None = None, kind: Q | None = None) -> None:
    """Rewrite a tensor's dims or type in the file's tensor-info section (same byte sizes)."""
    r = GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    base = r.data.ctypes.data
    _, _, _, dims_part, type_part, _ = t.field.parts
    at = {"dims": dims_part.ctypes.data - base, "type": type_part.ctypes.data - base}
    del r, t
    with open(path, "r+b") as f:
        if dims is not None:
            f.seek(at["dims"])
            f.write(np.array(dims, dtype=np.uint64).tobytes())
        if kind is not None:
            f.seek(at["type"])
            f.write(np.array([kind], dtype=np.uint32).tobytes())


@pytest.mark.parametrize(
    ("name", "dims", "kind", "message"),
    [
        (
            "blk.1.attn_q.weight",
            [256, 128],
            None,
            r"blk.1.attn_q.weight has shape \[256, 128\] but the metadata",
        ),
        ("blk.0.ffn_norm.weight", None, Q.Q8_0, "blk.0.ffn_norm.weight is Q8_0; a vector must be"),
        (
            "blk.0.attn_k.weight",
            None,
            Q.Q8_0,
            r"blk.0.attn_k.weight \(Q8_0, .*\) overlaps tensor blk.0.attn_v.weight",
        ),
        (
            "output.weight",
            None,
            Q.F32,
            "not a readable GGUF file.*cannot reshape.*truncated, or a tensor's type",
        ),
    ],
)
def test_tensor_disagreeing_with_metadata_is_refused_on_open(tmp_path, name, dims, kind, message):
    path = S.synth("tiny", "q4_k_m", tmp_path / "bad.gguf", layers=2)
    _patch(path, name, dims, kind)
    with pytest.raises(ModelFileError, match=message):
        GGUFModel(path)


def test_truncated_file_is_refused_on_open(tmp_path):
    path = S.synth("tiny", "q4_0", tmp_path / "t.gguf", layers=2)
    data = path.read_bytes()
    for cut in (100, len(data) // 3, len(data) - 1000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="not a readable GGUF|runs past the end of the file"):
            GGUFModel(bad)


class Spy(GGUFModel):
    """Records every read of tensor data."""

    def __init__(self, path):
        self.read: list[str] = []
        super().__init__(path)

    def dequantize(self, name, rows=None):
        self.read.append(name)
        return super().dequantize(name, rows)

    def raw(self, name):
        self.read.append(name)
        return super().raw(name)


def test_refusals_come_before_any_weight_is_read(tmp_path, monkeypatch):
    """A format packed mode does not cover, a range beyond the model, too little memory: one clear
    error each, and not one tensor read (nothing half-loaded)."""
    path = S.synth("tiny", "q4_k_m", tmp_path / "q3.gguf", layers=2)
    _patch(path, "blk.1.attn_k.weight", kind=Q.Q3_K)  # fewer bytes than Q4_K: the file stays readable
    g = Spy(path)
    with pytest.raises(UnsupportedModelError, match=r"blk.1.attn_k.weight is Q3_K: packed mode covers Q4_0"):
        Stage(g, StageSpec(0, 2, dtype="bf16", packed=True))
    with pytest.raises(ConsortiumError, match="invalid layer range 1-3 for a model of 2 layers"):
        Stage(g, StageSpec(1, 3))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 300 << 20)
    need = r"layers 0-2 of q3.gguf \(fp32\) need about 0.5\d GiB but only 0.29 GiB is available on cpu"
    with pytest.raises(ConsortiumError, match=need):
        Stage(g, StageSpec(0, 2))
    assert g.read == []
    monkeypatch.undo()
    Stage(g, StageSpec(0, 2))  # the unpacked engine runs Q3_K
    assert g.read


def test_memory_estimate_matches_what_a_stage_holds(l1b):
    st = Stage(l1b, StageSpec(1, 2, dtype="bf16", packed=True))
    held = sum(
        t.numel() * t.element_size()
        for m in st.modules()
        if getattr(m, "packed", None)
        for s in m.packed
        for t in (s.weight, s.sz)
    )
    held += sum(
        m.weight.numel() * m.weight.element_size()
        for m in st.modules()
        if getattr(m, "weight", None) is not None
    )
    est = memory.stage_bytes(l1b, StageSpec(1, 2, dtype="bf16", packed=True))
    assert held <= est <= held * 1.05 + (64 << 20)


def test_two_stage_pipeline_on_q4_k_m_audits_every_unit(request, l1b, tmp_path):
    """A llama3.2-1b-shaped Q4_K_M in two processes (worker 0-1, coordinator 1-2 + head), every
    unit audited: the tokens of one node, zero failed audits."""
    from helpers.cluster import start_cluster

    from consortium.coordinator.client import Client
    from consortium.core.config import ClientConfig, LayerRange, SessionRequest
    from consortium.model.generate import generate, load_single_node
    from consortium.model.sampling import SamplingParams

    req = SessionRequest(
        "Explain why the sky is blue.", 8, SamplingParams(0.7, seed=3), audit_probability=1.0
    )
    _, stage, tok = load_single_node(str(l1b.path))
    want = generate(stage, tok, tok.encode_prompt(req.prompt, chat=True), req.max_tokens, req.sampling).tokens
    del stage
    cluster = start_cluster(request, l1b.path, tmp_path / "logs", LayerRange(1, 2), [LayerRange(0, 1)])
    with Client(ClientConfig(cluster.address)) as client:
        report = client.run(req)
    assert report.tokens == want
    assert report.audits.failed == 0 and report.audits.passed == report.audits.total > 0
