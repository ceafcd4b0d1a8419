"""Fixtures that start real coordinator and worker processes on free ports.

Every cluster runs in its own process groups, is polled for readiness, and is stopped
(SIGTERM, then SIGKILL of the groups) by a finalizer, whatever the test did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from consortium.coordinator.client import Client
from consortium.coordinator.launcher import LocalCluster
from consortium.core.config import ClientConfig, LayerRange

STARTUP_S = 240.0  # three Python processes importing torch on a busy 2-core machine


def start_cluster(
    request, model: Path, log_dir: Path, coordinator_layers, worker_layers, complete: bool = True, **kw
) -> LocalCluster:
    cluster = LocalCluster(model, coordinator_layers, worker_layers, log_dir, **kw)
    request.addfinalizer(cluster.stop)
    cluster.start(timeout_s=STARTUP_S, complete=complete)
    return cluster


@pytest.fixture(scope="module")
def tiny_cluster(request, tiny_gguf, tmp_path_factory) -> LocalCluster:
    """Tiny model: workers 0-1 and 1-2, the coordinator 2-4; 1 MiB message limit everywhere."""
    small = ["--max-message-mb", "1"]
    return start_cluster(
        request, tiny_gguf, tmp_path_factory.mktemp("tiny-cluster"), LayerRange(2, 4),
        [LayerRange(0, 1), LayerRange(1, 2)], coordinator_args=small, worker_args=[small, small],
    )  # fmt: skip


@pytest.fixture
def client_for():
    clients = []

    def make(cluster: LocalCluster) -> Client:
        c = Client(ClientConfig(cluster.address))
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def consortium(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the CLI in a fresh process (its own group, killed on timeout)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "consortium", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
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


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains `text` (e.g. a cluster's log folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
