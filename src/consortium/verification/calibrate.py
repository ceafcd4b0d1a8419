"""Calibration: measure honest numerical spread and cheat signatures per layer range, propose thresholds.

sweep.py measures every (worker, auditor) pair of honest configurations and every cheat on every
layer range that starts at a sampled layer (every START_STEP-th, and the starts of the `n_stages`
split), on bit-identical inputs, as audits compare. Per range and class:

- tau (every row) = MARGIN_ROW x the worst honest row; tau_max likewise for max-element/RMS;
- tau_mean (a unit's mean, Tolerance.mean_bound) = MARGIN_MEAN x the worst honest mean over
  windows of MIN_WINDOW or more consecutive rows, raised where needed so that every honest
  window of any length passes;
- a range that starts between samples takes the bounds of the sampled start before it, whose
  range holds it and adds layers, whose rounding adds error (tolerance.tolerance_for);
- the sequential test's h = MARGIN_SEQ x the highest CUSUM that any honest sequence reached.

Cheats (misbehave.py) must land above: their per-row, per-unit and sequential verdicts are reported.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from consortium.model.gguf_file import GGUFModel
from consortium.model.tokenizer import GGUFTokenizer
from consortium.verification.sweep import REF, Config, Sweep, run_sweep
from consortium.verification.tolerance import CLASSES, Tolerance, tolerance_for

PROMPTS = [
    "Explain in one paragraph why the sky appears blue.",
    "Write a short poem about a lighthouse keeper who counts the waves.",
    "List three differences between TCP and UDP, with one sentence each.",
    "What is 17 times 23? Show your working step by step.",
]
CHEATS = [
    "skip-layer",
    "wrong-weights",
    "int4-weights",
    "int8-weights",
    "noise=0.001",
    "noise=0.01",
    "noise=0.1",
    "flip-max",
    "steer=0.07",
    "scale=1.05",
]
# Cheats a class must catch; noise at 0.1% of RMS is below honest fp16 spread and is only reported.
MUST_CATCH = {
    "strict": [c for c in CHEATS if c != "noise=0.001"],
    "loose": [
        "skip-layer",
        "wrong-weights",
        "int4-weights",
        "noise=0.1",
        "flip-max",
        "steer=0.07",
        "scale=1.05",
    ],
}
MARGIN_ROW, MARGIN_MEAN, MARGIN_SEQ = 3.0, 2.0, 2.0
# Floors (rel_l2, max_rel, mean_rel_l2): a class measured in fp32 only would otherwise get bounds at
# the fp32 rounding level (~1e-6), which rows not in the calibration set may exceed; no cheat that
# matters comes near them (the weakest required one, noise at 1% of RMS, is at 1e-2).
FLOORS = (1e-4, 1e-3, 5e-5)
MIN_WINDOW = 16  # rows: the shortest window whose mean sets tau_mean directly
START_STEP = 5  # sample every START_STEP-th start layer


def calibrate(
    model: str | Path,
    devices: list[str],
    dtypes: list[str],
    n_stages: int = 3,
    prompts: list[str] = PROMPTS,
    h200: str | Path | None = None,
    log: Callable[[str], None] = print,
    starts: list[int] | None = None,
    sweep: Sweep | None = None,
) -> dict:
    """The calibration report (`sweep`: reuse one already measured with these arguments)."""
    gguf = GGUFModel(model)
    n = gguf.args.n_layers
    bounds = [round(i * n / n_stages) for i in range(n_stages + 1)]
    starts = default_starts(n, n_stages, starts)
    if sweep is not None and sweep.starts != starts:
        raise ValueError(f"the sweep measured starts {sweep.starts}, not {starts}")
    if sweep is None:
        sweep = run_sweep(gguf, encode(gguf, prompts), _configs(devices, dtypes), CHEATS, starts, log)
    split = list(zip(bounds[:-1], bounds[1:], strict=True))
    imported = _import_h200(h200) if h200 else {}
    report = {
        "model": gguf.path.name,
        "model_digest": gguf.digest,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "stages": split,
        "prompts": len(prompts),
        "rows_per_range": sum(int(x.shape[0]) for x in encode(gguf, prompts)),
        "measurements": measurements(sweep, split),
        "imported": imported,
    }
    report["ranges"], report["proposed"] = propose(sweep, imported)
    return report


def default_starts(n_layers: int, n_stages: int = 3, starts: list[int] | None = None) -> list[int]:
    """The sampled start layers: every START_STEP-th (or `starts`) and those of the split."""
    split = {round(i * n_layers / n_stages) for i in range(n_stages)}
    return sorted(set(range(0, n_layers, START_STEP) if starts is None else starts) | split)


def encode(gguf: GGUFModel, prompts: list[str]) -> list[Tensor]:
    tok = GGUFTokenizer(gguf)
    return [torch.tensor(tok.encode_prompt(p, chat=True)) for p in prompts]


def _configs(devices: list[str], dtypes: list[str]) -> list[Config]:
    configs = [Config("cpu_fp32_decode", "cpu", "fp32", decode=True)]
    for dev in devices:
        short = dev.split(":")[0]
        for dt in dtypes:
            configs += [
                Config(f"{short}_{dt}_prefill", dev, dt),
                Config(f"{short}_{dt}_decode", dev, dt, decode=True),
            ]
        if dev == "cpu" and "fp32" in dtypes:  # the strict kernel (model/cpu_kernel.py)
            configs.append(Config("cpu_fp32_packed_prefill", "cpu", "fp32", packed=True))
            configs.append(Config("cpu_fp32_packed_decode", "cpu", "fp32", packed=True, decode=True))
        if dev == "cpu" and "bf16" in dtypes and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            configs.append(Config("cpu_bf16_packed_prefill", "cpu", "bf16", packed=True))
            configs.append(Config("cpu_bf16_packed_decode", "cpu", "bf16", packed=True, decode=True))
    return [c for c in dict.fromkeys(configs) if c != REF]


def _stats(units: list[tuple[Tensor, Tensor]]) -> dict:
    """units: (rel_l2 [S], max_rel [S]) per work unit (prompt x stage)."""
    rel = torch.cat([u[0] for u in units])
    mx = torch.cat([u[1] for u in units])
    return {
        "rows": int(rel.numel()),
        "rel_l2_max": float(rel.max()),
        "rel_l2_p50": float(rel.median()),
        "rel_l2_mean": float(rel.mean()),
        "max_rel_max": float(mx.max()),
        "max_rel_p50": float(mx.median()),
        # the weakest unit of a cheat: its most visible row (an audit of the unit sees every row)
        "unit_rel_l2_min": min(float(u[0].max()) for u in units),
        "unit_max_rel_min": min(float(u[1].max()) for u in units),
        "unit_mean_rel_l2_min": min(float(u[0].mean()) for u in units),
    }


def measurements(sweep: Sweep, split: list[tuple[int, int]]) -> dict:
    """Each configuration (audited by the fp32 reference) and each cheat on the split's stages."""
    out = {}
    for name, klass in sweep.klass.items():
        worker, _, auditor = name.partition("|")
        if klass == "cheat":
            key, dtype = "cheat_" + name.removeprefix("cheat:").replace("=", "_"), "fp32"
        elif auditor == REF.name:
            key, dtype = worker, worker.split("_")[1]
        else:
            continue
        units = [u for a, b in split for u in sweep.rows[(name, a, b)]]
        out[key] = {"dtype": dtype, "decode": key.endswith("_decode"), **_stats(units)}
    return out


def _import_h200(path: str | Path) -> dict:
    """Honest CUDA figures from the shared H200 measurement (4 SmolLM2 layers vs CPU fp32)."""
    data = json.loads(Path(path).read_text())
    out = {}
    for name, m in data["partA_worst"].items():
        if name.startswith("cuda_"):
            dtype = name.split("_")[1]
            out[name] = {
                "dtype": dtype,
                "source": f"{Path(path).name} ({data.get('device')}, torch {data.get('torch')})",
                "rel_l2_max": m["rel_l2_max"],
                "max_rel_max": m["relmax_max"],
                "seed_hash_row_match": m["seed_row_hash_match"],
            }
    return out


# --- thresholds -------------------------------------------------------------------------------

Table = dict[tuple[int, int], float]


def _window_stats(rel: Tensor, tau: float) -> tuple[float, float]:
    """Over the windows of consecutive rows of one sequence: the largest mean of a window of at
    least MIN_WINDOW rows (or the whole sequence), and the smallest tau_mean with which every
    window of two or more rows meets Tolerance.mean_bound, given tau."""
    n = rel.numel()
    c = torch.cat([rel.new_zeros(1), rel.double().cumsum(0)])
    i, j = torch.triu_indices(n + 1, n + 1, offset=1)
    size, sums = (j - i).double(), c[j] - c[i]
    long = size >= min(MIN_WINDOW, n)
    two = size >= 2
    need = float(((sums[two] - tau) / (size[two] - 1)).max()) if bool(two.any()) else 0.0
    return float((sums[long] / size[long]).max()), need


def _tols(klass: str, tau: Table, tau_max: Table, tau_mean: Table) -> dict[tuple[int, int], Tolerance]:
    return {r: Tolerance(klass, tau[r], tau_max[r], tau_mean[r], r) for r in tau}


def class_table(sweep: Sweep, klass: str, honest: list[str]) -> dict[str, Table]:
    """Honest worst row, worst windowed mean and the thresholds of one class, per range."""
    worst, worst_max, mean_hi = {}, {}, {}
    for r in sweep.ranges():
        rows = sweep.honest_rows(honest, r)
        worst[r] = max(float(u[0].max()) for u in rows)
        worst_max[r] = max(float(u[1].max()) for u in rows)
        mean_hi[r] = max(_window_stats(u[0], 0.0)[0] for u in rows)
    tau = {r: max(MARGIN_ROW * v, FLOORS[0]) for r, v in worst.items()}
    tau_max = {r: max(MARGIN_ROW * v, FLOORS[1]) for r, v in worst_max.items()}
    need = {r: max(_window_stats(u[0], tau[r])[1] for u in sweep.honest_rows(honest, r)) for r in tau}
    tau_mean = {r: min(max(MARGIN_MEAN * max(mean_hi[r], need[r]), FLOORS[2]), tau[r]) for r in tau}
    return {
        "honest_rel_l2": worst,
        "honest_max_rel": worst_max,
        "honest_mean_rel_l2": mean_hi,
        "rel_l2": tau,
        "max_rel": tau_max,
        "mean_rel_l2": tau_mean,
    }


def cusum(excess: Tensor, h: float = float("inf")) -> tuple[float, int | None]:
    """The CUSUM's peak over a sequence of row excesses, and the rows it took to pass h (None: never)."""
    s = peak = 0.0
    for i, e in enumerate(excess.tolist()):
        s = max(0.0, s + e)
        peak = max(peak, s)
        if s > h:
            return peak, i + 1
    return peak, None


def _excess(units: list[tuple[Tensor, Tensor]], tol: Tolerance) -> Tensor:
    """The rows of every unit, one after another, as the sequential test's increments."""
    return tol.scores(torch.cat([u[0] for u in units] or [torch.zeros(0, dtype=torch.float64)])) - 1


def visibility(rel: Tensor, mx: Tensor, tol: Tolerance) -> tuple[float, float]:
    """How far a unit's rows are beyond the bounds (> 1: caught): by the row bounds, and by the
    row or mean bounds."""
    row = max(float(rel.max()) / tol.rel_l2, float(mx.max()) / tol.max_rel)
    return row, max(row, float(rel.mean()) / tol.mean_bound(rel.numel()))


def cheat_verdicts(sweep: Sweep, text: str, tols: dict[tuple[int, int], Tolerance], h: float) -> dict:
    """Whether a cheat is caught on every unit (prompt x range): by the row bounds alone, or by
    the row or mean bounds; its weakest unit's visibility per range; and the most rows the
    sequential test needs to flag it on any range."""
    seen: dict[tuple[int, int], tuple[float, float]] = {}
    rows_needed: list[int | None] = []
    for r, tol in tols.items():
        units = sweep.rows[("cheat:" + text, *r)]
        v = [visibility(rel, mx, tol) for rel, mx in units]
        seen[r] = (min(x[0] for x in v), min(x[1] for x in v))
        rows_needed.append(cusum(_excess(units, tol), h)[1])
    never = None in rows_needed
    return {
        "row": all(v[0] > 1 for v in seen.values()),
        "unit": all(v[1] > 1 for v in seen.values()),
        "weakest_unit": min(v[1] for v in seen.values()),
        # a, b, row and unit visibility, rows the CUSUM needs (None: not within the prompts' rows)
        "per_range": [[*r, *v, n] for (r, v), n in zip(seen.items(), rows_needed, strict=True)],
        "cusum_rows": None if never else max(rows_needed),
    }


def propose(sweep: Sweep, imported: dict) -> tuple[dict, dict]:
    """Per class: thresholds per range (as tolerance_for reads them) and the class summary."""
    starts, n = sweep.starts, sweep.n_layers
    ranges: dict = {"n_layers": n, "sampled_starts": starts}
    proposed = {}
    for klass in CLASSES:
        honest = _honest(sweep, klass)
        t = class_table(sweep, klass, honest)
        ranges[klass] = {k: [[t[k][a, b] for b in range(a + 1, n + 1)] for a in starts] for k in _KEYS}
        proposed[klass] = summarise(sweep, klass, honest, t, imported)
    return ranges, proposed


_KEYS = ("rel_l2", "max_rel", "mean_rel_l2")


def _honest(sweep: Sweep, klass: str) -> list[str]:
    """The honest comparisons a class admits: strict pairs, and for loose every honest pair."""
    return [k for k, c in sweep.klass.items() if c == "strict" or (klass == "loose" and c == "loose")]


def summarise(sweep: Sweep, klass: str, honest: list[str], t: dict[str, Table], imported: dict) -> dict:
    """The class-wide bounds (for models without a table), h, and every cheat's verdicts."""
    tols = _tols(klass, t["rel_l2"], t["max_rel"], t["mean_rel_l2"])
    peak = max(
        cusum(_excess(sweep.honest_rows([name], r), tol))[0] for name in honest for r, tol in tols.items()
    )
    h = MARGIN_SEQ * max(peak, 1.0)
    verdicts = {c: cheat_verdicts(sweep, c, tols, h) for c in CHEATS}
    members = sorted({c for name in honest for c in name.split("|")})
    cuda = {k: v["rel_l2_max"] for k, v in imported.items() if klass == "loose" or v["dtype"] != "bf16"}
    four = min(v for (a, b), v in t["rel_l2"].items() if b - a == 4)  # the H200 file measured 4 layers
    return {
        **{k: max(t[k].values()) for k in _KEYS},
        "cusum_h": h,
        "honest_members": members,
        "honest_worst_rel_l2": max(t["honest_rel_l2"].values()),
        "honest_worst_max_rel": max(t["honest_max_rel"].values()),
        "honest_worst_mean_rel_l2": max(t["honest_mean_rel_l2"].values()),
        "honest_cusum_peak": peak,
        "honest_non_finite_rows": sweep.non_finite(honest),
        "margins": {"row": MARGIN_ROW, "mean": MARGIN_MEAN, "sequential": MARGIN_SEQ},
        "imported_worst_rel_l2": max(cuda.values(), default=None),
        "imported_within_every_4_layer_tau": all(v < four for v in cuda.values()),
        "must_catch": MUST_CATCH[klass],
        "caught_by_row_bounds": {c: v["row"] for c, v in verdicts.items()},
        "caught_at_every_unit": {c: v["unit"] for c, v in verdicts.items()},
        "cusum_rows_to_detect": {c: v["cusum_rows"] for c, v in verdicts.items()},
        "weakest_unit_visibility": {c: v["weakest_unit"] for c, v in verdicts.items()},
        "separates_all_required": all(verdicts[c]["unit"] for c in MUST_CATCH[klass]),
        # the ranges where a required cheat's weakest unit passes the row and mean bounds
        "missed": {c: [x[:2] for x in verdicts[c]["per_range"] if x[3] <= 1] for c in MUST_CATCH[klass]},
    }


def validate(sweep: Sweep, report: dict, digest: str) -> dict:
    """Judge a sweep on other prompts (and starts) with a report's thresholds: per class and range,
    the honest worst row and windowed mean against them (any honest row or window of rows out of
    bounds is a false fraud), the honest CUSUM peak against h, and the cheat closest to passing."""
    out = {}
    for klass in CLASSES:
        honest = _honest(sweep, klass)
        tols = {r: tolerance_for(klass, r, sweep.n_layers, digest, report) for r in sweep.ranges()}
        h = report["proposed"][klass]["cusum_h"]
        verdicts = {c: cheat_verdicts(sweep, c, tols, h) for c in CHEATS if ("cheat:" + c) in sweep.klass}
        rows = [_validate_range(sweep, honest, r, tol, h) for r, tol in tols.items()] if honest else []
        for i, row in enumerate(rows):
            seen = {c: verdicts[c]["per_range"][i][3] for c in MUST_CATCH[klass] if c in verdicts}
            row["closest_cheat"] = min(seen, key=seen.get) if seen else None
            row["closest_cheat_visibility"] = min(seen.values(), default=None)
        bad = [x["layers"] for x in rows if not x["passes"]]
        out[klass] = {"false_fraud_ranges": bad, "cusum_h": h, "ranges": rows, "cheats": verdicts}
    return out


def _validate_range(sweep: Sweep, honest: list[str], r: tuple[int, int], tol: Tolerance, h: float) -> dict:
    units = sweep.honest_rows(honest, r)
    worst = max(float(u[0].max()) for u in units)
    worst_max = max(float(u[1].max()) for u in units)
    windows = [_window_stats(u[0], tol.rel_l2) for u in units]
    need = max(w[1] for w in windows)
    peak = max(cusum(_excess(sweep.honest_rows([name], r), tol))[0] for name in honest)
    return {
        "layers": list(r),
        "honest_rel_l2": worst,
        "rel_l2": tol.rel_l2,
        "honest_max_rel": worst_max,
        "max_rel": tol.max_rel,
        "honest_mean": max(w[0] for w in windows),
        "mean_needed": need,
        "mean_rel_l2": tol.mean_rel_l2,
        "cusum_peak": peak,
        "passes": worst <= tol.rel_l2 and worst_max <= tol.max_rel and need <= tol.mean_rel_l2 and peak <= h,
    }
