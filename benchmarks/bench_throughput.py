"""Throughput benchmark: N concurrent sessions on the demo cluster, against llama.cpp's single stream.

The cluster is the one `consortium demo` starts (launcher.demo_cluster: workers of the first and
middle layers, the coordinator the last with the head, three local processes; on 2 CPUs 0-9, 9-18
and 18-30, settings.topology says which), started once and kept
for every measurement. For each concurrency level N (--sessions) and each audit probability
(--audit-rates; it is per session, in the Generate request, so one cluster serves all rates)
N threads, each with its own Client (connected beforehand), start the same greedy, seeded
session at once (a barrier) and wait for its audits (wait_audits). Every session gets the same
chat-templated prompt and --tokens as max tokens; the engine has no ignore-EOS, so the prompt
asks for a long answer and the actual token counts are reported (stop reasons too).

Reported per (audit rate, N):

- aggregate tok/s: all generated tokens / wall time from the first request to the last session done
  (audits included: a session is done once its audits settled);
- per-session tok/s, mean and min: client-side (tokens / the session's own wall time, time to first
  token included) and the coordinator's decode tok/s (SessionSummary.tokens_per_second);
- time to first token (client-side, request sent to first token received): mean, p50, max;
- audits performed and failed (failed must be 0), rollbacks, failovers;
- per-hop overhead per stage: round trip minus the node's compute (SessionSummary.stages'
  mean_step_ms - mean_compute_ms, averaged over the sessions; under concurrency it includes queueing),
  and the mean batch a session's orders went in at each stage;
- process_busy_cores: the cores each of the cluster's processes kept busy (which one limits);
- whether every session produced the same tokens (they all run the same request);
- other_busy_cores: cores kept busy by processes outside this benchmark and its cluster (the
  machine is shared: a noise indicator).

In the same run, before the cluster starts, the references: llama.cpp's single-node single-stream
decode tok/s on the same GGUF and our single node (bench_single's child runners, each in its own
process, modes from --single-modes, --ref-tokens greedy tokens past EOS), over --ref-repeats
interleaved runs; the reference figure is the best undisturbed run's (the machine is shared, and
a busy core slows 2-thread decode many times over). Ratios: N-session aggregate / 1 session,
aggregate / llama.cpp, one demo session (its decode tok/s, as `consortium demo --json` reports
it) / llama.cpp, the cost of audits (1 - aggregate at the highest rate / at rate 0), and the
goals of issue 12.

    .venv/bin/python benchmarks/bench_throughput.py --out results/bench_throughput.json
    .venv/bin/python benchmarks/bench_throughput.py --sessions 1,2 --tokens 8 --audit-rates 0 --no-llama-cpp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench_single as single  # noqa: E402  (its child runners and machine helpers)

from consortium.coordinator.client import Client  # noqa: E402
from consortium.coordinator.launcher import DEMO_PROMPT, DemoConfig, LocalCluster, demo_cluster, demo_model  # noqa: E402
from consortium.core.config import SessionRequest  # noqa: E402
from consortium.model.sampling import SamplingParams  # noqa: E402

# Goals of issue 12 on the 2-core machine.
GOALS = {
    "single_node_vs_llama_cpp": 0.75,
    "one_demo_session_vs_llama_cpp": 0.35,
    "sessions_8_vs_1": 3.0,
    "sessions_8_vs_llama_cpp": 1.0,
    "audit_cost_max": 0.10,
}
WARMUP_TOKENS = 4


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# --- the references: single node, single stream ---------------------------------------------


def references(model: str, a: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp and our single node (bench_single's child, one process per engine, mode and
    run), interleaved over --ref-repeats rounds; decode_tps is the best undisturbed run's."""
    prompt = single.prompt_ids(model)
    configs = [("consortium", m) for m in a.single_modes.split(",") if m]
    for _, mode in configs:
        if mode not in single.CONSORTIUM_MODES:
            raise SystemExit(
                f"unknown --single-modes entry {mode!r} (use {', '.join(single.CONSORTIUM_MODES)})"
            )
    if a.no_llama_cpp:
        skipped = "disabled (--no-llama-cpp)"
    elif importlib.util.find_spec("llama_cpp") is None:
        skipped = "llama-cpp-python not installed (pip install -e '.[bench]')"
    else:
        skipped, configs = None, [("llama.cpp", "gguf"), *configs]
    out: dict[str, Any] = {"prompt_tokens": len(prompt), "tokens": a.ref_tokens, "threads": a.ref_threads}
    out["repeats"] = a.ref_repeats
    if skipped:
        out["llama.cpp"] = {"error": skipped}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in configs}
    for rep in range(a.ref_repeats):
        k = rep % max(1, len(configs))  # rotate, as bench_single does
        for engine, mode in configs[k:] + configs[:k]:
            spec = {"engine": engine, "mode": mode, "model": model, "prompt": prompt}
            spec |= {"tokens": a.ref_tokens, "threads": a.ref_threads}
            busy = single.wait_quiet(a.quiet_wait)
            r = single.run_child(spec, timeout=600)
            r["busy_cores_before"] = busy
            runs[(engine, mode)].append(r)
            msg = r.get("error") or (
                f"decode {r['decode_tps']:.1f} tok/s (other processes busy: {r['other_busy_cores']:.2f} cores)"
            )
            print(
                f"[{rep + 1}/{a.ref_repeats}] reference {engine} {mode}: {msg}", file=sys.stderr, flush=True
            )
    for (engine, mode), rs in runs.items():
        s = single.summarize((engine, mode), rs)
        s.pop("tokens", None)
        for r in s["runs"]:
            r.pop("tokens", None)
        if "error" not in s:
            s["decode_tps"], s["prefill_tps"] = s["decode_tps_best"], s["prefill_tps_best"]
        out["llama.cpp" if engine == "llama.cpp" else f"consortium {mode}"] = s
    return out


# --- the cluster: N concurrent sessions ------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit measured, and the files under src/ that differ from it (others' edits in progress)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src", "proto").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted_src_files": changed}


def cluster_cpu_s(cluster: LocalCluster) -> dict[str, float]:
    """CPU-seconds each of the cluster's processes has used (to tell their load from other
    processes', and to see which process is the bottleneck)."""
    import psutil

    out: dict[str, float] = {}
    for p in cluster.processes:
        try:
            t = psutil.Process(p.pid).cpu_times()
            out[p.name] = t.user + t.system
        except (psutil.Error, TypeError):
            pass
    return out


def run_sessions(cluster: LocalCluster, req: SessionRequest, n: int) -> dict[str, Any]:
    """N threads, one Client each (connected first), released together; per-session facts."""
    clients = [Client(cluster.client_config()) for _ in range(n)]
    try:
        for c in clients:
            c.stub  # noqa: B018  (connect and authenticate now, outside the timed part)
        barrier = threading.Barrier(n + 1)
        rows: list[dict[str, Any]] = [{} for _ in range(n)]

        def session(i: int) -> None:
            row = rows[i]
            first: list[float] = []

            def on_text(_text: str) -> None:
                if not first:
                    first.append(time.perf_counter())

            r = replace(req, audit_seed=None if req.audit_seed is None else req.audit_seed + i)
            barrier.wait()
            row["start"] = time.perf_counter()
            try:
                rep = clients[i].run(r, on_text=on_text)
            except Exception as e:  # noqa: BLE001  (reported, not raised: the others go on)
                row["error"] = f"{type(e).__name__}: {e}"
                row["done"] = time.perf_counter()
                return
            row["done"] = time.perf_counter()
            row["ttft_s"] = (first[0] if first else row["done"]) - row["start"]
            row["report"] = rep

        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        busy0, own0, clu0 = single.machine_busy_s(), single.own_cpu_s(), cluster_cpu_s(cluster)
        barrier.wait()
        for t in threads:
            t.join()
        busy1, own1, clu1 = single.machine_busy_s(), single.own_cpu_s(), cluster_cpu_s(cluster)
    finally:
        for c in clients:
            c.close()
    per_process = {k: clu1[k] - clu0[k] for k in clu1 if k in clu0}
    return summarize_sessions(rows, busy1 - busy0 - (own1 - own0) - sum(per_process.values()), per_process)


def summarize_sessions(
    rows: list[dict[str, Any]], other_cpu_s: float, process_cpu_s: dict[str, float] | None = None
) -> dict[str, Any]:
    ok = [r for r in rows if "report" in r]
    t0 = min(r["start"] for r in rows)
    wall = max(r["done"] for r in rows) - t0
    reports = [r["report"] for r in ok]
    total = sum(len(rep.tokens) for rep in reports)
    ttft = [r["ttft_s"] * 1000 for r in ok]
    client_tps = [len(r["report"].tokens) / (r["done"] - r["start"]) for r in ok]
    decode_tps = [rep.tokens_per_second for rep in reports]
    out: dict[str, Any] = {
        "sessions": len(rows),
        "failed_sessions": len(rows) - len(ok),
        "errors": sorted({r["error"] for r in rows if "error" in r}),
        "wall_s": round(wall, 3),
        "generated_tokens": total,
        "tokens_per_session": sorted({len(rep.tokens) for rep in reports}),
        "stop_reasons": sorted({rep.stop_reason for rep in reports}),
        "aggregate_tps": round(total / wall, 2) if wall > 0 else 0.0,
        "per_session_tps_mean": _round(_mean(client_tps)),
        "per_session_tps_min": _round(min(client_tps, default=None)),
        "per_session_decode_tps_mean": _round(_mean(decode_tps)),
        "per_session_decode_tps_min": _round(min(decode_tps, default=None)),
        "ttft_ms_mean": _round(_mean(ttft), 1),
        "ttft_ms_p50": _round(_median(ttft), 1),
        "ttft_ms_max": _round(max(ttft, default=None), 1),
        "coordinator_ttft_ms_mean": _round(_mean([rep.time_to_first_token_s * 1000 for rep in reports]), 1),
        "audits_performed": sum(rep.audits.total for rep in reports),
        "audits_passed": sum(rep.audits.passed for rep in reports),
        "audits_failed": sum(rep.audits.failed for rep in reports),
        "audits_pending": sum(rep.audits.pending for rep in reports),
        "rollbacks": sum(len(rep.rollbacks) for rep in reports),
        "failovers": sum(len(rep.failovers) for rep in reports),
        "same_tokens_in_every_session": len({tuple(rep.tokens) for rep in reports}) <= 1,
        "stages": stage_stats(reports),
        "per_hop_overhead_ms": None,  # the mean over the remote stages, below
        "other_busy_cores": round(max(0.0, other_cpu_s) / wall, 2) if wall > 0 else None,
        # cores each cluster process kept busy (1.0: one core all the time): where the time goes
        "process_busy_cores": {k: round(v / wall, 2) for k, v in (process_cpu_s or {}).items()}
        if wall > 0
        else {},
    }
    remote = [s["hop_overhead_ms"] for s in out["stages"] if not s["local"]]
    out["per_hop_overhead_ms"] = _round(_mean(remote), 3)
    out["tokens"] = reports[0].tokens if reports else []
    return out


def stage_stats(reports: list) -> list[dict[str, Any]]:
    """Per stage, averaged over the sessions: round trip, the node's compute, their difference."""
    stages = []
    for i in range(min((len(rep.stages) for rep in reports), default=0)):
        rows = [rep.stages[i] for rep in reports]
        step = statistics.fmean(s.mean_step_ms for s in rows)
        compute = statistics.fmean(s.mean_compute_ms for s in rows)
        batch = statistics.fmean(s.mean_batch for s in rows)
        stages.append(
            {
                "index": i,
                "node_id": rows[0].node_id,
                "layers": rows[0].layers,
                "local": rows[0].local,
                "mean_step_ms": round(step, 3),
                "mean_compute_ms": round(compute, 3),
                "hop_overhead_ms": round(step - compute, 3),  # serialisation + gRPC (+ queueing)
                "mean_batch": round(batch, 2),  # sessions in the forward a session's order went in
            }
        )
    return stages


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# --- ratios, table, main ---------------------------------------------------------------------


def ratios(results: list[dict[str, Any]], refs: dict[str, Any]) -> dict[str, Any]:
    llama = refs.get("llama.cpp", {}).get("decode_tps")
    agg = {(r["audit_rate"], r["sessions"]): r["aggregate_tps"] for r in results}
    rates = sorted({r for r, _ in agg})
    ns = sorted({n for _, n in agg})
    out: dict[str, Any] = {"llama_cpp_decode_tps": llama}
    for rate in rates:
        one = agg.get((rate, 1))
        key = f"audit_rate_{rate:g}"
        out[key] = {
            "aggregate_vs_1_session": {n: _ratio(agg[(rate, n)], one) for n in ns if (rate, n) in agg},
            "aggregate_vs_llama_cpp": {n: _ratio(agg[(rate, n)], llama) for n in ns if (rate, n) in agg},
        }
        solo = next((r for r in results if r["audit_rate"] == rate and r["sessions"] == 1), None)
        if solo:
            # the demo's own figure: its session's decode tok/s (what `consortium demo --json` prints)
            out[key]["one_session_decode_vs_llama_cpp"] = _ratio(solo["per_session_decode_tps_mean"], llama)
            out[key]["one_session_end_to_end_vs_llama_cpp"] = _ratio(solo["per_session_tps_mean"], llama)
    hi = max(rates, default=0.0)
    if 0.0 in rates and hi > 0:
        out[f"audit_cost_{hi:g}_vs_0"] = {
            n: _round(1 - agg[(hi, n)] / agg[(0.0, n)], 3)
            for n in ns
            if (hi, n) in agg and (0.0, n) in agg and agg[(0.0, n)]
        }
    ours = [
        (k, v["decode_tps"]) for k, v in refs.items() if k.startswith("consortium ") and "decode_tps" in v
    ]
    out["single_node_vs_llama_cpp"] = {k: _ratio(v, llama) for k, v in ours}
    return out


def goals(rat: dict[str, Any], rates: list[float]) -> dict[str, Any]:
    g: dict[str, Any] = {"targets": GOALS}
    single_node = [v for v in rat.get("single_node_vs_llama_cpp", {}).values() if v is not None]
    if single_node:
        g["single_node_vs_llama_cpp"] = max(single_node)
    main_rate = max(rates, default=0.0)  # with audits on, as a user runs it
    r = rat.get(f"audit_rate_{main_rate:g}", {})
    g["at_audit_rate"] = main_rate
    g["one_demo_session_vs_llama_cpp"] = r.get("one_session_decode_vs_llama_cpp")
    g["sessions_8_vs_1"] = r.get("aggregate_vs_1_session", {}).get(8)
    g["sessions_8_vs_llama_cpp"] = r.get("aggregate_vs_llama_cpp", {}).get(8)
    cost = next((v for k, v in rat.items() if k.startswith("audit_cost_")), {})
    g["audit_cost_at_8"] = cost.get(8)
    checks = {
        "single_node_vs_llama_cpp": lambda v: v >= GOALS["single_node_vs_llama_cpp"],
        "one_demo_session_vs_llama_cpp": lambda v: v >= GOALS["one_demo_session_vs_llama_cpp"],
        "sessions_8_vs_1": lambda v: v >= GOALS["sessions_8_vs_1"],
        "sessions_8_vs_llama_cpp": lambda v: v >= GOALS["sessions_8_vs_llama_cpp"],
        "audit_cost_at_8": lambda v: v <= GOALS["audit_cost_max"],
    }
    g["met"] = {k: f(g[k]) for k, f in checks.items() if g.get(k) is not None}
    return g


def print_table(results: list[dict[str, Any]], refs: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    llama = refs.get("llama.cpp", {}).get("decode_tps")
    t = Table(title="Demo cluster throughput (tok/s; per-session: client-side / coordinator decode)")
    cols = [
        "audit",
        "N",
        "tokens",
        "aggregate",
        "×1 session",
        "×llama.cpp",
        "per-session mean",
        "per-session min",
    ]
    cols += ["TTFT ms mean/p50/max", "audits (failed)", "hop overhead ms", "same tokens", "others busy"]
    for c in cols:
        t.add_column(c, justify="right")
    one = {r["audit_rate"]: r["aggregate_tps"] for r in results if r["sessions"] == 1}
    for r in results:
        hops = " ".join(f"{s['hop_overhead_ms']:.1f}" for s in r["stages"] if not s["local"])
        t.add_row(
            f"{r['audit_rate']:g}",
            str(r["sessions"]),
            f"{r['generated_tokens']}"
            + (f" ({r['failed_sessions']} failed)" if r["failed_sessions"] else ""),
            f"{r['aggregate_tps']:.1f}",
            _fmt(_ratio(r["aggregate_tps"], one.get(r["audit_rate"]))),
            _fmt(_ratio(r["aggregate_tps"], llama)),
            f"{_fmt(r['per_session_tps_mean'], 1)} / {_fmt(r['per_session_decode_tps_mean'], 1)}",
            f"{_fmt(r['per_session_tps_min'], 1)} / {_fmt(r['per_session_decode_tps_min'], 1)}",
            f"{_fmt(r['ttft_ms_mean'], 0)}/{_fmt(r['ttft_ms_p50'], 0)}/{_fmt(r['ttft_ms_max'], 0)}",
            f"{r['audits_performed']} ({r['audits_failed']})",
            hops or "-",
            str(r["same_tokens_in_every_session"]),
            _fmt(r["other_busy_cores"]),
        )
    console = Console(width=200)
    console.print(t)
    for k, v in refs.items():
        if isinstance(v, dict):
            msg = v.get("error") or (
                f"decode {v['decode_tps_best']:.1f} best / {v['decode_tps_median']:.1f} median tok/s, prefill "
                f"{v['prefill_tps_best']:.0f} tok/s ({v['runs_disturbed']} of {len(v['runs'])} runs disturbed)"
            )
            console.print(f"reference {k} ({refs['threads']} threads, {refs['tokens']} tokens): {msg}")


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the pulled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--out", type=Path, default=Path("results/bench_throughput.json"))
    ap.add_argument("--sessions", type=_ints, default=_ints("1,2,4,8,16"), help="concurrency levels")
    ap.add_argument("--audit-rates", type=_floats, default=_floats("0.2,0"), help="audit probabilities")
    ap.add_argument(
        "--audit-coverage",
        choices=["full", "sampled"],
        default=None,
        help="what the audit rate covers (default: the coordinator's, full)",
    )
    ap.add_argument("--tokens", type=int, default=32, help="max tokens of every session")
    ap.add_argument(
        "--rounds", type=int, default=1, help="repeats of every (rate, N); the median is reported"
    )
    ap.add_argument("--prompt", default=DEMO_PROMPT)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (greedy: no effect on tokens)")
    ap.add_argument("--audit-seed", type=int, default=0, help="session i draws its audits with seed + i")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per cluster process (0: the demo's)"
    )
    ap.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="engine dtype (default: the demo's)"
    )
    ap.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="packed weights (default: packed for fp32)",
    )
    ap.add_argument("--coordinator-args", default="", help="extra `coordinator start` options (one string)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument(
        "--no-pin-cpus",
        action="store_true",
        help="leave the processes unpinned (the demo pins: core/cpus.py)",
    )
    ap.add_argument(
        "--single-modes", default="fp32+packed,fp16", help="our single-node reference modes ('' for none)"
    )
    ap.add_argument("--ref-repeats", type=int, default=2, help="runs of every reference (the best counts)")
    ap.add_argument("--ref-tokens", type=int, default=128, help="tokens of the single-node references")
    ap.add_argument("--ref-threads", type=int, default=os.cpu_count() or 1, help="threads of the references")
    ap.add_argument(
        "--quiet-wait", type=float, default=30, help="max s to wait for a quiet machine per reference"
    )
    ap.add_argument(
        "--log-dir", type=Path, default=None, help="the cluster's logs (default: a new temp folder)"
    )
    a = ap.parse_args(argv)

    cfg = DemoConfig(model=Path(a.model) if a.model else None, quiet=True)
    engine = cfg.engine
    if a.dtype:
        engine = replace(engine, dtype=a.dtype, packed=None)  # packed: the new dtype's default
    if a.packed is not None:
        engine = replace(engine, packed=a.packed)
    if a.threads:
        engine = replace(engine, threads=a.threads)
    log_dir = a.log_dir or Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    cfg = replace(cfg, engine=engine, log_dir=log_dir)
    model = demo_model(cfg, lambda line: print(line, file=sys.stderr))

    machine = single.machine_info()
    refs = references(str(model), a)

    most = max(a.sessions)
    cluster = demo_cluster(cfg, model)
    if a.no_pin_cpus:
        cluster.cpu_plan = []
    cluster.coordinator_args += [
        "--max-sessions",
        str(max(16, most)),
        "--max-sessions-per-client",
        str(most),  # every thread here is the same client (one key)
        "--sessions-per-minute-per-client",
        "1000000",
        *shlex.split(a.coordinator_args),
    ]
    sampling = SamplingParams(seed=a.seed)
    results: list[dict[str, Any]] = []
    with cluster:
        t = time.perf_counter()
        cluster.start(timeout_s=300)
        startup_s = time.perf_counter() - t
        print(
            f"cluster ready in {startup_s:.1f} s (engine {cluster.engine}); logs in {log_dir}",
            file=sys.stderr,
        )
        warm = SessionRequest(
            a.prompt,
            WARMUP_TOKENS,
            sampling,
            audit_probability=max(a.audit_rates),
            audit_coverage=a.audit_coverage,
        )
        run_sessions(cluster, warm, min(2, most))  # warm-up: first-session costs, the auditor
        runs: dict[tuple[float, int], list[dict[str, Any]]] = {}
        for rnd in range(a.rounds):
            for n in a.sessions:
                for rate in a.audit_rates:  # adjacent, so the audit cost sees the same machine
                    req = SessionRequest(
                        a.prompt,
                        a.tokens,
                        sampling,
                        audit_probability=rate,
                        audit_seed=a.audit_seed,
                        audit_coverage=a.audit_coverage,
                    )
                    r = run_sessions(cluster, req, n)
                    runs.setdefault((rate, n), []).append(r)
                    print(
                        f"[{rnd + 1}/{a.rounds}] audits {rate:g}, {n:2d} sessions: {r['aggregate_tps']:.1f} tok/s "
                        f"aggregate, {r['generated_tokens']} tokens in {r['wall_s']:.1f} s, TTFT p50 "
                        f"{_fmt(r['ttft_ms_p50'], 0)} ms, audits {r['audits_performed']} ({r['audits_failed']} "
                        f"failed), others busy {r['other_busy_cores']}",
                        file=sys.stderr,
                        flush=True,
                    )
    for rate in a.audit_rates:
        for n in a.sessions:
            rs = runs[(rate, n)]
            med = sorted(rs, key=lambda r: r["aggregate_tps"])[(len(rs) - 1) // 2]  # the median round
            results.append(
                {"audit_rate": rate, **med, "aggregate_tps_rounds": [r["aggregate_tps"] for r in rs]}
            )

    rat = ratios(results, refs)
    tokens = {tuple(r.pop("tokens")) for r in results if r["tokens"]}
    report = {
        "benchmark": "throughput",
        "settings": {
            "model": str(model),
            "prompt": a.prompt,
            "chat_template": True,
            "max_tokens": a.tokens,
            "sampling": "greedy",
            "seed": a.seed,
            "audit_seed": a.audit_seed,
            "sessions": a.sessions,
            "audit_rates": a.audit_rates,
            "audit_coverage": a.audit_coverage or "full",
            "rounds": a.rounds,
            "engine": {
                "device": cluster.engine.device,
                "dtype": cluster.engine.dtype,
                "packed": cluster.engine.packed,
                "threads_per_process": cluster.engine.threads,
            },
            "topology": {
                "coordinator": str(cluster.coordinator_layers),
                "workers": [str(w) for w in cluster.worker_layers],
                # each process's CPUs (core/cpus.py's local_plan), coordinator first; [] = unpinned
                "cpus": [list(c) for c in cluster.cpu_plan],
            },
            "coordinator_args": cluster.coordinator_args,
            "cluster_startup_s": round(startup_s, 1),
            "log_dir": str(log_dir),
            "note": "No ignore-EOS in the engine: sessions stop at EOS or max_tokens; tokens_per_session "
            "gives the actual counts. Per-session tok/s is client-side (time to first token included); "
            "per_session_decode_tps is the coordinator's (after the first token). Sessions wait for "
            "their audits, so audits count in the wall time.",
        },
        "machine": machine,
        "git": git_state(),
        "references": refs,
        "results": results,
        "same_tokens_at_every_level": len(tokens) <= 1,
        "ratios": rat,
        "goals": goals(rat, a.audit_rates),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print_table(results, refs)
    print(f"ratios: {json.dumps(rat)}\ngoals: {json.dumps(report['goals'])}\nwrote {a.out}")
    failed = sum(r["audits_failed"] + r["failed_sessions"] for r in results)
    return 1 if failed or len(tokens) > 1 else 0


if __name__ == "__main__":
    sys.exit(main())
