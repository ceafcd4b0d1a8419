"""What a stage will hold in memory, from tensor metadata alone, checked before anything loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil
import torch

from consortium.errors import ConsortiumError, UnsupportedModelError
from consortium.model.cpu_kernel import segment_bytes
from consortium.model.gguf_file import GGUFModel
from consortium.model.quants import FLOAT_TYPES, LAYOUTS, PACKABLE

if TYPE_CHECKING:
    from consortium.model.model import StageSpec

# The matrices one block loads, fused as load_block fuses them.
GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))
OVERHEAD = 512 << 20  # interpreter, torch and the transient buffers of a load (row chunks)
GiB = 1 << 30


def stage_matrices(gguf: GGUFModel, start: int, end: int) -> list[list[str]]:
    """The matrices of layers [start, end) as the stage fuses them, and the head on the last stage."""
    out = [[f"blk.{i}.{n}.weight" for n in g] for i in range(start, end) for g in GROUPS]
    if end == gguf.args.n_layers:
        out.append(["token_embd.weight" if gguf.args.tied_head else "output.weight"])
    return out


def is_packed(gguf: GGUFModel, names: list[str], spec: StageSpec) -> bool:
    """Whether these fused matrices load as int4: each in a packable format, in whole blocks of 64
    rows (the kernel's weight layout; every real model's matrices are)."""
    ts = [gguf.tensor(n) for n in names]
    return spec.packed and all(t.tensor_type.name in PACKABLE and int(t.shape[1]) % 64 == 0 for t in ts)


def linear_bytes(gguf: GGUFModel, names: list[str], spec: StageSpec) -> int:
    """Bytes of one loaded Linear: the strict kernel's forms (fp32), int4 codes plus bf16 scale and
    zero per 32 (bf16), or dense."""
    if not is_packed(gguf, names, spec):
        itemsize = torch.empty((), dtype=spec.torch_dtype).element_size()
        return sum(int(gguf.tensor(n).n_elements) for n in names) * itemsize
    if spec.dtype == "fp32":
        ts = [gguf.tensor(n) for n in names]
        return sum(segment_bytes(t.tensor_type.name, int(t.shape[1]), int(t.shape[0])) for t in ts)
    total = 0
    for n in names:
        t = gguf.tensor(n)
        k2 = int(t.shape[0]) * (1 if LAYOUTS[t.tensor_type.name] == "plain" else 2)
        total += int(t.shape[1]) * (k2 // 2 + k2 // 32 * 4)
    return total


def stage_bytes(gguf: GGUFModel, spec: StageSpec) -> int:
    """Weights, norms and RoPE table of a stage (KV caches are budgeted by their pool)."""
    a = gguf.args
    mats = sum(linear_bytes(gguf, g, spec) for g in stage_matrices(gguf, spec.start, spec.end))
    return mats + (2 * (spec.end - spec.start) + 1) * a.dim * 4 + a.context_length * a.rope_dim // 2 * 8


def available_bytes(device: str) -> int:
    """Free memory on the device (host RAM, including reclaimable page cache, for cpu and mps)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return int(psutil.virtual_memory().available)


def check_compact(gguf: GGUFModel, spec: StageSpec) -> None:
    """Packed mode covers the 4-8 bit formats of quants.py and float matrices; anything else is refused
    before loading (it would silently cost bf16's 2 bytes per weight)."""
    if not spec.packed:
        return
    for names in stage_matrices(gguf, spec.start, spec.end):
        for n in names:
            kind = gguf.tensor(n).tensor_type.name
            if kind not in PACKABLE | FLOAT_TYPES:
                raise UnsupportedModelError(
                    f"tensor {n} is {kind}: packed mode covers {', '.join(sorted(PACKABLE))} "
                    "(and float matrices); run it without --packed"
                )


def check_memory(gguf: GGUFModel, spec: StageSpec, available: int | None = None) -> int:
    """Refuse a stage that would not fit, naming both numbers; returns the estimate."""
    need = stage_bytes(gguf, spec) + OVERHEAD
    free = available_bytes(spec.device) if available is None else available
    if need > free:
        mode = spec.dtype + (" packed" if spec.packed else "")
        raise ConsortiumError(
            f"layers {spec.start}-{spec.end} of {gguf.path.name} ({mode}) need about {need / GiB:.2f} GiB "
            f"but only {free / GiB:.2f} GiB is available on {spec.device}"
        )
    return need
