"""Where a single-node decode token's time goes: kernels by category vs Python and dispatch.

For each mode (fp32, fp16, bf16, bf16+packed) it loads one stage of every layer, prefills the
benchmark prompt and then:

1. times --tokens one-token decode steps: wall and process-CPU ms per token (with --threads 1,
   the default, CPU time is what a token costs even on a shared machine);
2. times each piece of a step alone, in a tight loop over every layer on real shapes (the
   engine's own modules, a decode row, the cache at the prompt's length): matmul (dense Linear)
   or int4_mm (packed Linear with its input expansion), attention (cache writes, scores,
   softmax, values), rope, norm (both RMSNorms), residual (the fp32 adds and SiLU*up), head
   (final norm + output Linear), embed. Each includes its ops' dispatch;
3. splits off the overhead: python_ms = the step minus the pieces (module calls, argument
   handling, views and splits, the loop); dispatch_floor_ms = ops called from Python per token
   (counted with torch.profiler) x the cost of a trivial op (binding, dispatcher, allocation),
   which is inside the pieces' times. python_dispatch_share is their sum over the token time.

    .venv/bin/python benchmarks/profile_decode.py --modes fp16,bf16+packed --out results/profile_decode.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

MODES = {"fp32": ("fp32", False), "fp16": ("fp16", False), "bf16": ("bf16", False)}
MODES["bf16+packed"] = ("bf16", True)
PROMPT = "Explain in one paragraph why the sky appears blue."
CATEGORIES = ("matmul", "int4_mm", "attention", "rope", "norm", "residual", "head", "embed")


def dispatch_cost_us() -> float:
    """Wall time of one trivial aten op on a 1-element tensor (the floor of any op's cost)."""
    x = torch.zeros(1)
    with torch.inference_mode():
        for _ in range(1000):
            x.add_(0)
        t = time.perf_counter()
        for _ in range(20000):
            x.add_(0)
        return (time.perf_counter() - t) / 20000 * 1e6


def clock(threads: int) -> Callable[[], float]:
    return time.process_time if threads == 1 else time.perf_counter


def per_call_ms(fn: Callable[[], object], threads: int, n: int = 20, repeats: int = 5) -> float:
    """Best of `repeats` loops of n calls, ms per call."""
    now = clock(threads)
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = now()
        for _ in range(n):
            fn()
        best = min(best, (now() - t) / n * 1e3)
    return best


def python_ops(stage, prompt: list[int], n: int = 4) -> float:
    """Aten ops called from Python per decode step (torch.profiler: ops without an aten parent)."""
    cache = stage.new_cache(len(prompt) + n + 1)
    tok = int(stage(torch.tensor(prompt), cache).argmax())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            tok = int(stage(torch.tensor([tok]), cache).argmax())
    top = 0
    for ev in prof.events():
        parent = ev.cpu_parent
        top += ev.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))
    return top / n


def profile_mode(model: str, mode: str, n: int, threads: int, dispatch_us: float) -> dict[str, Any]:
    from consortium.model.gguf_file import GGUFModel
    from consortium.model.model import Stage, StageSpec, apply_rope
    from consortium.model.tokenizer import GGUFTokenizer

    dtype, packed = MODES[mode]
    gguf = GGUFModel(model)
    stage = Stage(gguf, StageSpec(0, gguf.args.n_layers, dtype=dtype, packed=packed))
    prompt = GGUFTokenizer(gguf).encode_prompt(PROMPT, chat=True)
    a, dt = stage.args, stage.spec.torch_dtype
    out: dict[str, Any] = {"mode": mode, "prompt_tokens": len(prompt)}

    def run(steps: int) -> tuple[float, float]:
        """(wall, process CPU) ms per decode step."""
        cache = stage.new_cache(len(prompt) + steps + 1)
        tok = int(stage(torch.tensor(prompt), cache).argmax())
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            tok = int(stage(torch.tensor([tok]), cache).argmax())
        return (time.perf_counter() - t) / steps * 1e3, (time.process_time() - c) / steps * 1e3

    run(4)  # warm-up: lazy init, page faults, kernel selection
    runs = [run(n) for _ in range(3)]
    out["wall_ms_per_token"] = min(w for w, _ in runs)
    out["cpu_ms_per_token"] = min(c for _, c in runs)
    base = out["cpu_ms_per_token"] if threads == 1 else out["wall_ms_per_token"]

    # The pieces, each over every layer on a decode row at position len(prompt).
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(1, a.dim, generator=g)
    x, h = x32.to(dt), torch.randn(1, a.ffn_dim, generator=g).to(dt)
    qkv = torch.randn(1, a.n_heads + 2 * a.n_kv_heads, a.head_dim, generator=g).to(dt)
    q, k, v = qkv.split([a.n_heads, a.n_kv_heads, a.n_kv_heads], dim=1)
    pos = len(prompt)
    cache = stage.new_cache(pos + 1)
    freqs = stage.freqs_cis[pos : pos + 1, None, :]
    L = list(stage.layers)
    linear = "int4_mm" if packed else "matmul"

    def each(f: Callable[[Any, int], object]) -> Callable[[], None]:
        def over_layers() -> None:
            for i, layer in enumerate(L):
                f(layer, i)

        return over_layers

    def linears(layer, i):
        layer.attn.wqkv(x), layer.attn.wo(x), layer.ffn.w13(x), layer.ffn.w2(h)

    with torch.inference_mode():
        pieces = {
            linear: each(linears),
            "attention": each(lambda layer, i: layer.attn._attend(q, k, v, cache.k[i], cache.v[i], pos)),
            "rope": each(lambda layer, i: apply_rope(qkv[:, : a.n_heads + a.n_kv_heads], freqs)),
            "norm": each(lambda layer, i: (layer.attn_norm(x32), layer.ffn_norm(x32))),
            "residual": each(lambda layer, i: ((x32 + x).add_(x), F.silu(h) * h)),
            "head": lambda: stage.output(stage.norm(x32)).float(),
            "embed": lambda: stage.embed(torch.tensor([5])),
        }
        op_ms = {c: per_call_ms(f, threads) for c, f in pieces.items()}
    out["op_ms_per_token"] = {c: round(op_ms.get(c, 0.0), 3) for c in CATEGORIES}
    out["ops_ms_per_token"] = sum(op_ms.values())
    out["python_ops_per_token"] = python_ops(stage, prompt)
    # What no piece contains: module calls, argument handling, views and splits, the loops.
    out["python_ms_per_token"] = max(0.0, base - out["ops_ms_per_token"])
    # The fixed cost of calling an op from Python (binding + dispatcher + allocation), which the
    # pieces' times include: ops called from Python x the cost of a trivial op.
    out["dispatch_floor_ms_per_token"] = out["python_ops_per_token"] * dispatch_us / 1e3
    out["python_dispatch_ms_per_token"] = out["python_ms_per_token"] + out["dispatch_floor_ms_per_token"]
    out["python_dispatch_share"] = out["python_dispatch_ms_per_token"] / base
    out["tokens_per_s"] = 1e3 / out["wall_ms_per_token"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the pulled SmolLM2-135M-Instruct)")
    ap.add_argument("--modes", default="fp16,bf16+packed")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed and profiled")
    ap.add_argument("--threads", type=int, default=1, help="1: shares over CPU time (robust to load)")
    ap.add_argument("--out", default="results/profile_decode.json")
    a = ap.parse_args()
    from consortium.model.files import default_model_path

    model = str(Path(a.model or default_model_path()).resolve())
    torch.set_num_threads(a.threads)
    dispatch_us = dispatch_cost_us()
    report: dict[str, Any] = {
        "settings": {"model": model, "tokens": a.tokens, "threads": a.threads, "torch": torch.__version__},
        "dispatch_us_per_trivial_op": dispatch_us,
        "modes": [],
    }
    for mode in a.modes.split(","):
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r} (use {', '.join(MODES)})")
        r = profile_mode(model, mode, a.tokens, a.threads, dispatch_us)
        report["modes"].append(r)
        print(json.dumps(r), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
