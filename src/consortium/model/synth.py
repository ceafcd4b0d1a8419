"""Random-weights GGUFs with the exact layout of real Llama-family files (`consortium model synth`).

Tensor names, shapes and quant types are those of a llama.cpp file of the same shape and
quantization (Q4_K_M: Q6_K for `output` and for attn_v/ffn_down in llama.cpp's `use_more_bits`
layers; 256-wide formats fall back as llama.cpp does when a row is not a multiple of 256).
Quantized blocks are written directly: codes drawn from a discretised normal distribution and
scales chosen so that weights have the std of a trained model (0.02), with a few outlier input
channels and rows. Everything is vectorised and written in row chunks, never the whole file in memory.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from statistics import NormalDist

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from consortium.errors import ConsortiumError
from consortium.model.quants import U8
from consortium.model.synth_vocab import make_vocab

Q = GGMLQuantizationType
STD = 0.02  # weight std of trained Llama-family matrices
CHUNK = 1 << 24  # weights generated per step


@dataclass(frozen=True)
class Shape:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    tied: bool
    family: str = "llama3"  # tokenizer family: llama3 | smollm
    rope_llama3: tuple[float, float, float, int] | None = None  # factor, low, high, original context


SHAPES = {
    "llama3-8b": Shape(32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, False),
    "llama3.2-1b": Shape(
        16, 2048, 32, 8, 8192, 128256, 131072, 500000.0, True, rope_llama3=(32.0, 1.0, 4.0, 8192)
    ),
    "smollm2-135m": Shape(30, 576, 9, 3, 1536, 49152, 8192, 100000.0, True, "smollm"),
    "tiny": Shape(4, 256, 4, 2, 768, 1024, 512, 500000.0, False),
}
QUANTS = {
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
}
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}  # llama.cpp, for rows not a multiple of 256


@dataclass(frozen=True)
class TensorPlan:
    name: str
    rows: int
    cols: int  # 0: a vector of `rows` values
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return max(self.rows, 1) * max(self.cols, 1) // block * size


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _matrix_type(quant: str, name: str, layer: int, n_layers: int, cols: int) -> Q:
    base = QUANTS[quant][0]
    head = name == "output"
    if quant == "q4_k_m" and name in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
        base = Q.Q6_K
    if head and quant in ("q4_k_m", "q4_0"):
        base = Q.Q6_K
    return FALLBACK.get(base, base) if cols % 256 and base in FALLBACK else base


def plan(shape: Shape, quant: str, n_layers: int) -> list[TensorPlan]:
    """Every tensor of the file in llama.cpp's order, with its quant type."""
    s, hd = shape, shape.dim // shape.n_heads
    embd = "output" if s.tied else "token_embd"  # a tied embedding is quantized as the head is
    out = [
        TensorPlan("token_embd.weight", s.vocab_size, s.dim, _matrix_type(quant, embd, -1, n_layers, s.dim))
    ]
    if s.rope_llama3:
        out.append(TensorPlan("rope_freqs.weight", hd // 2, 0, Q.F32))
    for i in range(n_layers):
        mats = [("attn_q", s.n_heads * hd, s.dim), ("attn_k", s.n_kv_heads * hd, s.dim)]
        mats += [("attn_v", s.n_kv_heads * hd, s.dim), ("attn_output", s.dim, s.n_heads * hd)]
        mats += [("ffn_gate", s.ffn_dim, s.dim), ("ffn_up", s.ffn_dim, s.dim), ("ffn_down", s.dim, s.ffn_dim)]
        out += [TensorPlan(f"blk.{i}.{n}.weight", s.dim, 0, Q.F32) for n in ("attn_norm", "ffn_norm")]
        out += [
            TensorPlan(f"blk.{i}.{n}.weight", r, c, _matrix_type(quant, n, i, n_layers, c))
            for n, r, c in mats
        ]
    out.append(TensorPlan("output_norm.weight", s.dim, 0, Q.F32))
    if not s.tied:
        out.append(
            TensorPlan(
                "output.weight", s.vocab_size, s.dim, _matrix_type(quant, "output", -1, n_layers, s.dim)
            )
        )
    return out


# --- quantized blocks -------------------------------------------------------------------------


@cache
def code_table(bits: int, center: float) -> tuple[np.ndarray, float]:
    """A random byte -> a `bits`-bit code, discretised-normal about `center`; and the codes' std."""
    z = np.array([NormalDist().inv_cdf((u + 0.5) / 256) for u in range(256)])
    top = (1 << bits) - 1
    codes = np.clip(np.rint(center + z * top / 2 / 2.9), 0, top)
    return codes.astype(np.uint8), float(np.sqrt(np.mean((codes - center) ** 2)))


CENTERS = {Q.Q4_0: (4, 8.0), Q.Q4_K: (4, 7.5), Q.Q5_0: (5, 16.0), Q.Q6_K: (6, 32.0), Q.Q8_0: (8, 128.0)}


def _pack_nibbles(c: np.ndarray, width: int) -> np.ndarray:
    """Inverse of quants.nibbles."""
    c = c.reshape(*c.shape[:-1], -1, 2, width)
    return (c[..., 0, :] | (c[..., 1, :] << U8[4])).reshape(*c.shape[:-3], -1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into Q4_K's 12 bytes (inverse of quants.k_scales)."""
    lo = (sc[..., :4] & U8[63]) | ((sc[..., 4:] >> U8[4]) << U8[6])
    mid = (mn[..., :4] & U8[63]) | ((mn[..., 4:] >> U8[4]) << U8[6])
    return np.concatenate([lo, mid, (sc[..., 4:] & U8[15]) | ((mn[..., 4:] & U8[15]) << U8[4])], axis=-1)


def encode(qtype: Q, codes: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Blocks of rows from codes [n, K] and the wanted value step per 32 codes [n, K/32]."""
    n = codes.shape[0]
    c, s = codes.reshape(n, -1, 32), step
    if qtype == Q.Q4_0:
        blocks = [_f16_bytes(s), _pack_nibbles(c, 16)]
    elif qtype == Q.Q8_0:
        blocks = [_f16_bytes(s), (c - np.uint8(128))]  # the int8 code's bytes
    elif qtype == Q.Q5_0:
        qh = np.packbits(c >> U8[4], axis=-1, bitorder="little")
        blocks = [_f16_bytes(s), qh, _pack_nibbles(c & U8[15], 16)]
    elif qtype == Q.Q4_K:  # w = d*sc*q - dmin*m with m = sc and dmin = 7.5 d: centred codes
        s = s.reshape(n, -1, 8)
        d = (s.max(-1) / 63).astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(s / d[..., None]), 1, 63).astype(np.uint8)
        c = c.reshape(n, -1, 256)
        blocks = [_f16_bytes(d), _f16_bytes(7.5 * d), _k_scales(sc, sc), _pack_nibbles(c, 32)]
    elif qtype == Q.Q6_K:  # w = d*sc*(q - 32), one int8 scale per 16 codes
        s = np.repeat(s, 2, axis=-1).reshape(n, -1, 16)
        d = (s.max(-1) / 127).astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(s / d[..., None]), 1, 127).astype(np.int8).view(np.uint8)
        c = c.reshape(n, -1, 256)
        hi = (c >> U8[4]).reshape(n, -1, 2, 4, 32)
        qh = hi[..., 0, :] | (hi[..., 1, :] << U8[2]) | (hi[..., 2, :] << U8[4]) | (hi[..., 3, :] << U8[6])
        blocks = [_pack_nibbles(c & U8[15], 64), qh.reshape(n, -1, 64), sc, _f16_bytes(d)]
    else:
        raise ValueError(f"cannot synthesise {qtype.name} blocks")
    return np.concatenate(blocks, axis=-1).reshape(n, -1)


def _chunks(t: TensorPlan, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bytes in row chunks, from its own seeded stream (same name, same values)."""
    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
    if not t.cols:  # norms: around 1
        yield (1 + 0.1 * rng.standard_normal(t.rows)).astype(np.float32)
        return
    groups = t.cols // 32
    col_mult = np.ones(groups, np.float32)  # outlier input channels (whole 32-groups) and rows
    col_mult[rng.choice(groups, max(1, groups // 64), replace=False)] = 4.0
    row_mult = np.ones(t.rows, np.float32)
    row_mult[rng.choice(t.rows, max(1, t.rows // 512), replace=False)] = 3.0
    norm = STD / np.sqrt(np.mean(col_mult**2) * np.mean(row_mult**2) * (1 + 0.15**2 / 3))  # overall std: STD
    step_rows = max(1, CHUNK // t.cols)
    for r in range(0, t.rows, step_rows):
        n = min(step_rows, t.rows - r)
        mult = row_mult[r : r + n, None] * col_mult * rng.uniform(0.85, 1.15, (n, groups)).astype(np.float32)
        if t.qtype in (Q.F16, Q.F32):
            w = rng.standard_normal((n, groups, 32), dtype=np.float32) * (norm * mult[..., None])
            yield w.astype(np.float16 if t.qtype == Q.F16 else np.float32).reshape(n, -1)
            continue
        bits, center = CENTERS[t.qtype]
        table, code_std = code_table(bits, center)
        codes = table[rng.integers(0, 256, (n, t.cols), dtype=np.uint8)]
        yield encode(t.qtype, codes, norm / code_std * mult)


def llama3_rope_factors(shape: Shape) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it for Llama-3.1/3.2 scaling."""
    factor, low, high, original = shape.rope_llama3
    hd = shape.dim // shape.n_heads
    wavelen = 2 * np.pi * shape.rope_base ** (np.arange(0, hd, 2) / hd)
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid)).astype(
        np.float32
    )


class _Lazy:
    """A tensor's bytes for GGUFWriter.write_tensor_data, generated while they are written."""

    def __init__(
        self, t: TensorPlan, chunks: Callable[[], Iterator[np.ndarray]], done: Callable[[int], None]
    ):
        self.nbytes, self.chunks, self.done = t.nbytes, chunks, done

    def tofile(self, f) -> None:
        for chunk in self.chunks():
            chunk.tofile(f)
            self.done(chunk.nbytes)


def synth(
    shape_name: str,
    quant: str,
    out: str | Path,
    seed: int = 0,
    layers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random-weights GGUF of a known shape; `progress(bytes written, total)`."""
    if shape_name not in SHAPES:
        raise ConsortiumError(f"unknown shape {shape_name!r} (one of: {', '.join(SHAPES)})")
    if quant not in QUANTS:
        raise ConsortiumError(f"unknown quantization {quant!r} (one of: {', '.join(QUANTS)})")
    shape = SHAPES[shape_name]
    n_layers = shape.n_layers if layers is None else layers
    if not 1 <= n_layers <= shape.n_layers:
        raise ConsortiumError(f"--layers must be in 1..{shape.n_layers} for {shape_name}, got {n_layers}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tensors = plan(shape, quant, n_layers)
    total, written = sum(t.nbytes for t in tensors), [0]

    def done(n: int) -> None:
        written[0] += n
        if progress is not None:
            progress(written[0], total)

    w = GGUFWriter(str(tmp), "llama")
    _write_metadata(w, shape_name, shape, quant, n_layers, seed)
    for t in tensors:
        dtype, raw = (np.uint8, t.qtype) if t.qtype not in (Q.F32, Q.F16) else (np.float32, None)
        dtype = np.float16 if t.qtype == Q.F16 else dtype
        byte_shape = (
            (t.rows, t.nbytes // t.rows) if raw is not None else (t.rows, t.cols) if t.cols else (t.rows,)
        )
        w.add_tensor_info(t.name, byte_shape, np.dtype(dtype), t.nbytes, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            if t.name == "rope_freqs.weight":
                factors = llama3_rope_factors(shape)
                w.write_tensor_data(_Lazy(t, lambda f=factors: iter([f]), done))
            else:
                w.write_tensor_data(_Lazy(t, lambda t=t: _chunks(t, seed), done))
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out


def _write_metadata(w: GGUFWriter, name: str, s: Shape, quant: str, n_layers: int, seed: int) -> None:
    hd = s.dim // s.n_heads
    w.add_name(f"synthetic-{name}-{quant}" + (f"-{n_layers}l" if n_layers != s.n_layers else ""))
    w.add_description(f"random weights (consortium model synth, seed {seed}); no trained model")
    w.add_block_count(n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.dim)
    w.add_feed_forward_length(s.ffn_dim)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(s.rope_base)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(s.vocab_size)
    w.add_file_type(QUANTS[quant][1])
    w.add_quantization_version(2)
    v = make_vocab(s.vocab_size, s.family, seed)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    w.add_bos_token_id(v.bos)
    w.add_eos_token_id(v.eos)
    w.add_add_bos_token(v.add_bos)
    w.add_chat_template(v.chat_template)
