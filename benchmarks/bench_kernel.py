"""The strict kernel against the other engine modes on one node, side by side in one run: decode
tok/s of one session, and aggregate decode tok/s of N sessions in one forward (Stage.forward_batch,
the continuous batching path), per mode; plus whether each batched session's greedy tokens equal
its run alone. JSON out. Uses --model, else a synthesised SmolLM2-shaped Q4_0 file (no download).

    .venv/bin/python benchmarks/bench_kernel.py --out results/bench_kernel.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from consortium.model.generate import load_single_node
from consortium.model.synth import synth

MODES = {"fp32+packed": ("fp32", True), "fp16": ("fp16", False), "bf16+packed": ("bf16", True)}


def _decode(stage, sessions: int, steps: int) -> tuple[float, list[list[int]]]:
    """Aggregate tok/s of `sessions` greedy sessions decoding together, and their tokens."""
    prompts = [torch.tensor([1, 17 + i, 42, 7 + 3 * i, 99]) for i in range(sessions)]
    caches = [stage.new_cache(len(p) + steps + 1) for p in prompts]
    tokens = [[int(y[-1].argmax())] for y in stage.forward_batch(prompts, caches)]
    t = time.perf_counter()
    for _ in range(steps):
        ys = stage.forward_batch([torch.tensor(ts[-1:]) for ts in tokens], caches)
        for ts, y in zip(tokens, ys, strict=True):
            ts.append(int(y[-1].argmax()))
    return sessions * steps / (time.perf_counter() - t), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--out", type=Path, default=Path("results/bench_kernel.json"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--sessions", default="1,4,8,16")
    p.add_argument("--modes", default=",".join(MODES))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory()
    model = a.model or synth("smollm2-135m", "q4_0", Path(tmp.name) / "smollm2-q4_0.gguf")
    res: dict = {"model": str(model), "threads": a.threads, "cpu": platform.processor() or platform.machine()}
    for mode in a.modes.split(","):
        dtype, packed = MODES[mode]
        _, stage, _ = load_single_node(str(model), "cpu", dtype, packed, progress=lambda *_: None)
        _decode(stage, 1, 4)  # warm-up
        alone = [_decode(stage, 1, a.steps) for _ in range(2)]
        out = {"decode_tps": round(max(t for t, _ in alone), 1), "batched": {}}
        for n in map(int, a.sessions.split(",")):
            tps, tokens = _decode(stage, n, a.steps)
            out["batched"][n] = round(tps, 1)
            if n > 1:  # session 0's prompt is the one run alone
                out.setdefault("batched_equal_alone", []).append(tokens[0] == alone[0][1][0])
        res[mode] = out
        print(mode, json.dumps(out), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
