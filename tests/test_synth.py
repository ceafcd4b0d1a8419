"""`consortium model synth`: the layout, quant types, weight statistics and tokenizer of real files."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from consortium.cli.main import cli
from consortium.model import synth as S
from consortium.model.gguf_file import GGUFModel
from consortium.model.tokenizer import ChatMessage, GGUFTokenizer

TEXTS = ["Explain in one paragraph why the sky appears blue.", "héllo wörld 12345 — 日本語\n\n  tabs\t!", " "]


def synthesised(tmp_path_factory, shape: str, quant: str, layers: int | None = None):
    """One file per (shape, quant, layers) for the whole test session."""
    path = tmp_path_factory.getbasetemp() / f"synth-{shape}-{quant}-{layers}.gguf"
    return path if path.exists() else S.synth(shape, quant, path, layers=layers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> GGUFModel:
    return GGUFModel(synthesised(tmp_path_factory, "tiny", "q4_k_m"))


@pytest.fixture(scope="module")
def l1b(tmp_path_factory) -> GGUFModel:
    return GGUFModel(synthesised(tmp_path_factory, "llama3.2-1b", "q4_k_m", layers=2))


def test_q4_k_m_types_follow_llama_cpp(tiny, l1b):
    """Q6_K for the head (a tied embedding is the head) and for attn_v/ffn_down in llama.cpp's
    use_more_bits layers, Q4_K elsewhere, F32 vectors."""
    for g in (tiny, l1b):
        n = g.args.n_layers
        for name, t in g.tensors.items():
            kind = t.tensor_type
            if len(t.shape) == 1:
                assert kind == Q.F32, name
            elif name == "output.weight" or (name == "token_embd.weight" and g.args.tied_head):
                assert kind == Q.Q6_K, name
            elif name.endswith(("attn_v.weight", "ffn_down.weight")):
                assert kind == (Q.Q6_K if S.use_more_bits(int(name.split(".")[1]), n) else Q.Q4_K), name
            else:
                assert kind == Q.Q4_K, name
    assert [S.use_more_bits(i, 32) for i in range(32)].count(True) == 16  # 33 Q6_K in a real 8B file
    assert l1b.args.tied_head and l1b.has("rope_freqs.weight") and not tiny.args.tied_head


def test_shapes_and_metadata_of_llama3_2_1b(l1b):
    a = l1b.args
    assert (a.dim, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == (2048, 32, 8, 8192, 128256)
    assert (a.n_layers, a.head_dim, a.rope_base, a.context_length) == (2, 64, 500000.0, 131072)
    assert set(l1b.tensors) == set(l1b.expected_shapes())  # opening checked every shape already
    factors = l1b.dequantize("rope_freqs.weight")
    assert factors[0] == 1.0 and factors[-1] == 32.0 and np.all(np.diff(factors) >= 0)


def test_weight_statistics_are_trained_like(l1b):
    """std ~0.02, centred, a few outlier input channels well above the median column."""
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.ffn_up.weight"):
        w = l1b.dequantize(name, rows=slice(0, 512))
        assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 2e-4, name
        col = w.std(0)
        assert col.max() > 3 * np.median(col), name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0])
def test_blocks_dequantize_to_step_times_centred_code(qtype):
    """Written blocks mean what they should: value = step * (code - centre), with the step rounded
    as the format stores it (fp16 scale, 6/8-bit sub-block scales)."""
    rng = np.random.default_rng(0)
    bits, centre = S.CENTERS[qtype]
    table, _ = S.code_table(bits, centre)
    codes = table[rng.integers(0, 256, (4, 512), dtype=np.uint8)]
    step = rng.uniform(0.001, 0.004, (4, 16)).astype(np.float32)
    w = dequantize(S.encode(qtype, codes, step), qtype).reshape(4, 512)
    want = np.repeat(step, 32, axis=1) * (codes.astype(np.float32) - centre)
    tol = 0.02 if qtype in (Q.Q4_K, Q.Q6_K) else 1e-3  # sub-block scales are 6 / 8-bit integers
    assert np.abs(w - want).max() <= tol * np.abs(want).max()


def test_tokenizer_is_full_size_and_round_trips(tiny, l1b):
    for g in (tiny, l1b):
        tok = GGUFTokenizer(g)
        assert tok.vocab_size == g.args.vocab_size
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids[0] == tok.bos_id and tok.decode(ids) == text
    tok = GGUFTokenizer(l1b)
    assert tok.tokens[128000] == "<|begin_of_text|>" and tok.tokens[128009] == "<|eot_id|>"
    assert len(tok.encode(TEXTS[0])) <= 14  # common words are whole tokens (11 with Llama-3's own)
    assert tok.stop_ids >= {128009, 128001}


def test_chat_template_renders(l1b):
    tok = GGUFTokenizer(l1b)
    text = tok.render_chat([ChatMessage("user", "Hi there")])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode_prompt("Hi there", chat=True)
    assert ids[:2] == [128000, 128006] and ids.count(128000) == 1 and 128009 in ids


def test_smollm_shape_falls_back_like_llama_cpp(tmp_path):
    """576-wide rows are not 256-multiples: Q4_K -> Q5_0 and Q6_K -> Q8_0; ChatML specials first."""
    g = GGUFModel(S.synth("smollm2-135m", "q4_k_m", tmp_path / "s.gguf", layers=1))
    assert g.tensor("blk.0.attn_q.weight").tensor_type == Q.Q5_0
    assert g.tensor("token_embd.weight").tensor_type == Q.Q8_0
    assert g.tensor("blk.0.ffn_down.weight").tensor_type == Q.Q6_K  # 1536 columns: K-quant stays
    tok = GGUFTokenizer(g)
    assert tok.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and tok.vocab_size == 49152
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


def test_same_seed_same_file_and_layers_cut(tmp_path, tiny):
    a = S.synth("tiny", "q4_k_m", tmp_path / "a.gguf")
    assert a.read_bytes() == tiny.path.read_bytes()
    b = GGUFModel(S.synth("tiny", "q4_k_m", tmp_path / "b.gguf", seed=1))
    assert b.layers_digest(0, 1) != tiny.layers_digest(0, 1)


def test_cli_synth_and_its_errors(tmp_path):
    out = tmp_path / "m.gguf"
    args = ["model", "synth", "--shape", "tiny", "--quant", "q8_0", "--out", str(out), "--layers", "2"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    g = GGUFModel(out)
    assert g.args.n_layers == 2 and set(g.quant_summary()) == {"Q8_0", "F32"}
    res = CliRunner().invoke(cli, [*args[:-1], "9"])
    assert res.exit_code == 1 and "--layers must be in 1..4 for tiny, got 9" in res.output
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind
