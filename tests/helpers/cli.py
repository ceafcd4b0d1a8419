"""The CLI as a user runs it: a fresh process, and the one-line error it must print."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def consortium(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the CLI in a fresh process (its own group, killed on timeout)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "consortium", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_error(done: subprocess.CompletedProcess, match: str) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


# the keys every `--json` session report has (those of `consortium generate --json` and the pipeline's)
REPORT_KEYS = {
    "tokens",
    "text",
    "prompt_tokens",
    "tokens_per_second",
    "time_to_first_token_s",
    "session_id",
    "stages",
}
