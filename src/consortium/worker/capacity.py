"""What a node offers for placement: a measured speed (its memory: model.memory.available_bytes)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from consortium.model.model import DTYPES


def measure_speed_gflops(device: str, dtype: str, seconds: float = 0.2, n: int = 2048) -> float:
    """Matrix-vector throughput (GFLOP/s) in the compute dtype: decode is bound by this,
    and an n x n matrix (16 MiB in fp32) mostly streams from memory rather than cache."""
    tdt = DTYPES[dtype]
    w = torch.randn(n, n, device=device).to(tdt)
    x = torch.randn(1, n, device=device).to(tdt)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        F.linear(x, w)
        sync()
        calls, t0 = 0, time.perf_counter()
        while True:
            F.linear(x, w)
            calls += 1
            if calls % 4 == 0:
                sync()
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
    return 2.0 * n * n * calls / elapsed / 1e9
