"""Cost of trust: decode tok/s of the demo cluster (workers 0-10 and 10-20, the coordinator
20-30 with the head) with TLS and signed control messages (the default) against `--insecure`
(plain text; calls still signed), and the cost of one call signature on its own.

Both clusters run at once and their sessions alternate over --rounds (the machine is shared
and noisy), same prompt, sampling and token count; the figure that matters is the ratio of
the medians, TLS / insecure. Also reported: each mode's per-hop overhead (the coordinator's
round trip to a worker minus the worker's forward time) and the microseconds to sign and to
verify one Execute order.

    .venv/bin/python benchmarks/bench_trust.py --out results/bench_trust.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from consortium.coordinator.client import Client
from consortium.coordinator.launcher import LocalCluster, thirds
from consortium.core.config import EngineConfig, SessionRequest
from consortium.identity import NodeIdentity
from consortium.model.files import resolve_model
from consortium.model.gguf_file import GGUFModel
from consortium.transport.auth import CallSigner, Gate
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor

PROMPT = "Explain in one paragraph why the sky appears blue."
MODES = ("tls", "insecure")


def signature_cost_us(dim: int, n: int = 2000) -> dict[str, float]:
    """Microseconds to sign and to verify one decode Execute order (hidden state [1, dim], fp32)."""
    coordinator, worker = NodeIdentity.generate(), NodeIdentity.generate()
    order = pb.WorkOrder(
        session_id="s" * 32, step=7, input=WireTensor.from_torch(torch.ones(1, dim)).to_proto()
    )
    signer, gate = CallSigner(coordinator, worker.public_key), Gate(worker.public_key)
    method = "/consortium.v1.Worker/Execute"
    t0 = time.perf_counter()
    headers = [signer.header(method, order) for _ in range(n)]
    t1 = time.perf_counter()
    for h in headers:
        gate.consume(gate.verify(method, order, [("consortium-auth-bin", h)]))
    t2 = time.perf_counter()
    return {"sign_us": (t1 - t0) / n * 1e6, "verify_us": (t2 - t1) / n * 1e6}


def hop_overhead_ms(report) -> float:
    remote = [s for s in report.stages if not s.local]
    return statistics.median(s.mean_step_ms - s.mean_compute_ms for s in remote)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the pulled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results/bench_trust.json"))
    a = ap.parse_args(argv)

    model = resolve_model(a.model)
    args = GGUFModel(model).args
    first, second, last = thirds(args.n_layers)
    req = SessionRequest(PROMPT, a.max_tokens, audit_probability=0.0)
    reports: dict[str, list] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as logs, ExitStack() as stack:
        clients = {}
        for mode in MODES:
            engine = EngineConfig(threads=1)  # the two clusters' six processes share the machine's cores
            cluster = LocalCluster(
                model, last, [first, second], Path(logs) / mode, engine, insecure=mode != "tls"
            )
            stack.enter_context(cluster)
            cluster.start(timeout_s=300)
            clients[mode] = stack.enter_context(Client(cluster.client_config()))
            clients[mode].run(replace(req, max_tokens=4))  # warm-up of its three processes
        for r in range(a.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:  # alternate which goes first
                reports[mode].append(clients[mode].run(req))
            print(
                f"round {r + 1}/{a.rounds}: "
                + ", ".join(f"{m} {reports[m][-1].tokens_per_second:.1f} tok/s" for m in MODES),
                file=sys.stderr,
            )

    tps = {m: [rep.tokens_per_second for rep in reports[m]] for m in MODES}
    median = {m: statistics.median(tps[m]) for m in MODES}
    result = {
        "benchmark": "trust",
        "model": str(model),
        "max_tokens": a.max_tokens,
        "rounds": a.rounds,
        "tokens_equal": all(
            x.tokens == y.tokens for x, y in zip(reports["tls"], reports["insecure"], strict=True)
        ),
        "tokens_per_second": tps,
        "tokens_per_second_median": median,
        "ratio_tls_over_insecure": median["tls"] / median["insecure"],
        "ratio_per_round": [t / i for t, i in zip(tps["tls"], tps["insecure"], strict=True)],
        "ratio_best_tls_over_best_insecure": max(tps["tls"]) / max(tps["insecure"]),  # least disturbed rounds
        "hop_overhead_ms_median": {
            m: statistics.median(hop_overhead_ms(x) for x in reports[m]) for m in MODES
        },
        "signature": signature_cost_us(args.dim),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "tokens_equal",
                    "tokens_per_second_median",
                    "ratio_tls_over_insecure",
                    "hop_overhead_ms_median",
                    "signature",
                )
            }
        )
    )
    return 0 if result["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
