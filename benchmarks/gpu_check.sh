#!/usr/bin/env bash
# The GPU check, as it is, on a machine with CUDA (CI has none): tokens vs CPU fp32, load time,
# tok/s, peak GPU memory, bandwidth fraction, and a CUDA worker in a CPU pipeline with audits at
# 1.0, and continuous batching (batch invariance, 1/8/32 sessions). Synthesises its models (no
# download). Writes $OUT/gpu_check.json (default ./results).
# Uses .venv/bin/python when there is one, else python3 with src/ on the path.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYCHECK'
import importlib.util, sys
import torch
missing = [m for m in ("gguf", "tokenizers", "jinja2", "grpc", "cryptography", "nacl", "click", "rich", "psutil")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)} (pip install -e . first)")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device here")
PYCHECK
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@"
