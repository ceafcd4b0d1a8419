"""Tolerances per layer range and numeric class on SmolLM2 (issue 10, item 6).

1. calibrate: every (worker, auditor) pair of CPU configurations (fp32, fp16, bf16, packed int4;
   prefill and decode) and every cheat on every layer range starting at layers 0, 5, ..., 25
   (all lengths: 105 ranges), on the calibration prompts -> the report that tolerance.py reads
   (--install writes it to src/consortium/verification/calibration.json);
2. validate on held-out prompts (one of 301 tokens) and on starts 0, 3, 12 and 23 (3, 12 and 23
   are not sampled: they take the bounds of the sampled start before them): honest worst row,
   worst windowed mean and CUSUM against the bounds for every range and class (any excess is a
   false fraud), and the cheat closest to passing;
3. writes results/tolerances.json and the tables in docs/tolerances.md.

    .venv/bin/python benchmarks/bench_tolerance.py --install [--sweeps results/sweeps]

About 40 minutes on one CPU thread; --sweeps keeps the two sweeps (pickles) to redo 1-3 from them.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import torch

from consortium.model.files import default_model_path
from consortium.model.gguf_file import GGUFModel
from consortium.verification.calibrate import (
    CHEATS,
    MUST_CATCH,
    PROMPTS,
    _configs,
    calibrate,
    default_starts,
    encode,
    validate,
)
from consortium.verification.sweep import Sweep, run_sweep

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT.parent / "shared/data/h200-cross-backend-numerics.json"
DTYPES = ["fp32", "fp16", "bf16"]
VALIDATION_STARTS = [0, 3, 12, 23]
VALIDATION_PROMPTS = [
    'Translate into French, then into German: "The quick brown fox jumps over the lazy dog, and then it '
    'runs into the forest to hide from the hunters before the sun goes down."',
    "Write a Python function that merges two sorted lists into one sorted list without using sort(), then "
    "explain its time complexity and show it on the lists [1, 4, 9, 12] and [2, 3, 10, 15, 20].",
    "Summarise the following passage in two sentences. The printing press, developed by Johannes Gutenberg "
    "around 1440, combined movable metal type, oil-based inks and a screw press adapted from those used to "
    "make wine and olive oil. Before it, books in Europe were copied by hand, mostly in monasteries, and a "
    "single Bible could take a scribe more than a year. Within fifty years of Gutenberg's first Bible, "
    "presses were operating in more than two hundred cities, and an estimated twenty million volumes had "
    "been printed. Prices of books fell sharply, literacy spread beyond the clergy and the nobility, and "
    "scholars could for the first time compare identical copies of the same text across distant cities. "
    "Historians connect the press to the Renaissance, the Reformation and the Scientific Revolution: Martin "
    "Luther's pamphlets circulated in hundreds of thousands of copies, and scientists such as Copernicus, "
    "Vesalius and later Newton relied on printed books to share diagrams, tables and arguments with "
    "colleagues they would never meet. Critics at the time worried about errors multiplied by the "
    "thousand, the spread of heresy and the loss of the craft of the scribe, and some rulers imposed "
    "licensing and censorship in response. Yet the technology proved impossible to contain, and by 1600 "
    "printed matter had become an ordinary part of life for merchants, clerks, preachers and students "
    "across the continent.",
    "What are the prime numbers below 100? Then compute 123456 * 789, 2**20, and the square root of 2 to "
    "six decimal places, and say which of these results is itself prime.",
]


def _sweep(cache: Path | None, name: str, make) -> Sweep:
    path = cache / f"{name}.pkl" if cache else None
    if path and path.is_file():
        return pickle.loads(path.read_bytes())
    t = time.perf_counter()
    sweep = make()
    print(f"{name} sweep: {time.perf_counter() - t:.0f} s")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(sweep))
    return sweep


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _cheat(r: dict) -> str:
    return f"{r['closest_cheat']} ({r['closest_cheat_visibility']:.1f}x)" if r["closest_cheat"] else "-"


def _table(rows: list[dict], held: bool) -> list[str]:
    """Calibration: honest worst row and >=16-row mean vs the bounds. Held-out: also the smallest
    tau_mean every window of rows needs, the CUSUM peak, and whether all of it passes."""
    cols = ["layers", "honest worst row", "tau", "honest worst mean (>=16 rows)", "tau_mean"]
    keys = ["honest_rel_l2", "rel_l2", "honest_mean", "mean_rel_l2"]
    if held:
        cols, keys = (
            cols + ["mean needed by every window", "CUSUM peak", "passes"],
            keys + ["mean_needed", "cusum_peak"],
        )
    out = ["| " + " | ".join([*cols, "closest cheat (visibility)"]) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [f"{r['layers'][0]}-{r['layers'][1]}", *(_fmt(r[k]) for k in keys)]
        cells += [str(r["passes"])] if held else []
        out.append("| " + " | ".join([*cells, _cheat(r)]) + " |")
    return out


def _short(rows: list[dict], starts: list[int]) -> list[dict]:
    """The rows of ranges of 1 to 15 layers from these starts."""
    return [r for r in rows if r["layers"][0] in starts and r["layers"][1] - r["layers"][0] <= 15]


def _class_section(klass: str, p: dict, cal: dict, held: dict) -> list[str]:
    lines = [f"## {klass}", "", f"Members: {', '.join(p['honest_members'])}.", ""]
    lines.append(f"Sequential test: h = {p['cusum_h']:.1f} (honest peak {p['honest_cusum_peak']:.1f}).")
    lines += [
        "",
        "| cheat | every unit caught | by the row bounds alone | rows the CUSUM needs |",
        "|---|---|---|---|",
    ]
    for c in CHEATS:
        need = "required" if c in MUST_CATCH[klass] else "reported"
        row = [p["caught_at_every_unit"][c], p["caught_by_row_bounds"][c], p["cusum_rows_to_detect"][c]]
        lines.append(f"| {c} ({need}) | " + " | ".join(map(str, row)) + " |")
    lines += ["", "### Calibration prompts, ranges of 1-15 layers from the sampled starts 0, 5, 10, 15", ""]
    lines += _table(_short(cal["ranges"], [0, 5, 10, 15]), held=False)
    bad = held["false_fraud_ranges"] or "none"
    lines += [
        "",
        f"### Held-out prompts, ranges of 1-15 layers from starts {VALIDATION_STARTS}: false fraud {bad}",
        "",
    ]
    return lines + _table(_short(held["ranges"], VALIDATION_STARTS), held=True) + [""]


def _attacks(held: dict) -> list[str]:
    """steer=0.07 and scale=1.05 per range (held-out): unit visibility, rows the CUSUM needs."""
    head = ["layers"] + [f"{c} {k}" for k in ("strict", "loose") for c in ("steer", "scale")]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    per = {
        (k, c): held[k]["cheats"][c]["per_range"]
        for k in ("strict", "loose")
        for c in ("steer=0.07", "scale=1.05")
    }
    for i, r in enumerate(per["strict", "steer=0.07"]):
        if r[1] - r[0] <= 15:
            cells = [f"{v[i][3]:.2f}x, {v[i][4] or '-'} rows" for v in per.values()]
            out.append(f"| {r[0]}-{r[1]} | " + " | ".join(cells) + " |")
    return out


def _summary(report: dict, held: dict) -> list[str]:
    """Per class, over every held-out range: the largest honest share of each bound, and the
    required cheat closest to passing."""
    head = ["class", "honest row / tau", "max/RMS / tau_max", "mean needed / tau_mean", "CUSUM / h"]
    head += ["false fraud", "closest required cheat (visibility)", "required cheats missed on (calibration)"]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for klass in ("strict", "loose"):
        rows, h = held[klass]["ranges"], held[klass]["cusum_h"]
        ratio = [max(r[a] / r[b] for r in rows) for a, b in _RATIOS] + [
            max(r["cusum_peak"] / h for r in rows)
        ]
        worst = min(rows, key=lambda r: r["closest_cheat_visibility"])
        missed = {c: v for c, v in report["proposed"][klass]["missed"].items() if v} or "-"
        cells = [klass, *(f"{x:.2f}" for x in ratio), str(held[klass]["false_fraud_ranges"] or "none")]
        out.append("| " + " | ".join([*cells, f"{_cheat(worst)} on {worst['layers']}", str(missed)]) + " |")
    return ["## Summary (held-out prompts and starts)", "", *out, ""]


_RATIOS = [("honest_rel_l2", "rel_l2"), ("honest_max_rel", "max_rel"), ("mean_needed", "mean_rel_l2")]


def _markdown(report: dict, cal: dict, held: dict) -> str:
    lines = [
        "# Tolerances per layer range and numeric class (SmolLM2-135M, CPU)",
        "",
        "Written by `benchmarks/bench_tolerance.py` (scheme: `src/consortium/verification/calibrate.py`).",
        "Visibility: how far a cheat's weakest unit (one prompt's rows, audited by fp32) is beyond the",
        "bounds; above 1 it is caught by the row or the mean bound.",
        "",
        f"Calibrated on every range from starts {report['ranges']['sampled_starts']} (all lengths) with "
        f"{report['prompts']} prompts ({report['rows_per_range']} rows per range); validated on every "
        f"range from starts {VALIDATION_STARTS} with {len(VALIDATION_PROMPTS)} other prompts (545 rows, "
        "positions up to 300). A range starting between samples takes the bounds of the sampled start "
        "before it. Every (worker, auditor) pair of CPU fp32/fp16 (strict) and bf16/packed int4 (loose) "
        "in prefill and decode; margins: row x3, mean x2, CUSUM h x2 over the honest worst.",
        "",
    ]
    lines += _summary(report, held)
    for klass in ("strict", "loose"):
        lines += _class_section(klass, report["proposed"][klass], cal[klass], held[klass])
    lines += [
        "## The steering and scaling attacks per range (held-out prompts)",
        "",
        "Visibility of the weakest unit (> 1: caught by the row or mean bound) and the rows of one node",
        "the sequential test needs to flag it (-: not within the prompts' rows).",
        "",
    ]
    return "\n".join(lines + _attacks(held))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--install", action="store_true", help="write the report to verification/calibration.json"
    )
    ap.add_argument("--sweeps", type=Path, default=None, help="folder to keep/reuse the sweeps in")
    ap.add_argument("--out", type=Path, default=ROOT / "results/tolerances.json")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs/tolerances.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = default_model_path()
    gguf = GGUFModel(model)
    configs = _configs(["cpu"], DTYPES)
    starts = default_starts(gguf.args.n_layers)

    def measure(prompts: list[str], at: list[int]) -> Sweep:
        return run_sweep(gguf, encode(gguf, prompts), configs, CHEATS, at)

    cal_sweep = _sweep(args.sweeps, "calibration", lambda: measure(PROMPTS, starts))
    held_sweep = _sweep(args.sweeps, "validation", lambda: measure(VALIDATION_PROMPTS, VALIDATION_STARTS))
    report = calibrate(model, ["cpu"], DTYPES, h200=H200 if H200.is_file() else None, sweep=cal_sweep)
    report["command"] = "benchmarks/bench_tolerance.py --install"
    cal, held = validate(cal_sweep, report, gguf.digest), validate(held_sweep, report, gguf.digest)
    if args.install:
        (ROOT / "src/consortium/verification/calibration.json").write_text(
            json.dumps(report, indent=1) + "\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"report": report, "calibration": cal, "validation": held}, indent=1) + "\n"
    )
    args.docs.write_text(_markdown(report, cal, held) + "\n")
    for klass in ("strict", "loose"):
        print(
            f"{klass}: false fraud on held-out {held[klass]['false_fraud_ranges'] or 'none'}; "
            f"separates every required cheat: {report['proposed'][klass]['separates_all_required']}"
        )
    print(f"wrote {args.out} and {args.docs}")


if __name__ == "__main__":
    main()
