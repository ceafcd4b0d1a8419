"""`consortium demo --serve`: the demo's cluster kept running with the HTTP API."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from consortium.coordinator.launcher import DemoConfig, demo_cluster, demo_layout, demo_model
from consortium.errors import ConsortiumError


def serve_demo(cfg: DemoConfig, note: Callable[[str], None]) -> None:
    """The demo's cluster with the HTTP API on its coordinator, until Ctrl-C (or until the
    coordinator exits); every process is stopped at the end. `note` gets the lines to show."""
    if cfg.serve is None or cfg.kill_at is not None:
        raise ConsortiumError("demo --serve runs no session of its own: drop --kill-at")
    cluster = demo_cluster(cfg, demo_model(cfg, note))
    try:
        for line in demo_layout(cluster):
            note(line)
        cluster.start()
        url, model = cluster.http_url, cluster.model.stem
        note(f"cluster ready: OpenAI-compatible API at {url}/v1 (model {model!r}), status page {url}/")
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}]})
        note(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
        note("Ctrl-C stops every process")
        while True:
            cluster.processes[0].check_running()
            time.sleep(0.5)
    finally:
        cluster.stop()
        note("all processes stopped")
