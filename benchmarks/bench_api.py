"""HTTP API benchmark: time to first token (TTFT) and inter-token latency (ITL) as a client sees
them, through the OpenAI-compatible API (SSE, verified and optimistic release) against
`session run`'s gRPC stream, on the same 3-process cluster (workers 0-10 and 10-20, the
coordinator 20-30 and the head, serving HTTP in-process), same prompt, greedy, interleaved over
--rounds (the machine is shared and noisy).

Verified release sends a token once no audit can roll it back any more, so its TTFT and ITL
grow with --audit-probability: that difference against optimistic release is the cost of
never retracting text. All three paths must give the same text.

    .venv/bin/python benchmarks/bench_api.py --out results/bench_api.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from consortium.coordinator.client import Client
from consortium.coordinator.launcher import LocalCluster, thirds
from consortium.core.config import ClientConfig, EngineConfig, SessionRequest
from consortium.model.files import resolve_model
from consortium.model.gguf_file import GGUFModel
from consortium.model.sampling import SamplingParams

PROMPT = "Explain in one paragraph why the sky appears blue."
MODES = ("grpc", "api-verified", "api-optimistic")


def grpc_run(client: ClientConfig, prompt: str, max_tokens: int) -> tuple[list[float], str]:
    """Arrival times (from the request) of each token's text, and the text (`session run`)."""
    times, parts = [], []
    t0 = time.perf_counter()

    def on_text(text: str) -> None:
        times.append(time.perf_counter() - t0)
        parts.append(text)

    with Client(client) as c:
        c.run(SessionRequest(prompt, max_tokens, SamplingParams()), on_text=on_text)
    return times, "".join(parts)


def api_run(url: str, model: str, prompt: str, max_tokens: int, release: str) -> tuple[list[float], str]:
    """The same through POST /v1/chat/completions with stream=true: arrival of each text chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    body |= {"stream": True, "release": release, "temperature": 0}
    times, parts = [], []
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            text = ev["choices"][0]["delta"].get("content") if ev["choices"] else None
            if text:
                times.append(time.perf_counter() - t0)
                parts.append(text)
    return times, "".join(parts)


def summarize(runs: list[list[float]]) -> dict:
    ttft = [t[0] for t in runs if t]
    itl = [b - a for t in runs for a, b in zip(t, t[1:], strict=False)]
    e2e = [t[-1] for t in runs if t]
    decode = [(len(t) - 1) / (t[-1] - t[0]) for t in runs if len(t) > 1 and t[-1] > t[0]]
    q = statistics.quantiles(itl, n=10) if len(itl) >= 2 else [0.0] * 9
    return {
        "ttft_ms_median": round(1000 * statistics.median(ttft), 1),
        "itl_ms_median": round(1000 * statistics.median(itl), 2) if itl else 0.0,
        "itl_ms_p90": round(1000 * q[8], 2),
        "itl_ms_max": round(1000 * max(itl), 1) if itl else 0.0,
        "e2e_s_median": round(statistics.median(e2e), 3),
        "chunks_per_second_median": round(statistics.median(decode), 2) if decode else 0.0,
        "runs": len(runs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: the pulled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--audit-probability", type=float, default=0.2)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", type=Path, default=Path("results/bench_api.json"))
    a = ap.parse_args(argv)

    model = resolve_model(a.model)
    first, second, last = thirds(GGUFModel(model).args.n_layers)
    args = ["--http-port", "0", "--audit-probability", str(a.audit_probability)]
    logs = Path(tempfile.mkdtemp(prefix="bench-api-"))
    times: dict[str, list[list[float]]] = {m: [] for m in MODES}
    texts: dict[str, set[str]] = {m: set() for m in MODES}
    with LocalCluster(model, last, [first, second], logs, EngineConfig(), coordinator_args=args) as cluster:
        cluster.start(timeout_s=300)
        run = {
            "grpc": lambda: grpc_run(cluster.client_config(), a.prompt, a.max_tokens),
            "api-verified": lambda: api_run(cluster.http_url, model.stem, a.prompt, a.max_tokens, "verified"),
            "api-optimistic": lambda: api_run(
                cluster.http_url, model.stem, a.prompt, a.max_tokens, "optimistic"
            ),
        }
        for m in MODES:  # warm-up: first-session costs (caches, auditor) stay out of the figures
            run[m]()
        for r in range(a.rounds):
            for m in MODES:
                t, text = run[m]()
                times[m].append(t)
                texts[m].add(text)
                print(
                    f"round {r + 1}/{a.rounds} {m:<15} TTFT {1000 * t[0]:7.1f} ms, {len(t)} chunks",
                    flush=True,
                )
    result = {m: summarize(times[m]) for m in MODES}
    v, o = result["api-verified"], result["api-optimistic"]
    out = {
        "model": model.name,
        "max_tokens": a.max_tokens,
        "audit_probability": a.audit_probability,
        "rounds": a.rounds,
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "modes": result,
        "verified_minus_optimistic": {
            "ttft_ms": round(v["ttft_ms_median"] - o["ttft_ms_median"], 1),
            "itl_ms_median": round(v["itl_ms_median"] - o["itl_ms_median"], 2),
            "itl_ms_p90": round(v["itl_ms_p90"] - o["itl_ms_p90"], 2),
            "e2e_s": round(v["e2e_s_median"] - o["e2e_s_median"], 3),
        },
        "api_minus_grpc_ttft_ms": round(o["ttft_ms_median"] - result["grpc"]["ttft_ms_median"], 1),
        "same_text": len(set().union(*texts.values())) == 1,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if out["same_text"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
