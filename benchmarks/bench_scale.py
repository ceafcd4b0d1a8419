"""Scale benchmark on the seed's model shape: a synthesised Llama-3-8B Q4_K_M (no download).

One run writes one JSON: the file (synthesised into --cache-dir, or reused), llama.cpp and our
single node in its fastest honest mode (bf16 + packed int4: every Q4_K_M matrix keeps its codes)
side by side, each in its own subprocess (bench_single's runners: load time, greedy prefill and
decode tok/s, peak RSS), their ratios against the issue's goals, the per-format kernel timings
that chose the mode, and with --cluster the seed topology as 3 local processes (coordinator
22-32 + head, workers 0-11 and 11-22, audits at --audit-probability).

    .venv/bin/python benchmarks/bench_scale.py --out results/bench_scale.json [--cluster]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench_single as single  # noqa: E402  (its child runners and machine helpers)

SHAPE, QUANT = "llama3-8b", "q4_k_m"
GOALS = {"decode_vs_llama_cpp": 0.5, "load_vs_llama_cpp_max": 5.0, "peak_rss_vs_llama_cpp_max": 1.3}
GOALS |= {"cluster_vs_single_node": 0.8, "process_rss_gb_max": 12.0, "cluster_rss_gb_max": 16.0, "tok_s": 2.0}


def model_file(cache: Path, seed: int) -> tuple[Path, float | None]:
    """The synthesised 8B (made once; the seconds it took, or None when reused)."""
    from consortium.model.synth import synth

    path = cache / f"{SHAPE}-{QUANT}-s{seed}.gguf"
    if path.is_file():
        return path, None
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    synth(SHAPE, QUANT, path, seed)
    return path, time.perf_counter() - t


def _ms(fn, reps: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return round((time.perf_counter() - t) / reps * 1e3, 2)


def _kernel_row(kind: str, n: int, k: int) -> dict[str, float]:
    """ms of one synthesised n x k matrix, packed int4 vs dense bf16, for 1 (decode) and 16 rows."""
    import numpy as np
    import torch

    from consortium.model import quants, synth

    rng = np.random.default_rng(0)
    bits, centre = synth.CENTERS[synth.Q[kind]]
    codes = synth.code_table(bits, centre)[0][rng.integers(0, 256, (n, k), dtype=np.uint8)]
    packed, sz = quants.pack(
        synth.encode(synth.Q[kind], codes, np.full((n, k // 32), 1e-3, np.float32)), kind
    )
    dense = torch.randn(n, k).bfloat16()
    out = {}
    layout = quants.LAYOUTS[kind]
    for m in (1, 16):
        x = torch.randn(m, k).bfloat16()
        out[f"{kind} {n}x{k} M={m} packed"] = _ms(lambda x=x: quants.int4_matmul(x, packed, sz, layout))
        out[f"{kind} {n}x{k} M={m} dense_bf16"] = _ms(lambda x=x: torch.nn.functional.linear(x, dense))
    return out


def kernels(threads: int) -> dict[str, float]:
    """The measurement that picks the mode: the 8B's ffn_down and gate shapes in its formats."""
    import torch

    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    for kind in ("Q4_K", "Q6_K", "Q8_0"):
        for n, k in ((4096, 14336), (14336, 4096)):
            out |= _kernel_row(kind, n, k)
    return out


def run_cluster(
    model: Path,
    tokens: int,
    probability: float,
    single_tps: float | None,
    threads: int = 0,
    coverage: str = "full",
    sessions: int = 1,
) -> dict[str, Any]:
    """The seed topology as 3 local processes; startup, tok/s, peak RSS per process, audits."""
    from consortium.coordinator.client import Client
    from consortium.coordinator.launcher import LocalCluster
    from consortium.core.config import EngineConfig, LayerRange, SessionRequest

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as logs:
        ranges = [LayerRange(0, 11), LayerRange(11, 22)]
        engine = EngineConfig("cpu", "bf16", True, threads)  # 0: the machine's cores split among them
        cluster = LocalCluster(model, LayerRange(22, 32), ranges, Path(logs), engine=engine)
        t = time.perf_counter()
        try:
            cluster.start(timeout_s=900)
            startup = time.perf_counter() - t
            with Client(cluster.client_config()) as client:
                req = SessionRequest(
                    single.PROMPT, tokens, audit_probability=probability, audit_coverage=coverage
                )
                runs = []
                for _ in range(sessions):  # one after another: each its own draw of audits
                    t_run = time.perf_counter()
                    report = client.run(req)  # returns once its audits have settled
                    runs.append((report, time.perf_counter() - t_run))
            peaks = {p.name: _peak_rss_gb(p.pid) for p in cluster.processes}
            shares = {p.name: _pss_gb(p.pid) for p in cluster.processes}
        finally:
            cluster.stop()
    decode = [r.tokens_per_second for r, _ in runs]
    # the whole request: prefill, decode and the wait for its audits (sampled coverage audits at the end)
    whole = [len(r.tokens) / s for r, s in runs]
    res = {"startup_s": round(startup, 1), "decode_tps": sum(decode) / len(decode), "peak_rss_gb": peaks}
    res |= {"sessions": sessions, "decode_tps_each": [round(d, 3) for d in decode]}
    res |= {"audit_coverage": coverage, "end_to_end_tps": round(sum(whole) / len(whole), 3)}
    res["end_to_end_tps_each"] = [round(w, 3) for w in whole]
    res |= {
        "threads_per_process": cluster.engine.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    res["audits"] = {
        k: sum(getattr(r.audits, k) for r, _ in runs) for k in ("total", "passed", "failed", "pending")
    }
    res["rss_total_gb"] = round(sum(v for v in peaks.values() if v), 2)
    # Beside the peak-RSS headline: each process's proportional share at the end of the run, which
    # splits pages the processes share (torch's libraries, the model file's page cache) among them.
    res["pss_end_gb"] = shares
    res["pss_end_total_gb"] = round(sum(v for v in shares.values() if v), 2)
    if single_tps:
        res["vs_single_node"] = round(res["decode_tps"] / single_tps, 3)
    return res


def _peak_rss_gb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        return None
    return None


def _pss_gb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        return None
    return None


def engine_run(engine: str, mode: str, model: Path, prompt: list[int], a) -> dict[str, Any]:
    single.wait_quiet(a.quiet_wait)
    spec = {"engine": engine, "mode": mode, "model": str(model), "prompt": prompt}
    return single.run_child(spec | {"tokens": a.tokens, "threads": a.threads}, timeout=1200)


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    if "error" in ours or "error" in ref:
        return {}
    return {
        "decode_vs_llama_cpp": round(ours["decode_tps"] / ref["decode_tps"], 3),
        "decode_per_cpu_s_vs_llama_cpp": round(ours["decode_tps_per_cpu_s"] / ref["decode_tps_per_cpu_s"], 3),
        "prefill_vs_llama_cpp": round(ours["prefill_tps"] / ref["prefill_tps"], 3),
        "load_vs_llama_cpp": round(ours["load_s"] / ref["load_s"], 2),
        "peak_rss_vs_llama_cpp": round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 2),
        "same_greedy_tokens": ours.get("tokens") == ref.get("tokens"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = (
        Path(os.environ.get("CONSORTIUM_CACHE_DIR", Path.home() / ".cache" / "consortium")) / "synth"
    )
    p.add_argument("--cache-dir", type=Path, default=default_cache)
    p.add_argument("--out", type=Path, default=Path("results/bench_scale.json"))
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--quiet-wait", type=float, default=60, help="seconds to wait for a quiet machine per run")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--cluster", action="store_true", help="also run the 3-process seed topology")
    p.add_argument("--audit-probability", type=float, default=0.2)
    p.add_argument("--audit-coverage", choices=["full", "sampled"], default="full")
    p.add_argument("--cluster-sessions", type=int, default=1, help="sessions run one after another")
    p.add_argument(
        "--cluster-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads per cluster process (0: cores / 3); one session keeps one process busy at a time",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return single.child(json.loads(a.child))
    model, synth_s = model_file(a.cache_dir, a.seed)
    prompt = single.prompt_ids(str(model))
    res: dict[str, Any] = {
        "model": str(model),
        "file_gb": round(model.stat().st_size / 1e9, 3),
        "synth_s": synth_s,
    }
    res |= {
        "machine": single.machine_info(),
        "prompt_tokens": len(prompt),
        "tokens": a.tokens,
        "goals": GOALS,
    }
    if not a.no_kernels:
        res["kernels_ms"] = kernels(a.threads)
    if not a.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        res["llama.cpp"] = engine_run("llama.cpp", "default", model, prompt, a)
    from consortium.model.pack_cache import PackCache, default_root

    # a warm cache (an earlier run's packed weights on disk) maps instead of repacking: say which
    folder = PackCache(default_root()).folder(model)
    res["pack_cache_entries_before"] = len(list(folder.glob("*.pt"))) if folder.is_dir() else 0
    res["consortium"] = engine_run("consortium", "bf16+packed", model, prompt, a)
    res["ratios"] = compare(res["consortium"], res.get("llama.cpp", {"error": "not run"}))
    for r in (res["consortium"], res.get("llama.cpp", {})):
        r.pop("tokens", None)
    if a.cluster:
        res["seed_topology"] = run_cluster(
            model,
            a.tokens,
            a.audit_probability,
            res["consortium"].get("decode_tps"),
            a.cluster_threads,
            a.audit_coverage,
            a.cluster_sessions,
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("ratios", "kernels_ms") if k in res}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
