"""`consortium demo`: three local processes, one session, everything stopped afterwards,
also when interrupted with Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers.cli import REPORT_KEYS, consortium
from helpers.cluster import processes_mentioning
from helpers.tiny_model import TinySpec, write_tiny_gguf

from consortium.core import cpus


@pytest.mark.model
def test_demo_json_and_clean_shutdown(smollm_path, tmp_path):
    done = consortium("demo", "--json", "--max-tokens", "8", "--log-dir", str(tmp_path), timeout=400)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)  # stdout holds the one object only
    assert set(out) >= REPORT_KEYS
    assert len(out["tokens"]) == 8
    # thirds, or 2/5 for the coordinator where the workers share a CPU (launcher.demo_ranges)
    split = [[0, 10], [10, 20], [20, 30]] if len(cpus.available() or ()) != 2 else [[0, 9], [9, 18], [18, 30]]
    assert [s["layers"] for s in out["stages"]] == split
    assert all(s["mean_step_ms"] > 0 and s["device"] == "cpu" for s in out["stages"])
    for name in ("coordinator", "worker-0", "worker-1"):  # each process logged to the file it printed
        assert f"{tmp_path / name}.log" in done.stderr
        assert "ready" in (tmp_path / f"{name}.log").read_text()
    assert "all processes stopped" in done.stderr
    assert processes_mentioning(str(tmp_path)) == []


def test_demo_ctrl_c_stops_every_process(tmp_path):
    # a long context, so the session is still running when Ctrl-C comes (the default tiny
    # model's 100 tokens can finish first on an idle machine)
    model = write_tiny_gguf(tmp_path / "long.gguf", TinySpec(context_length=8192))
    logs = tmp_path / "logs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consortium",
            "demo",
            "--model",
            str(model),
            "--max-tokens",
            "8000",
            "--log-dir",
            str(logs),
            "--no-chat",
            "--prompt",
            "a",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as in a terminal: a runner started in the background (nohup ... &) passes SIGINT on ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Drain stdout as a terminal would (a full pipe would block the demo's writes), and
    # interrupt once text is streaming, i.e. in the middle of the session.
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    err = ""
    try:
        deadline = time.monotonic() + 300
        seen = ""
        while "cluster ready" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stderr.readline()
        assert "cluster ready" in seen, seen
        assert len([p for p in processes_mentioning(str(logs)) if p.pid != proc.pid]) == 3
        while not out and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the session ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        proc.wait(timeout=120)  # stderr carries a few lines only: no pipe to drain meanwhile
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "all processes stopped" in err and "interrupted" in err and "Traceback" not in err
    assert processes_mentioning(str(logs)) == []
