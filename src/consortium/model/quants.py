"""GGUF quantized blocks as 4-bit codes for PyTorch's CPU int4 kernel, codes exact.

The kernel computes y = x' W'^T with W'[n, k] = (c[n, k] - 8) * s[n, k // 32] + z[n, k // 32]:
4-bit codes c, one bf16 scale s and zero z per 32 consecutive codes. Each format maps onto it
without changing a code; only s and z are rounded to bf16 (and x to bf16, as in any bf16 mode):

| format | K' | x' | how |
|---|---|---|---|
| Q4_0, Q4_1, Q4_K | K | x | one to one; Q4_K's sub-block scale d*sc and min dmin*m become s, z |
| Q5_0, Q5_1, Q5_K, Q8_0 | 2K | [x, x] | high part (code >> 4) and low nibble as two K-wide halves |
| Q6_K | 2K | [x_b, 8 x_b] per 16 | each 16-block (one scale) is one group: its low nibbles, then its high 2 bits as 2h + 5, with z = 0 |

Q6_K: x s (lo - 8) + 8 x s (2 hi + 5 - 8) = x s (lo + 16 hi - 32): the format's own value.
All of it is vectorised over rows (no per-block Python loops, no float64).

Exact: every code, and the formula (tests/test_scale.py rebuilds each format's fp32 dequantization
from the int4 form to 1e-6). Rounded: s and z to bf16 (rel. 2^-9 each) and x to bf16. Measured on
1024x4096 matrices, rel-L2 of x W^T against fp32 x and fp32 dequantized W: 0.24-0.38 % for every
format (dense bf16: 0.26-0.29 %); bound tested: 1 %. Memory: 0.625 bytes/weight for the 4-bit
formats, 1.25 for the others (GGUF: 0.56-1.06; dense bf16: 2). At M=1 (decode) the kernel beats
dense bf16 by 1.6-2.5x on 8B shapes; at M=16 (prefill) it is 1.1-5x slower (bench_scale.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

Q = GGMLQuantizationType
LAYOUTS = {"Q4_0": "plain", "Q4_1": "plain", "Q4_K": "plain", "Q5_0": "dup", "Q5_1": "dup"}
LAYOUTS |= {"Q5_K": "dup", "Q8_0": "dup", "Q6_K": "pair16"}
PACKABLE = frozenset(LAYOUTS)  # quantized formats the int4 path reproduces
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})  # kept dense (bf16) in packed mode
U8 = [np.uint8(i) for i in range(64)]  # typed shift/mask operands: ~6x faster than Python ints
CHUNK_CODES = 1 << 23
int4_mm = getattr(
    torch.ops.aten, "_weight_int4pack_mm_for_cpu", None
)  # PyTorch >= 2.6  # codes decoded per step: bounds the temporaries (~100 MB) of a big matrix


@dataclass
class Int4Segment:
    """Packed rows for the kernel: weight uint8 [N, K'/2], sz bf16 [K'/32, N, 2], x' by `layout`."""

    weight: Tensor
    sz: Tensor
    layout: str

    @property
    def rows(self) -> int:
        return self.weight.shape[0]


@dataclass
class Int4Parts:
    """W' of some rows: codes uint8 [n, K'] in 0..15; scale, zero float32 [n, K'/32]."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray


def f16_field(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 [..., 1]."""
    return b[..., at : at + 2].copy().view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Each `width`-byte chunk holds 2*width values: its low nibbles first, then its high ones."""
    q = qs.reshape(*qs.shape[:-1], -1, 1, width)
    return np.concatenate([q & U8[15], q >> U8[4]], axis=-2).reshape(*qs.shape[:-1], -1)


def crumbs(qh: np.ndarray, width: int) -> np.ndarray:
    """Each `width`-byte chunk holds 4*width 2-bit values, lowest bits first (Q6_K's high bits)."""
    q = qh.reshape(*qh.shape[:-1], -1, 1, width)
    parts = [q & U8[3], (q >> U8[2]) & U8[3], (q >> U8[4]) & U8[3], q >> U8[6]]
    return np.concatenate(parts, axis=-2).reshape(*qh.shape[:-1], -1)


def high_bits(qh: np.ndarray, kind: str) -> np.ndarray:
    """The fifth bit of every value: Q5_0/Q5_1 value j is bit j of 4 bytes; Q5_K's 256 values are
    bit i of byte j at i*32 + j."""
    bits = np.unpackbits(qh[..., None], axis=-1, bitorder="little")  # [..., bytes, 8]
    if kind == "Q5_K":
        bits = np.swapaxes(bits, -1, -2)
    return bits.reshape(*qh.shape[:-1], -1)


def k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _flat(*arrays: np.ndarray) -> list[np.ndarray]:
    """[n, blocks, ...] -> [n, blocks * ...]."""
    return [a.reshape(a.shape[0], -1) for a in arrays]


def _split(lo: np.ndarray, lo_s, lo_z, hi: np.ndarray, hi_s) -> Int4Parts:
    """'dup' layout: [high part | low nibbles]; high codes are hi + 8 with scale hi_s and no zero."""
    codes = np.concatenate([hi + U8[8], lo], axis=1)
    return Int4Parts(codes, np.concatenate([hi_s, lo_s], axis=1), np.concatenate([0 * hi_s, lo_z], axis=1))


def _plain(raw: np.ndarray, kind: str) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """A 4-bit format's nibble bytes [n, blocks, bytes] (chunks of `width` bytes: low nibbles, then
    high ones), and scale and zero per 32 values [n, K/32]."""
    n = raw.shape[0]
    b = raw.reshape(n, -1, GGML_QUANT_SIZES[Q[kind]][1])
    if kind == "Q4_K":
        d, dmin = f16_field(b, 0), f16_field(b, 2)
        sc, mn = k_scales(b[..., 4:16])
        return b[..., 16:], 32, *_flat(d * sc, 8 * d * sc - dmin * mn)
    d, head = f16_field(b, 0), 2 if kind == "Q4_0" else 4
    return b[..., head:], 16, *_flat(d, 0 * d if kind == "Q4_0" else 8 * d + f16_field(b, 2))


def decode(raw: np.ndarray, kind: str) -> Int4Parts:
    """The int4 form of rows of a quantized matrix (raw: uint8 [n, row bytes])."""
    n = raw.shape[0]
    b = raw.reshape(n, -1, GGML_QUANT_SIZES[Q[kind]][1])
    if LAYOUTS[kind] == "plain":
        qs, width, scale, zero = _plain(raw, kind)
        return Int4Parts(nibbles(qs, width).reshape(n, -1), scale, zero)
    if kind == "Q5_K":
        d, dmin = f16_field(b, 0), f16_field(b, 2)
        sc, mn = k_scales(b[..., 4:16])
        scale, zero = d * sc, 8 * d * sc - dmin * mn
        lo, hi = nibbles(b[..., 48:176], 32), high_bits(b[..., 16:48], kind)
        return _split(*_flat(lo, scale, zero, hi, 16 * scale))
    if kind in ("Q5_0", "Q5_1"):
        d, head = f16_field(b, 0), 2 if kind == "Q5_0" else 4
        zero = -8 * d if kind == "Q5_0" else 8 * d + f16_field(b, 2)
        hi = high_bits(b[..., head : head + 4], kind)
        return _split(*_flat(nibbles(b[..., head + 4 :], 16), d, zero, hi, 16 * d))
    if kind == "Q8_0":
        d, q = f16_field(b, 0), b[..., 2:].view(np.int8)
        hi = (q >> np.int8(4)).view(np.uint8)  # -8..7 as 248..7: + 8 wraps into 0..15
        return _split(*_flat(q.view(np.uint8) & U8[15], d, 8 * d, hi, 16 * d))
    if kind == "Q6_K":
        lo, hi = nibbles(b[..., :128], 64), crumbs(b[..., 128:192], 32)
        s = f16_field(b, 208) * b[..., 192:208].view(np.int8).astype(np.float32)  # [n, blocks, 16]
        lo, hi = lo.reshape(n, -1, 1, 16), hi.reshape(n, -1, 1, 16)
        codes = np.concatenate([lo, U8[2] * hi + U8[5]], axis=2)  # per 16-block: low nibbles, then 2 hi + 5
        return Int4Parts(*_flat(codes, s, 0 * s))
    raise ValueError(f"no int4 form for {kind}")


def expand_input(x: Tensor, layout: str) -> Tensor:
    """x' for a layout: x, [x, x], or [x_b, 8 x_b] per 16-block (8x is exact in bf16)."""
    if layout == "dup":
        return torch.cat([x, x], dim=-1)
    if layout == "pair16":
        xb = x.unflatten(-1, (-1, 16))
        return torch.cat([xb, 8 * xb], dim=-1).flatten(-2)
    return x


def int4_matmul(x: Tensor, weight: Tensor, sz: Tensor, layout: str) -> Tensor:
    """x W^T for a packed weight (x in bf16)."""
    return int4_mm(expand_input(x, layout), weight, 32, sz)


def _pack_fast(codes: np.ndarray) -> np.ndarray:
    """The kernel's AVX-512 weight layout, built with array ops (its own packer is slower): per
    64 rows and each k, bytes [c(n) | c(n+32) << 4 for n < 16] then [c(n+16) | c(n+48) << 4]."""
    n, k = codes.shape
    c = codes.reshape(n // 64, 4, 16, k)
    p = np.concatenate([c[:, 0] | (c[:, 2] << U8[4]), c[:, 1] | (c[:, 3] << U8[4])], axis=1)
    return _transpose(p).reshape(n, k // 2)


def _transpose(p: np.ndarray) -> np.ndarray:
    """[blocks, 32, K] -> [blocks, K, 32] in tiles of 64 k (an L1-sized tile: ~4x faster than one
    strided copy, which reads a new cache line for every byte)."""
    nb, j, k = p.shape
    tile = 64 if k % 64 == 0 else 1
    return np.ascontiguousarray(p.reshape(nb, j, k // tile, tile).transpose(0, 2, 3, 1)).reshape(nb, k, j)


@cache
def fast_layout_ok() -> bool:
    """Whether _pack_fast builds exactly what this PyTorch's packer builds (checked once)."""
    codes = np.random.default_rng(0).integers(0, 16, (128, 64), dtype=np.uint8)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes).int(), 1)
    return (
        ref.dtype == torch.uint8 and ref.shape == (128, 32) and np.array_equal(ref.numpy(), _pack_fast(codes))
    )


def _pack_nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """_pack_fast straight from a 4-bit format's nibble bytes, without the codes in between: a
    low-nibble value of rows (a, b) packs as (a & 15) | b << 4, a high-nibble one as a >> 4 | b & 0xF0."""
    q = qs.reshape(qs.shape[0] // 64, 4, 16, -1, width)
    pairs = []
    for a, b in ((q[:, 0], q[:, 2]), (q[:, 1], q[:, 3])):
        pairs.append(np.stack([(a & U8[15]) | (b << U8[4]), (a >> U8[4]) | (b & np.uint8(0xF0))], axis=-2))
    return _transpose(np.stack(pairs, axis=1).reshape(qs.shape[0] // 64, 32, -1)).reshape(qs.shape[0], -1)


def _pack_rows(raw: np.ndarray, kind: str, packed: Tensor, sz: Tensor) -> None:
    """Decode rows and write their packed codes and scale/zero into the given output rows (sz:
    [rows, K'/32, 2], a strided view of the kernel's [K'/32, N, 2])."""
    fast = raw.shape[0] % 64 == 0 and fast_layout_ok()
    if fast and LAYOUTS[kind] == "plain":
        qs, width, scale, zero = _plain(np.asarray(raw), kind)
        packed.copy_(torch.from_numpy(_pack_nibbles(qs, width)))
        sz.copy_(torch.from_numpy(np.stack([scale, zero], axis=-1)))
        return
    parts = decode(np.asarray(raw), kind)
    if fast:
        packed.copy_(torch.from_numpy(_pack_fast(parts.codes)))
    else:
        packed.copy_(
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(parts.codes).int(), 1)
        )
    sz.copy_(torch.from_numpy(np.stack([parts.scale, parts.zero], axis=-1)))


def packed_codes(kind: str, row_bytes: int) -> int:
    """K', the codes per row of a matrix's int4 form, from its stored row size."""
    block, size = GGML_QUANT_SIZES[Q[kind]]
    return row_bytes // size * block * (1 if LAYOUTS[kind] == "plain" else 2)


def pack_into(
    raw: np.ndarray, kind: str, packed: Tensor, sz: Tensor, done: Callable[[slice], None] | None = None
) -> None:
    """Pack a GGUF matrix into given outputs: packed uint8 [N, K'/2] and sz bf16 [K'/32, N, 2] (a
    column range of a larger sz is fine: fused matrices fill one segment with no concatenation).
    Row chunks (whole blocks of 64 rows) bound the temporaries and run on torch's threads (numpy
    releases the GIL in its loops); done(rows) is called as each chunk's raw rows are finished
    with, so a caller can drop them from memory before the matrix ends."""
    n, row_bytes = raw.shape
    k2 = packed_codes(kind, row_bytes)
    step = max(64, CHUNK_CODES // k2 // 64 * 64)
    rows_first = sz.transpose(0, 1)  # [N, K'/32, 2]: how a chunk's scales come out

    def chunk(r: slice) -> None:
        _pack_rows(raw[r], kind, packed[r], rows_first[r])
        if done is not None:
            done(r)

    rows = [slice(r, min(r + step, n)) for r in range(0, n, step)]
    with ThreadPoolExecutor(max(1, min(len(rows), torch.get_num_threads()))) as pool:
        list(pool.map(chunk, rows))


def pack(raw: np.ndarray, kind: str) -> tuple[Tensor, Tensor]:
    """(packed weight [N, K'/2] uint8, scales and zeros bf16 [K'/32, N, 2]) of a GGUF matrix."""
    n, k2 = raw.shape[0], packed_codes(kind, raw.shape[1])
    packed = torch.empty(n, k2 // 2, dtype=torch.uint8)
    sz = torch.empty(k2 // 32, n, 2, dtype=torch.bfloat16)  # the kernel's layout: no transposed copy
    pack_into(raw, kind, packed, sz)
    return packed, sz
