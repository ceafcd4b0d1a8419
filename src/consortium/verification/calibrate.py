"""Calibration: measure honest numerical spread and cheat signatures, propose thresholds.

Every configuration recomputes the same pipeline stages on bit-identical inputs (as an
auditor does) and is compared row by row with CPU fp32 prefill. Honest configurations
set the floor of the thresholds; cheats (misbehave.py) must land above them.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec
from consortium.model.tokenizer import GGUFTokenizer
from consortium.verification.commitment import seed_style_hash
from consortium.verification.misbehave import Misbehaviour
from consortium.verification.tolerance import STRICT_DTYPES, compare_rows

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
]
# Cheats a class must catch; noise at 0.1% of RMS is below honest fp16 spread and is only reported.
MUST_CATCH = {
    "strict": [
        "skip-layer",
        "wrong-weights",
        "int4-weights",
        "int8-weights",
        "noise=0.01",
        "noise=0.1",
        "flip-max",
    ],
    "loose": ["skip-layer", "wrong-weights", "int4-weights", "noise=0.1", "flip-max"],
}


@dataclass(frozen=True)
class Config:
    name: str
    device: str
    dtype: str
    packed: bool = False
    decode: bool = False  # one position per call (as generation runs) instead of one prefill

    @property
    def klass(self) -> str:
        return "strict" if self.dtype in STRICT_DTYPES else "loose"


def _stats(units: list[tuple[torch.Tensor, torch.Tensor]], hashes: list[float]) -> dict:
    """units: (rel_l2 [S], max_rel [S]) per work unit (prompt x stage)."""
    rel = torch.cat([u[0] for u in units])
    mx = torch.cat([u[1] for u in units])
    return {
        "rows": int(rel.numel()),
        "rel_l2_max": float(rel.max()),
        "rel_l2_p50": float(rel.median()),
        "rel_l2_min": float(rel.min()),
        "max_rel_max": float(mx.max()),
        "max_rel_p50": float(mx.median()),
        "max_rel_min": float(mx.min()),
        # the weakest unit of a cheat: its most visible row (an audit of the unit sees every row)
        "unit_rel_l2_min": min(float(u[0].max()) for u in units),
        "unit_max_rel_min": min(float(u[1].max()) for u in units),
        "seed_hash_row_match": sum(hashes) / max(len(hashes), 1),
    }


def _run(stage: Stage, x: torch.Tensor, decode: bool) -> torch.Tensor:
    cache = stage.new_cache(x.shape[0])
    if not decode:
        return stage(x, cache, all_logits=True).float().cpu()
    return torch.cat([stage(x[i : i + 1], cache, all_logits=True).float().cpu() for i in range(x.shape[0])])


def calibrate(
    model: str | Path,
    devices: list[str],
    dtypes: list[str],
    n_stages: int = 3,
    prompts: list[str] = PROMPTS,
    h200: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    gguf = GGUFModel(model)
    tok = GGUFTokenizer(gguf)
    n = gguf.args.n_layers
    bounds = [round(i * n / n_stages) for i in range(n_stages + 1)]
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    ids = [torch.tensor(tok.encode_prompt(p, chat=True)) for p in prompts]
    bench = _Bench(ranges, [Stage(gguf, StageSpec(a, b)) for a, b in ranges], ids, log)
    for c in _configs(devices, dtypes):
        spec = dict(device=c.device, dtype=c.dtype, packed=c.packed)
        bench.measure(c.name, lambda a, b, s=spec: Stage(gguf, StageSpec(a, b, **s)), c.dtype, c.decode)
    for text in CHEATS:
        cheat = Misbehaviour.parse(text, enabled=True)
        make = lambda a, b, ch=cheat: ch.corrupt_stage(Stage(gguf, StageSpec(a, b)))  # noqa: E731
        bench.measure("cheat_" + text.replace("=", "_"), make, "fp32", False, cheat)
    imported = _import_h200(h200) if h200 else {}
    report = {
        "model": gguf.path.name,
        "model_digest": gguf.digest,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "stages": ranges,
        "prompts": len(prompts),
        "rows_per_config": sum(int(x.shape[0]) for x in ids) * len(ranges),
        "measurements": bench.measurements,
        "imported": imported,
    }
    report["proposed"] = propose(bench.measurements, imported)
    return report


def _configs(devices: list[str], dtypes: list[str]) -> list[Config]:
    configs = [Config("cpu_fp32_decode", "cpu", "fp32", decode=True)]
    for dev in devices:
        for dt in dtypes:
            if dev == "cpu" and dt == "fp32":
                continue
            configs.append(Config(f"{dev.split(':')[0]}_{dt}_prefill", dev, dt))
            configs.append(Config(f"{dev.split(':')[0]}_{dt}_decode", dev, dt, decode=True))
        if dev == "cpu" and "bf16" in dtypes and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            configs.append(Config("cpu_bf16_packed_decode", "cpu", "bf16", packed=True, decode=True))
    return configs


class _Bench:
    """The reference pipeline (CPU fp32 prefill, each stage's input and output remembered) and
    the measurements of other configurations and cheats against it."""

    def __init__(
        self,
        ranges: list[tuple[int, int]],
        ref_stages: list[Stage],
        ids: list[torch.Tensor],
        log: Callable[[str], None],
    ):
        self.ranges, self.ref_stages, self.log = ranges, ref_stages, log
        self.measurements: dict[str, dict] = {}
        self.ref_io: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for x in ids:
            io = []
            for st in ref_stages:
                out = _run(st, x, decode=False)
                io.append((x, out))
                x = out
            self.ref_io.append(io)

    def measure(
        self, name: str, make_stage: Callable[[int, int], Stage], dtype: str, decode: bool, cheat=None
    ) -> None:
        units, hashes = [], []
        for si, (a, b) in enumerate(self.ranges):
            st = make_stage(a, b)
            for io in self.ref_io:
                x, ref_out = io[si]
                if x.is_floating_point():  # the committed input, in the sender's dtype
                    x = x.to(st.spec.torch_dtype)
                    ref_out = _run(self.ref_stages[si], x.float(), decode=False)
                out = _run(st, x.to(st.spec.device), decode)
                if cheat is not None:
                    out = cheat.corrupt_output(out, step=si)
                cmp = compare_rows(out, ref_out)
                units.append((cmp.rel_l2, cmp.max_rel))
                pairs = zip(seed_style_hash(out), seed_style_hash(ref_out), strict=True)
                hashes += [float(h1 == h2) for h1, h2 in pairs]
        m = self.measurements[name] = {"dtype": dtype, "decode": decode, **_stats(units, hashes)}
        self.log(
            f"{name:28s} rel_l2 max {m['rel_l2_max']:.2e}  max_rel max {m['max_rel_max']:.2e}  "
            f"seed-hash match {m['seed_hash_row_match']:.1%}"
        )


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


def propose(measurements: dict, imported: dict) -> dict:
    """Per class: thresholds between the worst honest row and the weakest cheat unit.

    max-element/RMS goes first, with a wide margin over honest outliers: it catches the
    cheats that leave large single-element errors (skipped or wrong layers, flipped maxima,
    int4 weights). rel-L2 then sits geometrically between the honest worst and the weakest
    required cheat that max-element/RMS does not catch (noise, int8 weights)."""
    honest = {k: v for k, v in {**measurements, **imported}.items() if not k.startswith("cheat_")}
    out = {}
    for klass in ("strict", "loose"):
        members = {k: v for k, v in honest.items() if klass == "loose" or v["dtype"] in STRICT_DTYPES}
        h_rel = max(v["rel_l2_max"] for v in members.values())
        h_max = max(v["max_rel_max"] for v in members.values())
        cheats = {c: measurements["cheat_" + c.replace("=", "_")] for c in MUST_CATCH[klass]}
        outliers = [v["unit_max_rel_min"] for v in cheats.values() if v["unit_max_rel_min"] > h_max * 3]
        tau_max = math.sqrt(h_max * min(outliers)) if outliers else h_max * 3
        rest = [v["unit_rel_l2_min"] for v in cheats.values() if v["unit_max_rel_min"] <= tau_max]
        c_rel = min(rest) if rest else h_rel * 4
        tau = math.sqrt(h_rel * c_rel) if c_rel > h_rel else h_rel * 2
        caught = {}
        for c in CHEATS:
            v = measurements["cheat_" + c.replace("=", "_")]
            caught[c] = v["unit_rel_l2_min"] > tau or v["unit_max_rel_min"] > tau_max
        out[klass] = {
            "rel_l2": tau,
            "max_rel": tau_max,
            "honest_members": sorted(members),
            "honest_worst_rel_l2": h_rel,
            "honest_worst_max_rel": h_max,
            "weakest_required_cheat_rel_l2": c_rel,
            "rel_l2_margin_over_honest": tau / h_rel,
            "rel_l2_margin_under_cheat": c_rel / tau,
            "max_rel_margin_over_honest": tau_max / h_max,
            "must_catch": MUST_CATCH[klass],
            "caught_at_every_unit": caught,
            "separates_all_required": all(caught[c] for c in MUST_CATCH[klass]),
        }
    return out
