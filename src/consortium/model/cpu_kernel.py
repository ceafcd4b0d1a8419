"""The strict class's compact CPU kernel: GGUF weights kept quantized, fp32 activations and sums.

`--dtype fp32 --packed` runs every quantized matrix through cpu_kernel.cpp, built here on first use
(torch's C++ extension builder, ~25 s, once per machine and PyTorch; cached in
$TORCH_EXTENSIONS_DIR). Each weight the kernel multiplies is exactly the fp32 value llama.cpp
dequantizes, and every sum is fp32, so results differ from dense fp32 only in summation order
(rel. ~1e-7): the strict verification class, at 0.75 bytes per 4-bit weight instead of fp32's 4 or
fp16's 2. Every output is summed in one order however many rows a call has, so batching sessions
never changes a session's bits, and a batch's rows share each weight block's decoding.

Two forms (blocks of 32 along a row, all exact images of the GGUF blocks):

| form | codes | per block | formats |
|---|---|---|---|
| Q4 | uint8, two 4-bit codes per byte | scale, zero (W = c s + z) | Q4_0, Q4_1, Q4_K |
| Q8 | int8 | scale per 16, zero | Q8_0, Q6_K, Q5_0, Q5_1, Q5_K |
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from consortium.errors import ConsortiumError
from consortium.model.quants import CHUNK_CODES, U8, crumbs, f16_field, high_bits, k_scales, nibbles

Q = GGMLQuantizationType
SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# each packable GGUF type's form: q4, q8, or q8z (q8 with zeros); one form shares a segment
FORMS = {"Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4", "Q8_0": "q8", "Q6_K": "q8", "Q5_0": "q8"}
FORMS |= {"Q5_1": "q8z", "Q5_K": "q8z"}
TILE = 4  # outputs interleaved block by block (cpu_kernel.cpp's kOutTile)

log = logging.getLogger(__name__)


def _flags() -> list[str]:
    """Tuned for this CPU (the extension's name carries the CPU, so a shared home never runs one
    machine's build on another). -ffp-contract=off: the compiler never fuses a*b+c on its own,
    which it may do differently in each tile shape (GCC 13 on a Sapphire Rapids did: a row's
    bits then depended on its batch); the FMAs that matter are written out."""
    flags = ["-O3", "-ffp-contract=off"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-march=native", "-mprefer-vector-width=512"]
    else:
        flags += ["-mcpu=native"]
    return flags + _openmp()


def _openmp() -> list[str]:
    """ATen's parallel_for runs its loop on one thread unless the extension itself is built with
    OpenMP (a header-only template). Linux: the libgomp this links to is the one PyTorch has
    loaded (same soname), so the kernel shares torch's thread pool and thread count. Apple's
    clang has no -fopenmp: one thread there."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        ident = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        ident = [platform.processor(), platform.machine()]
    # the environment too: two virtualenvs' builds differ in include paths, and one rebuilding the
    # other's library under a running process's feet would break it
    key = "|".join([*ident, sys.prefix, torch.__version__, SOURCE.read_text(), *_flags()])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@cache
def buildable() -> bool:
    """Whether kernel() can work here without trying it (a build takes ~25 s): a C++ compiler on
    PATH. Engines pick their default mode by it (fp16 where it is false)."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@cache
def kernel() -> ModuleType:
    """The built extension (built on first use; a clear error where no C++ compiler works)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime"
    from torch.utils import cpp_extension

    scripts = str(Path(sys.executable).parent)  # the pip-installed ninja, where PATH lacks it
    if shutil.which("ninja") is None and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])

    try:
        name = f"consortium_cpu_kernel_{_cpu_id()}"
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=_flags(), extra_ldflags=_openmp())
    except Exception as e:  # compiler missing or failing: name the cause, keep the rest usable
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConsortiumError(
            f"the fp32 packed CPU kernel could not be built ({detail}); it needs a C++ compiler "
            "(g++ or clang++); run without --packed, or with --dtype bf16 --packed"
        ) from e


@dataclass
class QuantSegment:
    """Rows of a matrix in one form: codes [N, K/2] uint8 (q4) or [N, K] int8 (q8); scale fp32
    [N, K/32] (q4) or [N, K/16] (q8); zero fp32 [N, K/32] or None. Each stored tile-major (4
    outputs interleaved block by block, `_blockwise`): a slice of whole tiles is a segment too."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None

    def __post_init__(self) -> None:
        """Checked here, in Python: the kernel's own checks throw C++ exceptions, which crashed
        the process on one machine (PyTorch 2.11, GCC 13) instead of raising."""
        q4, (n, width) = self.codes.dtype == torch.uint8, self.codes.shape
        cols = width * 2 if q4 else width
        ok = self.codes.dtype in (torch.uint8, torch.int8) and n % TILE == 0 and cols % 32 == 0
        ok = ok and self.scale.dtype == torch.float32 and self.scale.shape == (n, cols // (32 if q4 else 16))
        ok = ok and (
            self.zero is None or (self.zero.dtype == torch.float32 and self.zero.shape == (n, cols // 32))
        )
        tensors = [t for t in (self.codes, self.scale, self.zero) if t is not None]
        if not ok or not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
            raise ValueError(
                f"inconsistent packed segment: codes {self.codes.dtype} {tuple(self.codes.shape)}, "
                f"scale {self.scale.dtype} {tuple(self.scale.shape)}"
            )
        self.cols = cols

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.scale, self.zero) if t is not None)

    def dense(self) -> Tensor:
        """W in fp32, [N, K]."""
        return kernel().dequant(self.codes, self.scale, self.zero, 0, self.rows)

    def matmul(self, x: Tensor) -> Tensor:
        """x W^T in fp32, for any number of rows: the kernel, never a GEMM over dequantized W.
        Many rows gain nothing from GEMM here (SmolLM2's w13 at 30 rows 0.63 ms in the kernel,
        1.15 ms dequantizing for fp32 GEMM; 256 rows 5.5 vs 8.3 ms; one thread), and the kernel
        gives a row the same bits alone, in a batch or in a prefill."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 1 or x.shape[-1] != self.cols:
            raise ValueError(
                f"x must be float32 [..., {self.cols}] on the CPU, got {x.dtype} {tuple(x.shape)}"
            )
        return kernel().linear(x, self.codes, self.scale, self.zero)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of fp32 rows in one pass (the kernel's): y = x / sqrt(mean(x^2) + eps) * weight."""
    d = weight.shape[0]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must be float32 [..., {d}] on the CPU, got {x.dtype} {tuple(x.shape)}")
    return kernel().rms_norm(x, weight, eps)


def swiglu(x: Tensor) -> Tensor:
    """silu(gate) * up of fp32 rows [gate | up] (the kernel's one call)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must be float32 [..., 2F] on the CPU, got {x.dtype} {tuple(x.shape)}")
    return kernel().swiglu(x)


def attend_decode(
    qkv: Tensor, rot: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, n_heads: int, scale: float
) -> Tensor:
    """One session's decode row of attention in one call (the kernel's): RoPE on q and k (rot:
    the position's [head_dim/2, 2] cos, sin), k and v written into the caches at `pos`, then
    grouped-query attention over positions 0..pos. qkv: the fused projection's row. [1, q_dim]."""
    kvh, cap, hd = k_cache.shape
    ok = qkv.dtype == torch.float32 and qkv.numel() == (n_heads + 2 * kvh) * hd and 0 <= pos < cap
    ok = ok and k_cache.dtype == v_cache.dtype == torch.float32 and k_cache.shape == v_cache.shape
    if not ok:
        raise ValueError(
            f"attend_decode: row {tuple(qkv.shape)} {qkv.dtype}, cache {tuple(k_cache.shape)}, pos {pos}"
        )
    return kernel().attend_decode(qkv.contiguous(), rot.contiguous(), k_cache, v_cache, pos, n_heads, scale)


@dataclass(frozen=True)
class BlockWeights:
    """A packed fp32 block's tensors in the order the kernel's decode_block takes them."""

    attn_norm: Tensor
    ffn_norm: Tensor
    eps: float
    tensors: list[Tensor]  # codes, scale, zero (empty: none) of every segment of wqkv, wo, w13, w2
    segments: list[int]  # of each of the four
    n_heads: int
    scale: float

    @classmethod
    def of(
        cls,
        attn_norm: Tensor,
        ffn_norm: Tensor,
        eps: float,
        linears: list[list[QuantSegment]],
        n_heads: int,
        scale: float,
    ):
        none = torch.empty(0)
        tensors = [
            t for lin in linears for s in lin for t in (s.codes, s.scale, none if s.zero is None else s.zero)
        ]
        return cls(attn_norm, ffn_norm, eps, tensors, [len(lin) for lin in linears], n_heads, scale)


def decode_layers(
    x: Tensor,
    blocks: list[BlockWeights],
    rot: Tensor,
    caches: list[tuple[list[Tensor], list[Tensor]]],
    pos: list[int],
) -> Tensor:
    """Transformer blocks for decode rows, one per session, in one kernel call: what
    model.Block computes for them op for op (the same bits). x: the fp32 residual rows [N, dim];
    rot: each row's [head_dim / 2, 2] cos/sin; caches: each row's session's per-layer K and V
    (layer i of the stage: index i); pos: each row's position. Checked here, once for all blocks."""
    n, dim = x.shape[0], blocks[0].attn_norm.shape[0] if blocks else 0
    ok = x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == dim
    ok = ok and len(caches) == len(pos) == n and tuple(rot.shape[:1]) == (n,) and rot.dtype == torch.float32
    ok = ok and all(len(k) == len(v) == len(blocks) for k, v in caches)
    ok = ok and all(0 <= p < k[0].shape[1] for (k, _), p in zip(caches, pos, strict=True))
    if not ok:
        raise ValueError(
            f"decode_layers: rows {x.dtype} {tuple(x.shape)} (dim {dim}), {len(blocks)} blocks, "
            f"{len(caches)} caches, positions {pos}"
        )
    # one call for every block: the GIL is released once for the stage, not re-taken per block
    layers = range(len(blocks))
    return kernel().decode_blocks(
        x.contiguous(),
        [w.attn_norm for w in blocks],
        [w.ffn_norm for w in blocks],
        [w.eps for w in blocks],
        [w.tensors for w in blocks],
        [w.segments for w in blocks],
        rot.contiguous(),
        [[k[i] for k, _ in caches] for i in layers],
        [[v[i] for _, v in caches] for i in layers],
        pos,
        [w.n_heads for w in blocks],
        [w.scale for w in blocks],
    )


def _layout(kind: str, rows: int, cols: int) -> tuple[tuple[int, int], torch.dtype, int, bool]:
    """A [rows, cols] matrix's form: codes shape and dtype, scales per row, whether it has zeros."""
    if FORMS[kind] == "q4":
        return (rows, cols // 2), torch.uint8, cols // 32, True
    return (rows, cols), torch.int8, cols // 16, FORMS[kind] == "q8z"


def segment_bytes(kind: str, rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] matrix of GGUF type `kind` in its form."""
    (_, width), dtype, scales, zero = _layout(kind, rows, cols)
    return rows * (width + 4 * scales + (4 * (cols // 32) if zero else 0))


def _blocks(raw: np.ndarray, kind: str) -> np.ndarray:
    return raw.reshape(raw.shape[0], -1, GGML_QUANT_SIZES[Q[kind]][1])


def _q4_rows(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes in natural order [n, K], scale and zero [n, K/32] of a 4-bit format."""
    b, n = _blocks(raw, kind), raw.shape[0]
    if kind == "Q4_K":
        d, dmin = f16_field(b, 0), f16_field(b, 2)
        sc, mn = k_scales(b[..., 4:16])
        return nibbles(b[..., 16:], 32).reshape(n, -1), (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1)
    d, head = f16_field(b, 0), 2 if kind == "Q4_0" else 4
    zero = -8 * d if kind == "Q4_0" else f16_field(b, 2)
    return nibbles(b[..., head:], 16).reshape(n, -1), d.reshape(n, -1), zero.reshape(n, -1)


def _q8_rows(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Signed codes [n, K], scale per 16 [n, K/16] and zero per 32 (or None) of a 5-8 bit format."""
    b, n = _blocks(raw, kind), raw.shape[0]
    if kind == "Q8_0":
        d = f16_field(b, 0)
        return b[..., 2:].view(np.int8).reshape(n, -1), np.repeat(d, 2, -1).reshape(n, -1), None
    if kind == "Q6_K":
        lo, hi = nibbles(b[..., :128], 64), crumbs(b[..., 128:192], 32)
        q = (lo + U8[16] * hi).view(np.int8) - np.int8(32)  # 0..63 - 32: the format's own value
        s = f16_field(b, 208) * b[..., 192:208].view(np.int8).astype(np.float32)
        return q.reshape(n, -1), s.reshape(n, -1), None
    if kind == "Q5_K":
        d, dmin = f16_field(b, 0), f16_field(b, 2)
        sc, mn = k_scales(b[..., 4:16])
        q = nibbles(b[..., 48:176], 32) + U8[16] * high_bits(b[..., 16:48], kind)
        return (
            q.view(np.int8).reshape(n, -1),
            np.repeat(d * sc, 2, -1).reshape(n, -1),
            (-dmin * mn).reshape(n, -1),
        )
    d, head = f16_field(b, 0), 2 if kind == "Q5_0" else 4
    q = nibbles(b[..., head + 4 :], 16) + U8[16] * high_bits(b[..., head : head + 4], kind)
    if kind == "Q5_0":  # d (q - 16)
        return (q.view(np.int8) - np.int8(16)).reshape(n, -1), np.repeat(d, 2, -1).reshape(n, -1), None
    return q.view(np.int8).reshape(n, -1), np.repeat(d, 2, -1).reshape(n, -1), f16_field(b, 2).reshape(n, -1)


def empty_segment(kind: str, rows: int, cols: int) -> QuantSegment:
    """Uninitialised storage for [rows, cols] weights of GGUF type `kind`."""
    shape, dtype, scales, zero = _layout(kind, rows, cols)
    return QuantSegment(
        torch.empty(shape, dtype=dtype),
        torch.empty(rows, scales),
        torch.empty(rows, cols // 32) if zero else None,
    )


def _blockwise(a: np.ndarray, nb: int) -> np.ndarray:
    """[rows, nb * per] in output order -> the kernel's tile-major order (same shape): for each 4
    outputs, block 0 of each, then block 1 of each, ...; `per` consecutive values per (block, output)."""
    rows = a.shape[0]
    t = a.reshape(rows // TILE, TILE, nb, -1).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t).reshape(rows, -1)


def _fill(raw: np.ndarray, kind: str, out: QuantSegment) -> None:
    if FORMS[kind] == "q4":
        codes, scale, zero = _q4_rows(raw, kind)
        c = codes.reshape(codes.shape[0], -1, 2, 16)  # per block: codes 0..15 low, 16..31 high
        codes = (c[:, :, 0] | (c[:, :, 1] << U8[4])).reshape(codes.shape[0], -1)
    else:
        codes, scale, zero = _q8_rows(raw, kind)
        codes = codes.view(np.uint8)
    nb = scale.shape[1] // (1 if FORMS[kind] == "q4" else 2)
    out.codes.view(torch.uint8).copy_(torch.from_numpy(_blockwise(codes, nb)))
    out.scale.copy_(torch.from_numpy(_blockwise(scale, nb)))
    if out.zero is not None:
        out.zero.copy_(torch.from_numpy(_blockwise(zero, nb)))


def pack_rows_into(
    raw: np.ndarray, kind: str, out: QuantSegment, done: Callable[[slice], None] | None = None
) -> None:
    """Fill `out` (rows of a segment) from a GGUF matrix's raw rows [N, row bytes], in row chunks
    (whole tiles) on torch's threads (numpy releases the GIL); done(rows) as each chunk's raw
    rows are used."""
    n, cols = raw.shape[0], out.scale.shape[1] * (32 if FORMS[kind] == "q4" else 16)
    if n % TILE:
        raise ValueError(f"{n} rows: the strict kernel stores outputs in tiles of {TILE}")
    step = max(TILE, CHUNK_CODES // cols // TILE * TILE)

    def chunk(r: slice) -> None:
        part = QuantSegment(out.codes[r], out.scale[r], None if out.zero is None else out.zero[r])
        _fill(np.asarray(raw[r]), kind, part)
        if done is not None:
            done(r)

    rows = [slice(r, min(r + step, n)) for r in range(0, n, step)]
    with ThreadPoolExecutor(max(1, min(len(rows), torch.get_num_threads()))) as pool:
        list(pool.map(chunk, rows))


def main() -> None:
    """`python -m consortium.model.cpu_kernel`: build the kernel now (make setup does)."""
    import time

    t = time.perf_counter()
    kernel()
    print(f"fp32 packed CPU kernel ready ({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
