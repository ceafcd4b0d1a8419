"""GGUF reading: metadata, every supported quant type, clear errors for what we can't run."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from helpers.tiny_model import TinySpec, write_tiny_gguf

from consortium.errors import ModelFileError, UnsupportedModelError
from consortium.model import files
from consortium.model.gguf_file import SUPPORTED_QUANTS, GGUFModel


def test_metadata(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    a = g.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.ffn_dim) == (4, 256, 4, 2, 512)
    assert (a.head_dim, a.n_rep, a.kv_dim, a.context_length) == (64, 2, 128, 128)
    assert a.vocab_size == 269 and not a.tied_head
    assert a.rope_scaling.kind == "none"


def test_every_quant_type_is_present_and_dequantizes(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    seen = set(g.quant_summary())
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"} <= seen
    for t in g.tensors.values():
        w = g.dequantize(t.name)
        assert w.dtype == np.float32 and np.isfinite(w).all()
        assert list(w.shape) == [int(s) for s in reversed(t.shape.tolist())]


def test_row_dequantization_matches_full(tiny_gguf):
    g = GGUFModel(tiny_gguf)
    full = g.dequantize("token_embd.weight")
    rows = np.array([3, 0, 268, 3])
    np.testing.assert_array_equal(g.dequantize("token_embd.weight", rows=rows), full[rows])


def test_q4_1_reference_values():
    """Q4_1 dequantizes as d * q + m per 32-block (independent of gguf-py's code path)."""
    d, m = np.float16(0.5), np.float16(-1.25)
    q = np.arange(32) % 16
    head = [np.array([d]).view(np.uint8), np.array([m]).view(np.uint8)]
    block = np.concatenate([*head, (q[:16] | (q[16:] << 4)).astype(np.uint8)])
    out = dequantize(block.reshape(1, 20), Q.Q4_1)
    np.testing.assert_array_equal(out.reshape(-1), np.float32(d) * q + np.float32(m))


def test_layers_digest_binds_weights(tiny_gguf, tmp_path):
    g = GGUFModel(tiny_gguf)
    assert g.layers_digest(0, 2) == g.layers_digest(0, 2)
    assert g.layers_digest(0, 2) != g.layers_digest(2, 4)
    other = GGUFModel(write_tiny_gguf(tmp_path / "other.gguf", TinySpec(seed=1)))
    assert other.layers_digest(0, 2) != g.layers_digest(0, 2)
    assert other.digest != g.digest


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        GGUFModel(tmp_path / "nope.gguf")


def test_corrupt_file(tmp_path, tiny_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        GGUFModel(bad)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(ModelFileError):
        GGUFModel(truncated)


def test_unsupported_architecture(tmp_path):
    p = write_tiny_gguf(tmp_path / "gpt.gguf", TinySpec(arch="falcon"))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'falcon'"):
        GGUFModel(p)


def test_unsupported_quant_type(tmp_path):
    assert Q.TQ2_0 not in SUPPORTED_QUANTS
    p = write_tiny_gguf(tmp_path / "tq.gguf", TinySpec(layer_quants=[Q.TQ2_0]))
    with pytest.raises(UnsupportedModelError, match="unsupported quantization type TQ2_0"):
        GGUFModel(p)


def test_rope_scaling_metadata(tmp_path):
    kv = {"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0}
    kv |= {"llama.rope.scaling.low_freq_factor": 1.0, "llama.rope.scaling.high_freq_factor": 4.0}
    kv["llama.rope.scaling.original_context_length"] = 64
    p = write_tiny_gguf(tmp_path / "l3.gguf", TinySpec(extra_kv=kv))
    rs = GGUFModel(p).args.rope_scaling
    assert (rs.kind, rs.factor, rs.original_context) == ("llama3", 8.0, 64)
    kv = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    p = write_tiny_gguf(tmp_path / "lin.gguf", TinySpec(extra_kv=kv))
    assert GGUFModel(p).args.rope_scaling.kind == "linear"
    p = write_tiny_gguf(tmp_path / "yarn.gguf", TinySpec(extra_kv={"llama.rope.scaling.type": "yarn"}))
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn'"):
        GGUFModel(p)


def test_model_digest_is_remembered_until_the_file_changes(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("CONSORTIUM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_gguf, path)
    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: hashed.append(p) or real(p))
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert GGUFModel(path).digest == want and len(hashed) == 1
    assert GGUFModel(path).digest == want and len(hashed) == 1  # a new process start: remembered
    with open(path, "ab") as f:  # the file changed: hashed again
        f.write(b"\0")
    assert files.cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() and len(hashed) == 2
    (tmp_path / "cache" / "digests").chmod(0o500)  # an unwritable cache only costs the hashing
    try:
        path.write_bytes(path.read_bytes()[:-1])
        assert files.cached_sha256(path) == want
    finally:
        (tmp_path / "cache" / "digests").chmod(0o700)
