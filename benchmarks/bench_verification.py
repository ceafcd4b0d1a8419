"""Verification acceptance run on the real model (SmolLM2) and the 3-process CPU cluster.

1. honest: N sessions x T tokens at audit probability 1.0: failed audits must be zero;
   side by side, the original plan's rule (fp16, round(x*64)/64, clamp +-100, SHA-256
   equality) judged on the same computations (decode-step outputs vs the audit's prefill
   recomputation, CPU fp32) and its false-fraud rate;
2. every cheat at probability 1.0 and at 0.2 (seeded): caught, banned, honest final tokens;
3. int8-weights: per-unit detection rate in the strict class;
4. overhead: commitment + signing + checking per decode step against the step time, and
   tok/s at audit probability 0.2 against 0 (same cluster, interleaved).

    .venv/bin/python benchmarks/bench_verification.py --out results/bench_verification.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from consortium.coordinator.client import Client
from consortium.coordinator.launcher import LocalCluster, thirds
from consortium.core.config import SessionRequest
from consortium.identity import NodeIdentity
from consortium.model.files import resolve_model
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec
from consortium.model.sampling import SamplingParams
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor
from consortium.verification.commitment import seed_style_hash
from consortium.verification.receipts import check_work_receipt, input_digest, make_receipt, to_proto
from consortium.verification.tolerance import compare_rows, tolerance_class

PROMPTS = [
    "Explain in one paragraph why the sky appears blue.",
    "Write a haiku about autumn rain.",
    "Give three tips for learning a new language.",
    "What is the capital of France, and why is it famous?",
    "Describe how a bicycle works to a child.",
]
CHEATS = [
    "skip-layer",
    "noise=0.01",
    "wrong-weights",
    "int4-weights",
    "int8-weights",
    "flip-max",
    "bad-signature",
    "replay",
]


def cluster(
    model: Path, log_dir: Path, misbehave: str | None = None, probability: float = 1.0
) -> LocalCluster:
    first, second, last = thirds(GGUFModel(model).args.n_layers)
    c = LocalCluster(
        model,
        last,
        [first, second],
        log_dir,
        coordinator_args=["--audit-probability", str(probability), "--ledger", str(log_dir / "ledger.db")],
        worker_args=[[], ["--misbehave", misbehave] if misbehave else []],
    )
    c.start(timeout_s=300)
    return c


def honest_runs(model: Path, tmp: Path, sessions: int, tokens: int) -> tuple[dict, dict[str, list[int]]]:
    c = cluster(model, tmp / "honest")
    reference: dict[str, list[int]] = {}
    try:
        totals = {"sessions": 0, "tokens": 0, "audits": 0, "passed": 0, "failed": 0, "rollbacks": 0}
        with Client(c.client_config()) as client:
            for i in range(sessions):
                prompt = PROMPTS[i % len(PROMPTS)]
                sampling = SamplingParams() if i < len(PROMPTS) else SamplingParams(0.8, 40, 0.95, seed=i)
                r = client.run(SessionRequest(prompt, tokens, sampling, audit_probability=1.0))
                if i < len(PROMPTS):
                    reference[prompt] = r.tokens
                totals["sessions"] += 1
                totals["tokens"] += len(r.tokens)
                totals["audits"] += r.audits.total
                totals["passed"] += r.audits.passed
                totals["failed"] += r.audits.failed
                totals["rollbacks"] += len(r.rollbacks)
                print(f"honest session {i}: {len(r.tokens)} tokens, audits {r.audits}", flush=True)
    finally:
        c.stop()
    return totals, reference


def seed_rule_side_by_side(model: Path, tokens: int) -> dict:
    """The audit's comparison (decode outputs vs one prefill) judged by both rules, per unit."""
    gguf = GGUFModel(model)
    tok = GGUFTokenizer(gguf)
    ranges = thirds(gguf.args.n_layers)
    stages = [Stage(gguf, StageSpec(r.start, r.end)) for r in ranges]
    tol = tolerance_class("fp32")
    units = hash_fail = tol_fail = rows = row_hash_fail = 0
    for prompt in PROMPTS:
        ids = tok.encode_prompt(prompt, chat=True)
        caches = [s.new_cache(len(ids) + tokens) for s in stages]
        inputs: list[list[torch.Tensor]] = [[] for _ in stages]
        outputs: list[list[torch.Tensor]] = [[] for _ in stages]
        x = torch.tensor(ids)
        for _ in range(tokens):  # generation as the cluster runs it: prefill, then decode steps
            for k, (st, cache) in enumerate(zip(stages, caches, strict=True)):
                inputs[k].append(x)
                x = st(x, cache, all_logits=st.is_last)
                outputs[k].append(x)
            x = torch.tensor([int(x[-1].argmax())])
        for k, st in enumerate(stages[:-1]):  # hidden-state stages, as audited
            committed = torch.cat(outputs[k])
            recomputed = st(torch.cat(inputs[k]), st.new_cache(committed.shape[0]))
            units += 1
            a, b = seed_style_hash(committed), seed_style_hash(recomputed)
            row_hash_fail += sum(x != y for x, y in zip(a, b, strict=True))
            rows += len(a)
            hash_fail += a != b
            tol_fail += bool(compare_rows(committed, recomputed).failing_rows(tol))
    return {
        "units": units,
        "rows": rows,
        "seed_rule_false_fraud_units": hash_fail / units,
        "seed_rule_false_fraud_rows": row_hash_fail / rows,
        "tolerance_false_fraud_units": tol_fail / units,
    }


def cheat_runs(model: Path, tmp: Path, reference: dict[str, list[int]], tokens: int) -> dict:
    os.environ["CONSORTIUM_ALLOW_MISBEHAVE"] = "1"
    prompt = PROMPTS[0]
    out = {}
    for kind in CHEATS:
        for p in (1.0, 0.2):
            c = cluster(model, tmp / f"cheat-{kind.replace('=', '_')}-{p}", misbehave=kind, probability=p)
            try:
                with Client(c.client_config()) as client:
                    t0 = time.perf_counter()
                    r = client.run(
                        SessionRequest(prompt, tokens, SamplingParams(), audit_probability=p, audit_seed=7)
                    )
                    wall = time.perf_counter() - t0
            finally:
                c.stop()
            res = {
                "caught": bool(r.rollbacks),
                "banned": r.banned_nodes,
                "honest_tokens": r.tokens == reference[prompt],
                "audits": asdict(r.audits),
                "first_rollback": asdict(r.rollbacks[0]) if r.rollbacks else None,
                "wall_s": wall,
            }
            out[f"{kind}@{p}"] = res
            print(f"cheat {kind} at p={p}: {res}", flush=True)
    return out


def overhead(model: Path, tmp: Path, tokens: int, rounds: int) -> dict:
    # per decode step: the worker signs, the coordinator checks (fp32 [1, 576] output)
    node = NodeIdentity.generate()
    inp, out = WireTensor.from_torch(torch.randn(1, 576)), WireTensor.from_torch(torch.randn(1, 576))
    order = pb.WorkOrder(
        session_id="s" * 32,
        step=5,
        stage_index=1,
        layers=pb.LayerRange(start=10, end=20),
        start_position=50,
        input=inp.to_proto(),
    )
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        r = to_proto(make_receipt(node, "w", order, "d" * 64, inp, out))
    sign_us = (time.perf_counter() - t0) / n * 1e6
    want = input_digest("s" * 32, 1, 50, inp)
    t0 = time.perf_counter()
    for _ in range(n):
        check_work_receipt(r, order, node.public_key, "d" * 64, want, out)
    check_us = (time.perf_counter() - t0) / n * 1e6
    # tok/s at audit probability 0.2 vs 0, same cluster, interleaved
    c = cluster(model, tmp / "overhead", probability=0.0)
    tps: dict[str, list[float]] = {"0.0": [], "0.2": []}
    step_ms: list[float] = []
    try:
        with Client(c.client_config()) as client:
            for _ in range(rounds):
                for p in (0.0, 0.2):
                    r = client.run(SessionRequest(PROMPTS[0], tokens, SamplingParams(), audit_probability=p))
                    tps[str(p)].append(r.tokens_per_second)
                    if p == 0.0:
                        step_ms.append(1000 / r.tokens_per_second)
    finally:
        c.stop()
    per_step_us = 2 * (sign_us + check_us)  # two remote stages per decode step
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "sign_us_per_result": sign_us,
        "check_us_per_result": check_us,
        "decode_step_ms": statistics.median(step_ms),
        "commit_sign_check_share_of_step": per_step_us / 1000 / statistics.median(step_ms),
        "tok_s": tps,
        "tok_s_median": med,
        "tok_s_ratio_p0.2_vs_p0": med["0.2"] / med["0.0"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: honest,seed,cheats,overhead")
    ap.add_argument("--out", type=Path, default=Path("results/bench_verification.json"))
    a = ap.parse_args(argv)
    model = resolve_model(a.model)
    skip = set(filter(None, a.skip.split(",")))
    result: dict = {"model": model.name, "torch": torch.__version__, "tokens": a.tokens}
    with tempfile.TemporaryDirectory(prefix="bench-verif-") as d:
        tmp = Path(d)
        reference: dict[str, list[int]] = {}
        if "honest" not in skip:
            result["honest"], reference = honest_runs(model, tmp, a.sessions, a.tokens)
        if "seed" not in skip:
            result["seed_rule_vs_tolerance"] = seed_rule_side_by_side(model, a.tokens)
            print("seed rule:", result["seed_rule_vs_tolerance"], flush=True)
        if "cheats" not in skip and reference:
            result["cheats"] = cheat_runs(model, tmp, reference, a.tokens)
        if "overhead" not in skip:
            result["overhead"] = overhead(model, tmp, a.tokens, a.rounds)
            print("overhead:", result["overhead"], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
