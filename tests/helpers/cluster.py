"""Real coordinator and worker processes for integration tests: start them, add one more
worker, find leftovers, and wait for a condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from consortium.coordinator.launcher import LocalCluster, LocalProcess
from consortium.core.config import LayerRange

STARTUP_S = 240.0  # three Python processes importing torch on a busy 2-core machine
T = TypeVar("T")


def start_cluster(
    request,
    model: Path,
    log_dir: Path,
    coordinator_layers: LayerRange | None,
    worker_layers: list[LayerRange | None],
    complete: bool = True,
    **kw: Any,
) -> LocalCluster:
    """A started LocalCluster, stopped by a finalizer of `request` whatever the test does."""
    cluster = LocalCluster(model, coordinator_layers, worker_layers, log_dir, **kw)
    request.addfinalizer(cluster.stop)
    cluster.start(timeout_s=STARTUP_S, complete=complete)
    return cluster


def add_worker(cluster: LocalCluster, name: str, model: Path, log_file: Path, *args: str) -> LocalProcess:
    """Starts one more worker `name` of `cluster` (stopped with it); it binds a port of its own
    choosing and reports it (LocalProcess.wait_port)."""
    p = LocalProcess(
        name,
        [
            "worker",
            "start",
            "--coordinator",
            cluster.address,
            "--model",
            str(model),
            "--node-id",
            name,
            *args,
        ],
        log_file,
    )
    cluster.processes.append(p)
    p.start(dict(os.environ, PYTHONUNBUFFERED="1"))
    return p


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, what: str | Callable[[], str] = "condition"
) -> T:
    """Polls `predicate` until it returns something true (returned) or `timeout` seconds pass
    (AssertionError naming `what`, called for the message if callable)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}"
            )
        time.sleep(0.1)


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
