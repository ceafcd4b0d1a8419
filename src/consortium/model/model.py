"""The Llama-family transformer, as a pipeline stage over a half-open layer range.

One engine serves the single-node baseline, a worker's stage, the coordinator's own
stage and an auditor's recomputation, so "distributed equals single-node" follows
from the wiring. Weights come from GGUF (see gguf_file.py); attn_q/attn_k rows are
stored in llama.cpp's interleaved RoPE layout, so RoPE here rotates adjacent pairs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from consortium.errors import CacheError, ConsortiumError, InvalidRequestError
from consortium.model.cpu_kernel import (
    FORMS,
    BlockWeights,
    QuantSegment,
    attend_decode,
    decode_layers,
    empty_segment,
    kernel,
    pack_rows_into,
    rms_norm,
    swiglu,
)
from consortium.model.gguf_file import GGUFModel, ModelArgs
from consortium.model.memory import check_compact, check_memory, is_packed
from consortium.model.quants import (
    CHUNK_CODES,
    LAYOUTS,
    Int4Segment,
    int4_matmul,
    int4_mm,
    pack_into,
    packed_codes,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Spans = list[tuple[int, int]]  # per session in a batch: (first position, rows)
WIDE_ROWS = 6  # one session's rows from which fp16 on a CPU takes fp32 GEMM (SmolLM2 break-even: 5)
WIDE_CHUNK = 1 << 22  # weights widened to fp32 at once on that path (16 MB)


@dataclass(frozen=True)
class StageSpec:
    """What a stage runs: layers [start, end) of a model, on a device, in a dtype."""

    start: int
    end: int
    device: str = "cpu"
    dtype: str = "fp32"
    # keep quantized weights packed on the CPU: fp32 runs them through the strict kernel
    # (cpu_kernel.py), bf16 through PyTorch's int4 kernel (quants.py, the loose class)
    packed: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def resolve_device(name: str) -> str:
    """auto -> cuda, mps or cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConsortiumError("device 'cuda' requested but CUDA is not available here")
        return name
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConsortiumError("device 'mps' requested but Apple MPS is not available here")
        return name
    raise ConsortiumError(f"unknown device {name!r} (use auto, cpu, cuda or mps)")


# --- KV cache -------------------------------------------------------------------------


class KVCache:
    """Keys and values of one session on one stage: [n_kv_heads, capacity, head_dim] per layer."""

    def __init__(self, args: ModelArgs, n_layers: int, capacity: int, dtype: torch.dtype, device: str):
        shape = (args.n_kv_heads, capacity, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity
        self.length = 0

    @staticmethod
    def nbytes_for(args: ModelArgs, n_layers: int, capacity: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * args.n_kv_heads * capacity * args.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rollback); later writes overwrite them."""
        if not 0 <= length <= self.length:
            raise CacheError(f"cannot truncate cache of length {self.length} to {length}")
        self.length = length


# --- layers ---------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x W^T with W dense, or in packed segments whose outputs are concatenated: int4 for
    PyTorch's bf16 kernel (quants.py), quantized blocks for the strict fp32 kernel (cpu_kernel.py)."""

    def __init__(self, weight: Tensor | None = None, packed: list[Int4Segment | QuantSegment] | None = None):
        super().__init__()
        self.weight, self.packed = weight, packed

    def forward(self, x: Tensor, wide: bool = False) -> Tensor:
        """wide (one session's many rows) matters only to dense fp16 on a CPU (_fp16_wide): the
        packed kernels take any number of rows as they are."""
        if self.packed is None:
            if wide and self.weight.dtype == torch.float16 and self.weight.device.type == "cpu":
                return _fp16_wide(x, self.weight)
            return F.linear(x, self.weight)
        if len(self.packed) == 1:  # the usual case: no list, no cat
            return _segment_matmul(self.packed[0], x)
        return torch.cat([_segment_matmul(s, x) for s in self.packed], dim=-1)


def _segment_matmul(s: Int4Segment | QuantSegment, x: Tensor) -> Tensor:
    if isinstance(s, QuantSegment):
        return s.matmul(x)
    return int4_matmul(x, s.weight, s.sz, s.layout)


def _fp16_wide(x: Tensor, weight: Tensor) -> Tensor:
    """fp16 x W^T for many rows on a CPU: PyTorch runs fp16 as one matrix-vector product per row
    (about 4x fp32 GEMM's time per row at 16+ rows, on CPUs without AVX512-FP16), so the rows go
    through fp32 GEMM over the fp16 weights widened a chunk of output rows at a time (a bounded
    transient, never a whole fp32 copy). Same inputs and weights, fp32 sums, fp16 outputs: the
    strict class, within an fp16 rounding of the narrow path."""
    xf, step = x.float(), max(1, WIDE_CHUNK // weight.shape[1])
    parts = [F.linear(xf, weight[r : r + step].float()) for r in range(0, weight.shape[0], step)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)


def is_wide(spans: Spans) -> bool:
    """One session's many rows (a prefill, an audit, a replay): Linear may take its wide path.
    Decode rows of a batch never do, so a batched row keeps the bits it has alone."""
    return len(spans) == 1 and spans[0][1] >= WIDE_ROWS


class RMSNorm(nn.Module):
    """Normalises the fp32 residual stream in fp32, hands the result on in the compute dtype
    (`fused`: the strict kernel's one-pass version, for packed fp32 stages)."""

    def __init__(self, weight: Tensor, eps: float, out_dtype: torch.dtype, fused: bool = False):
        super().__init__()
        self.weight, self.eps, self.out_dtype, self.fused = weight, eps, out_dtype, fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return rms_norm(x, self.weight, self.eps)
        y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return y if self.out_dtype == torch.float32 else y.to(self.out_dtype)


def apply_rope(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate adjacent pairs (GGUF/llama.cpp layout) in fp32. x: [S, heads, head_dim]; freqs_cis:
    [S, head_dim/2], or [S, 1, head_dim/2] as a Stage passes it (broadcast once per forward)."""
    f = freqs_cis if freqs_cis.dim() == 3 else freqs_cis[:, None, :]
    # Each (even, odd) fp32 pair viewed in place as one complex64: no reshapes, no copies in fp32.
    y = (x if x.dtype == torch.float32 else x.float()).view(torch.complex64).mul(f).view(torch.float32)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def rope_freqs(args: ModelArgs, factors: np.ndarray | None = None) -> Tensor:
    """Complex rotations [context_length, head_dim/2], with linear or Llama-3 scaling."""
    d = args.rope_dim
    inv = 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = args.rope_scaling
    if factors is not None:  # rope_freqs.weight tensor (llama.cpp's way of storing Llama-3.1 scaling)
        inv = inv / torch.from_numpy(factors.astype(np.float64)).reshape(-1)
    elif rs.kind == "llama3":
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = rs.original_context / rs.low_freq_factor, rs.original_context / rs.high_freq_factor
        smooth = (rs.original_context / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wl, inv / rs.factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    t = torch.arange(args.context_length, dtype=torch.float64)
    if rs.kind == "linear":
        t = t / rs.factor
    angles = torch.outer(t, inv)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, wqkv: Linear, wo: Linear, fused: bool = False):
        super().__init__()
        self.args, self.wqkv, self.wo = args, wqkv, wo
        self.split = [args.q_dim + args.kv_dim, args.kv_dim]  # [q | k] (roped together), v
        self.scale = 1.0 / math.sqrt(args.head_dim)
        # packed fp32 stages: a decode row's RoPE, cache write and attention in one kernel call
        self.fused = fused and args.head_dim % 16 == 0

    def forward(
        self, x: Tensor, freqs_cis: Tensor, caches: list[tuple[Tensor, Tensor]], spans: Spans
    ) -> Tensor:
        """x: the rows of every session in the batch; projections run over all of them, attention
        per session over its own cache (spans: each session's (position, rows))."""
        a, N, wide = self.args, x.shape[0], is_wide(spans)
        if self.fused and len(spans) == N:  # decode rows only: one per session (where the whole
            # block cannot run in one call, Stage._forward's usual path: e.g. replaced weights)
            rot = torch.view_as_real(freqs_cis if freqs_cis.dim() == 2 else freqs_cis[:, 0])
            qkv = self.wqkv(x)
            outs = [
                attend_decode(qkv[i], rot[i], k_cache, v_cache, pos, a.n_heads, self.scale)
                for i, ((k_cache, v_cache), (pos, _)) in enumerate(zip(caches, spans, strict=True))
            ]
            return self.wo(torch.cat(outs))
        qk, v = self.wqkv(x, wide).split(self.split, dim=-1)
        # q and k are adjacent columns: one RoPE call rotates both (elementwise, the same bits).
        qk = apply_rope(qk.view(N, a.n_heads + a.n_kv_heads, a.head_dim), freqs_cis)
        q, k = qk.split([a.n_heads, a.n_kv_heads], dim=1)
        v = v.view(N, a.n_kv_heads, a.head_dim)
        if len(spans) == 1:  # one session (every decode step of a single stream): no slicing
            return self.wo(self._attend(q, k, v, *caches[0], spans[0][0]), wide)
        outs, row = [], 0
        for (k_cache, v_cache), (pos, S) in zip(caches, spans, strict=True):
            rows = slice(row, row + S)
            outs.append(self._attend(q[rows], k[rows], v[rows], k_cache, v_cache, pos))
            row += S
        return self.wo(torch.cat(outs))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
        """One session's S rows at positions pos.. against its cache: [S, q_dim]."""
        a, S = self.args, q.shape[0]
        T = pos + S
        k_cache[:, pos:T] = k.transpose(0, 1)
        v_cache[:, pos:T] = v.transpose(0, 1)
        keys, values = k_cache[:, :T], v_cache[:, :T]
        if S == 1:  # decode: group the query heads of each KV head; no mask, no K/V copies
            scores = torch.bmm(q.view(a.n_kv_heads, a.n_rep, a.head_dim), keys.transpose(1, 2))
            p = torch.softmax(scores * self.scale, dim=-1, dtype=torch.float32)
            return torch.bmm(p if q.dtype == torch.float32 else p.to(q.dtype), values).view(1, a.q_dim)
        keys, values = keys.repeat_interleave(a.n_rep, 0), values.repeat_interleave(a.n_rep, 0)
        mask = None
        if pos:  # continuing a cache: query i sees keys 0..pos+i
            mask = torch.arange(T, device=q.device)[None, :] <= torch.arange(pos, T, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=not pos)
        return o.transpose(0, 1).reshape(S, a.q_dim)


class FeedForward(nn.Module):
    def __init__(self, w13: Linear, w2: Linear, fused: bool = False):
        super().__init__()
        self.w13, self.w2, self.fused = w13, w2, fused  # fused: the kernel's SwiGLU (packed fp32)

    def forward(self, x: Tensor, wide: bool = False) -> Tensor:
        if self.fused:
            return self.w2(swiglu(self.w13(x, wide)), wide)
        gate, up = self.w13(x, wide).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up, wide)


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: FeedForward):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        self.find_decode_weights()

    def find_decode_weights(self) -> None:
        """Packed fp32 blocks whose every part runs in the strict kernel do decode rows in one
        kernel call (cpu_kernel.decode_layers, the same ops as forward; Stage._forward uses it
        when every block can); call again after changing the weights."""
        parts = (self.attn_norm, self.attn, self.ffn_norm, self.ffn)
        linears = [self.attn.wqkv, self.attn.wo, self.ffn.w13, self.ffn.w2]
        ok = all(p.fused for p in parts) and all(
            lin.packed is not None and all(isinstance(s, QuantSegment) for s in lin.packed) for lin in linears
        )
        self.decode = None
        if ok:
            segments = [lin.packed for lin in linears]
            a, norm = self.attn.args, self.attn_norm
            self.decode = BlockWeights.of(
                norm.weight, self.ffn_norm.weight, norm.eps, segments, a.n_heads, self.attn.scale
            )

    def forward(
        self, x: Tensor, freqs_cis: Tensor, caches: list[tuple[Tensor, Tensor]], spans: Spans
    ) -> Tensor:
        # The residual stream stays fp32 whatever the compute dtype (as llama.cpp does): hidden
        # states reach |x| ~ 800, where fp16/bf16 sums would lose most of the honest precision.
        # fp32 + fp16/bf16 promotes: the sum is computed in fp32, the same bits as adding .float()
        # copies, without making them; h is this call's own tensor, so the second add is in place.
        h = x + self.attn(self.attn_norm(x), freqs_cis, caches, spans)
        return h.add_(self.ffn(self.ffn_norm(h), is_wide(spans)))


class Embedding(nn.Module):
    """Token rows dequantized on demand from the memory-mapped GGUF (never the whole table)."""

    def __init__(self, gguf: GGUFModel, device: str):
        super().__init__()
        self.gguf, self.device = gguf, device

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.gguf.dequantize("token_embd.weight", rows=ids.cpu().numpy())
        return torch.from_numpy(rows).to(device=self.device)


# --- weight loading -------------------------------------------------------------------


def _runs(gguf: GGUFModel, names: list[str], form: dict) -> list[list[str]]:
    """The names in runs of consecutive matrices whose quantization types map to one form
    (`form`: type name -> form): each run becomes one segment."""
    runs: list[list[str]] = []
    for name in names:
        key = form[gguf.tensor(name).tensor_type.name]
        if runs and form[gguf.tensor(runs[-1][0]).tensor_type.name] == key:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


def _packed(gguf: GGUFModel, names: list[str]) -> Linear:
    """GGUF matrices (fused by rows) as int4 segments: consecutive ones of one layout share a matmul.
    Each segment is allocated once and every matrix packed straight into its rows (concatenating
    packed parts held both copies at once), and a matrix's file pages are dropped chunk by chunk
    as they are packed (the 8B's Q6_K head is 0.43 GB of them)."""
    cache, rows = gguf.pack_cache, sum(int(gguf.tensor(n).shape[1]) for n in names)
    if cache is not None and (cached := cache.load(gguf.path, names, rows)) is not None:
        return Linear(packed=cached)
    segments: list[Int4Segment] = []
    for group in _runs(gguf, names, LAYOUTS):
        raws = [gguf.raw(name) for name in group]
        kinds = [gguf.tensor(name).tensor_type.name for name in group]
        k2 = packed_codes(kinds[0], raws[0].shape[1])  # one layout and input width: one K'
        n = sum(r.shape[0] for r in raws)
        weight = torch.empty(n, k2 // 2, dtype=torch.uint8)
        sz = torch.empty(k2 // 32, n, 2, dtype=torch.bfloat16)
        at = 0
        for name, raw, kind in zip(group, raws, kinds, strict=True):
            rows = slice(at, at + raw.shape[0])
            pack_into(raw, kind, weight[rows], sz[:, rows], lambda r, name=name: gguf.release(name, r))
            gguf.release(name)
            at = rows.stop
        segments.append(Int4Segment(weight, sz, LAYOUTS[kinds[0]]))
    if cache is not None:
        cache.save(gguf.path, names, segments)
    return Linear(packed=segments)


def _quantized(gguf: GGUFModel, names: list[str]) -> Linear:
    """GGUF matrices (fused by rows) in the strict kernel's forms (cpu_kernel.py); consecutive
    matrices of one form share a segment, filled in place chunk by chunk as _packed does."""
    cache, rows = gguf.pack_cache, sum(int(gguf.tensor(n).shape[1]) for n in names)
    if cache is not None and (cached := cache.load(gguf.path, names, rows, "fp32")) is not None:
        return Linear(packed=cached)
    segments: list[QuantSegment] = []
    for group in _runs(gguf, names, FORMS):
        cols = int(gguf.tensor(group[0]).shape[0])
        n = sum(int(gguf.tensor(name).shape[1]) for name in group)
        seg, at = empty_segment(gguf.tensor(group[0]).tensor_type.name, n, cols), 0
        for name in group:
            raw, kind = gguf.raw(name), gguf.tensor(name).tensor_type.name
            r = slice(at, at + raw.shape[0])
            part = QuantSegment(seg.codes[r], seg.scale[r], None if seg.zero is None else seg.zero[r])
            pack_rows_into(raw, kind, part, lambda rr, name=name: gguf.release(name, rr))
            gguf.release(name)
            at = r.stop
        segments.append(seg)
    if cache is not None:
        cache.save(gguf.path, names, segments)
    return Linear(packed=segments)


def _dense(gguf: GGUFModel, names: list[str], spec: StageSpec) -> Tensor:
    """The row-concatenation of GGUF matrices in the compute dtype, filled in row chunks on the
    device (never a whole fp32 copy in host memory, nor a whole matrix's file pages)."""
    rows = [int(gguf.tensor(n).shape[1]) for n in names]
    cols = int(gguf.tensor(names[0]).shape[0])
    w = torch.empty(sum(rows), cols, dtype=spec.torch_dtype, device=spec.device)
    at, step = 0, max(1, CHUNK_CODES // cols)
    for name, n in zip(names, rows, strict=True):
        for r in range(0, n, step):
            chunk = slice(r, min(r + step, n))
            part = gguf.dequantize(name, rows=chunk)
            w[at + r : at + r + part.shape[0]] = torch.from_numpy(part)
            gguf.release(name, chunk)
        at += n
        gguf.release(name)
    return w


def _linear(gguf: GGUFModel, names: list[str], spec: StageSpec) -> Linear:
    """One Linear over the row-concatenation of GGUF matrices (fused QKV / gate-up); packed int4
    where asked, except for float matrices (kept dense: bf16 is their compact form)."""
    if is_packed(gguf, names, spec):
        return _quantized(gguf, names) if spec.dtype == "fp32" else _packed(gguf, names)
    return Linear(weight=_dense(gguf, names, spec))


def _norm(gguf: GGUFModel, name: str, spec: StageSpec) -> RMSNorm:
    weight = torch.from_numpy(gguf.dequantize(name)).to(spec.device)
    fused = spec.packed and spec.dtype == "fp32" and weight.shape[0] % 16 == 0
    return RMSNorm(weight, gguf.args.norm_eps, spec.torch_dtype, fused)


def load_block(gguf: GGUFModel, i: int, spec: StageSpec) -> Block:
    """Transformer block i with QKV and gate/up fused into single matmuls."""
    p, args = f"blk.{i}.", gguf.args
    attn = Attention(
        args,
        _linear(gguf, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], spec),
        _linear(gguf, [p + "attn_output.weight"], spec),
        fused=spec.packed and spec.dtype == "fp32",
    )
    ffn = FeedForward(
        _linear(gguf, [p + "ffn_gate.weight", p + "ffn_up.weight"], spec),
        _linear(gguf, [p + "ffn_down.weight"], spec),
        fused=spec.packed and spec.dtype == "fp32",
    )
    return Block(
        _norm(gguf, p + "attn_norm.weight", spec), attn, _norm(gguf, p + "ffn_norm.weight", spec), ffn
    )


def check_spec(gguf: GGUFModel, spec: StageSpec) -> None:
    """Everything that can refuse a stage, before any weight is read: nothing is ever half-loaded."""
    n = gguf.args.n_layers
    if not 0 <= spec.start < spec.end <= n:
        raise ConsortiumError(
            f"invalid layer range {spec.start}-{spec.end} for a model of {n} layers "
            f"(half-open: 0 <= start < end <= {n})"
        )
    if spec.dtype not in DTYPES:
        raise ConsortiumError(f"unknown dtype {spec.dtype!r} (use {', '.join(DTYPES)})")
    if spec.packed and (spec.device != "cpu" or spec.dtype not in ("fp32", "bf16")):
        raise ConsortiumError("packed weights need --device cpu and --dtype fp32 (strict) or bf16")
    if spec.packed and spec.dtype == "bf16" and int4_mm is None:
        raise ConsortiumError(f"packed bf16 weights need a newer PyTorch than {torch.__version__}")
    if spec.packed and spec.dtype == "fp32":
        kernel()  # built (or a clear error) before any weight is read
    check_compact(gguf, spec)
    check_memory(gguf, spec)


class Stage(nn.Module):
    """Layers [start, end) of a model; the first stage embeds tokens, the last applies the head."""

    def __init__(self, gguf: GGUFModel, spec: StageSpec, progress: Callable[[int, int], None] | None = None):
        super().__init__()
        check_spec(gguf, spec)
        args = gguf.args
        self.args, self.spec, self.gguf = args, spec, gguf
        dev = spec.device

        self.embed = Embedding(gguf, dev) if spec.start == 0 else None
        blocks = []
        for i in range(spec.start, spec.end):
            blocks.append(load_block(gguf, i, spec))
            if progress is not None:  # (layers loaded, layers to load): a standby's on-demand load
                progress(len(blocks), spec.end - spec.start)
        self.layers = nn.ModuleList(blocks)
        self.is_last = spec.end == args.n_layers
        if self.is_last:
            self.norm = _norm(gguf, "output_norm.weight", spec)
            self.output = _linear(gguf, ["token_embd.weight" if args.tied_head else "output.weight"], spec)
        factors = gguf.dequantize("rope_freqs.weight") if gguf.has("rope_freqs.weight") else None
        self.freqs_cis = rope_freqs(args, factors).to(dev)

    @property
    def n_layers(self) -> int:
        return self.spec.end - self.spec.start

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    def new_cache(self, capacity: int) -> KVCache:
        if not 0 < capacity <= self.args.context_length:
            raise CacheError(
                f"cache capacity {capacity} outside 1..{self.args.context_length} (model context)"
            )
        return KVCache(self.args, self.n_layers, capacity, self.spec.torch_dtype, self.spec.device)

    @torch.inference_mode()
    def forward(self, x: Tensor, cache: KVCache, all_logits: bool = False) -> Tensor:
        """x: token ids [S] (first stage) or hidden states [S, dim]. Returns the fp32 residual
        stream [S, dim], or fp32 logits ([S, vocab] if all_logits else [1, vocab]) on the last
        stage. Positions are cache.length .. cache.length + S - 1."""
        return self._forward([x], [cache], [all_logits])[0]

    @torch.inference_mode()
    def forward_batch(
        self, xs: list[Tensor], caches: list[KVCache], all_logits: list[bool] | None = None
    ) -> list[Tensor]:
        """Several sessions in one pass (continuous batching): each session's rows as `forward`
        would compute them, with the linear layers run once over all rows and attention per
        session over its own cache. A row's result depends only on its session where the
        kernels are batch-invariant (`batch_invariant`)."""
        return self._forward(xs, caches, all_logits or [False] * len(xs))

    def _forward(self, xs: list[Tensor], caches: list[KVCache], all_logits: list[bool]) -> list[Tensor]:
        spans = self._spans(xs, caches)
        if len(xs) > 1 and any(S >= WIDE_ROWS for _, S in spans):
            # a prefill batched with decode rows: computed on its own, as it would be alone (fp16's
            # wide path), and the decode rows together (the packed stage's one-call decode path)
            big = [i for i, (_, S) in enumerate(spans) if S >= WIDE_ROWS]
            out: list[Tensor | None] = [None] * len(xs)
            for i in big:
                out[i] = self._forward([xs[i]], [caches[i]], [all_logits[i]])[0]
            rest = [i for i in range(len(xs)) if i not in big]
            if rest:
                done = self._forward(
                    [xs[i] for i in rest], [caches[i] for i in rest], [all_logits[i] for i in rest]
                )
                for i, t in zip(rest, done, strict=True):
                    out[i] = t
            return out  # type: ignore[return-value]
        one = len(xs) == 1  # one session (a single stream's every step): no concatenating, no splitting
        x = xs[0] if one else torch.cat(xs)  # never modified in place (Block adds into its own h)
        x = self.embed(x) if self.embed is not None else x.to(self.spec.device, torch.float32).contiguous()
        freqs = [self.freqs_cis[p : p + S] for p, S in spans]
        rows_cis = freqs[0] if one else torch.cat(freqs)  # every row's rotation
        blocks = [layer.decode for layer in self.layers]
        if len(spans) == x.shape[0] and blocks and None not in blocks:  # decode rows: one kernel call
            rot = torch.view_as_real(rows_cis)
            x = decode_layers(x, blocks, rot, [(c.k, c.v) for c in caches], [p for p, _ in spans])
        else:
            freqs_cis = rows_cis[:, None, :]  # broadcast over heads, once
            for i, layer in enumerate(self.layers):
                x = layer(x, freqs_cis, [(c.k[i], c.v[i]) for c in caches], spans)
        for c, (p, S) in zip(caches, spans, strict=True):
            c.length = p + S
        if one and not self.is_last:
            return [x]
        ends = np.cumsum([S for _, S in spans]).tolist()
        if not self.is_last:
            return list(x.tensor_split(ends[:-1]))
        keep = [
            slice(e - S, e) if full else slice(e - 1, e)
            for (_, S), e, full in zip(spans, ends, all_logits, strict=True)
        ]
        if one:
            return [self.output(self.norm(x[keep[0]]), is_wide(spans) and all_logits[0]).float()]
        logits = self.output(self.norm(torch.cat([x[k] for k in keep]))).float()
        return list(logits.tensor_split(np.cumsum([k.stop - k.start for k in keep])[:-1].tolist()))

    def _spans(self, xs: list[Tensor], caches: list[KVCache]) -> Spans:
        """Each session's (position, rows), checked: rows to compute, within its capacity, and
        no cache twice in one batch."""
        if len(xs) != len(caches) or not xs:
            raise InvalidRequestError(f"{len(xs)} inputs for {len(caches)} caches")
        if len({id(c) for c in caches}) != len(caches):
            raise InvalidRequestError("a session appears twice in one batch")
        spans = []
        for x, c in zip(xs, caches, strict=True):
            pos, S = c.length, x.shape[0]
            if S == 0:
                raise InvalidRequestError("no positions to compute")
            if pos + S > c.capacity:
                raise CacheError(
                    f"positions {pos}..{pos + S - 1} exceed the session's cache capacity {c.capacity}"
                )
            spans.append((pos, S))
        return spans

    @functools.cached_property
    def batch_invariant(self) -> bool:
        """Whether this stage's matmuls give a row the same bits alone as in a batch (checked once,
        on its own weights). Then batching sessions changes no session's result; otherwise (e.g.
        MKL's fp32 gemv vs gemm) a runner computes a batch's sessions one by one."""
        a, block = self.args, self.layers[0]
        linears = [(block.attn.wqkv, a.dim), (block.attn.wo, a.q_dim), (block.ffn.w13, a.dim)]
        linears.append((block.ffn.w2, a.ffn_dim))
        if self.is_last:
            linears.append((self.output, a.dim))
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for lin, cols in linears:
                x = torch.randn(8, cols, generator=g).to(device=self.spec.device, dtype=self.spec.torch_dtype)
                full = lin(x)
                for rows in (slice(0, 1), slice(3, 4), slice(0, 3), slice(2, 7)):
                    if not torch.equal(lin(x[rows]), full[rows]):
                        return False
        return True
