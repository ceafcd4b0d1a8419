"""GPU check (run by gpu_check.sh on a CUDA machine; CI has none). One JSON:

- numerics: greedy tokens and prefill logits of a synthesised llama3.2-1b Q4_K_M on CUDA fp16/bf16
  against CPU fp32, and seeded sampling at temperature 0.7 from CUDA logits (sample() on CPU);
- speed: load time, prefill/decode tok/s and peak GPU memory of the 8B Q4_K_M shape per dtype,
  and decode against the memory-bandwidth limit for the weights' bytes (measured copy bandwidth);
- a CUDA worker in a CPU pipeline with every unit audited (failed audits must be 0);
- batching: whether the CUDA fp16 stage is batch-invariant (cuBLAS may pick another kernel for
  more rows), aggregate decode tok/s of 1, 8 and 32 sessions in one forward, and whether each
  batched session's greedy tokens equal its run alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from bench_single import common_prefix

from consortium.model.generate import generate, load_single_node
from consortium.model.sampling import SamplingParams
from consortium.model.synth import synth

PROMPT = "Explain in one paragraph why the sky appears blue."


def _model(cache: Path, shape: str, layers: int | None = None) -> Path:
    path = cache / f"{shape}-q4_k_m-{layers or 'all'}.gguf"
    return path if path.is_file() else synth(shape, "q4_k_m", path, layers=layers)


def _run(path: Path, device: str, dtype: str, sampling: SamplingParams, n: int) -> dict[str, Any]:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _, stage, tok = load_single_node(str(path), device, dtype, progress=lambda *_: None)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    ids = tok.encode_prompt(PROMPT, chat=True)
    logits = stage(torch.tensor(ids), stage.new_cache(len(ids)), all_logits=True).float().cpu()
    res = generate(stage, tok, ids, n, sampling)
    out = {"load_s": round(load_s, 2), "tokens": res.tokens, "decode_tps": round(res.tokens_per_second, 2)}
    out |= {"prefill_s": round(res.time_to_first_token_s, 3), "logits": logits}
    if cuda:
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def numerics(cache: Path, n: int) -> dict[str, Any]:
    path = _model(cache, "llama3.2-1b")
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.7, top_k=50, seed=5)
    ref = _run(path, "cpu", "fp32", greedy, n)
    ref_sampled = _run(path, "cpu", "fp32", sampled, n)["tokens"]
    out: dict[str, Any] = {"model": path.name, "cpu_fp32_tokens": ref["tokens"]}
    for dtype in ("fp32", "fp16", "bf16"):
        r = _run(path, "cuda", dtype, greedy, n)
        same = common_prefix(r["tokens"], ref["tokens"])
        rel = float((r["logits"] - ref["logits"]).norm() / ref["logits"].norm())
        s = _run(path, "cuda", dtype, sampled, n)["tokens"]
        out[dtype] = {"greedy_common_prefix": same, "prefill_logits_rel_l2": rel, "sampled_tokens": s}
        out[dtype]["sampled_common_prefix_vs_cpu"] = common_prefix(s, ref_sampled)
    return out


def copy_bandwidth_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e9  # read + write


def speed(cache: Path, n: int) -> dict[str, Any]:
    path = _model(cache, "llama3-8b")
    bw = copy_bandwidth_gbs()
    out: dict[str, Any] = {"model": path.name, "copy_bandwidth_gbs": round(bw, 1)}
    for dtype in ("fp16", "bf16"):
        r = _run(path, "cuda", dtype, SamplingParams(), n)
        r.pop("logits")
        r.pop("tokens")
        weight_gb = 8.03e9 * 2 / 1e9  # all matrices dense in 2 bytes (the embedding stays on the host)
        r["bandwidth_limit_tps"] = round(bw / weight_gb, 1)
        r["fraction_of_limit"] = round(r["decode_tps"] / r["bandwidth_limit_tps"], 3)
        out[dtype] = r
        torch.cuda.empty_cache()
    return out


def cuda_worker_in_cpu_pipeline(cache: Path, n: int) -> dict[str, Any]:
    from consortium.coordinator.client import Client
    from consortium.coordinator.launcher import LocalCluster
    from consortium.core.config import LayerRange, SessionRequest

    path = _model(cache, "llama3.2-1b", layers=4)
    with tempfile.TemporaryDirectory() as logs:
        cluster = LocalCluster(path, LayerRange(2, 4), [LayerRange(0, 2)], Path(logs))
        cluster.worker_args = [["--device", "cuda", "--dtype", "fp16"]]
        cluster.start(timeout_s=600)
        try:
            with Client(cluster.client_config()) as client:
                report = client.run(SessionRequest(PROMPT, n, audit_probability=1.0))
        finally:
            cluster.stop()
    a = report.audits
    return {"tokens": report.tokens, "audits": {"total": a.total, "passed": a.passed, "failed": a.failed}}


def batching(cache: Path, n: int, device: str = "cuda") -> dict[str, Any]:
    path = _model(cache, "llama3.2-1b")
    _, stage, tok = load_single_node(str(path), device, "fp16", progress=lambda *_: None)
    prompts = [tok.encode_prompt(f"{PROMPT} ({i})", chat=True) for i in range(32)]
    out: dict[str, Any] = {"batch_invariant": stage.batch_invariant}
    alone = [generate(stage, tok, p, n, SamplingParams()).tokens for p in prompts[:8]]
    for size in (1, 8, 32):
        caches = [stage.new_cache(len(p) + n) for p in prompts[:size]]
        logits = stage.forward_batch([torch.tensor(p) for p in prompts[:size]], caches)
        tokens = [[int(x[-1].argmax())] for x in logits]
        t = time.perf_counter()
        for _ in range(n - 1):
            logits = stage.forward_batch([torch.tensor(ts[-1:]) for ts in tokens], caches)
            for ts, x in zip(tokens, logits, strict=True):
                ts.append(int(x[-1].argmax()))
        if device == "cuda":
            torch.cuda.synchronize()
        out[f"sessions_{size}_tps"] = round(size * (n - 1) / (time.perf_counter() - t), 1)
        if size == 8:  # ignoring EOS, as alone's tokens stop at it
            out["batched_equal_alone"] = [ts[: len(a)] == a for ts, a in zip(tokens, alone, strict=True)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/consortium-gpu-check"))
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    # cheapest first: the 8B's synthesis and two dense loads come last, so a short lease still
    # brings back the numerics, the pipeline and batching
    checks = (("numerics", numerics), ("pipeline", cuda_worker_in_cpu_pipeline), ("batching", batching))
    for name, fn in (*checks, ("speed_8b", speed)):
        t = time.perf_counter()
        try:
            res[name] = fn(a.cache_dir, a.tokens)
        except Exception:  # one failing part must not hide the others' figures
            res[name] = {"error": traceback.format_exc()[-2000:]}
        res[name]["seconds"] = round(time.perf_counter() - t, 1)
        a.out.write_text(json.dumps(res, indent=2, default=str))
        print(f"gpu_check: {name} done in {res[name]['seconds']} s", flush=True)
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
