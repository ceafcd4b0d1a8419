"""Starts a coordinator and workers as local processes (the demo, benchmarks, tests).

Each process runs in its own process group and session, logs to its own file, and
exits if this process dies (--exit-with-parent). `stop()` terminates every group,
then kills what is left: nothing outlives the cluster, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from consortium.core.config import EngineConfig, LayerRange
from consortium.errors import ConsortiumError
from consortium.transport.rpc import free_port


@dataclass
class LocalProcess:
    name: str
    args: list[str]
    log_file: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, env: dict[str, str]) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consortium", *self.args, "--log-file", str(self.log_file), "--exit-with-parent"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # own process group: Ctrl-C in a terminal reaches only us
            )  # fmt: skip

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


@dataclass
class LocalCluster:
    """A coordinator (optionally hosting `coordinator_layers`) and one worker per entry of
    `worker_layers` (None: the worker asks placement for a range)."""

    model: Path
    coordinator_layers: LayerRange | None
    worker_layers: list[LayerRange | None]
    log_dir: Path
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    coordinator_args: list[str] = field(default_factory=list)
    worker_args: list[list[str]] = field(default_factory=list)
    processes: list[LocalProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port(self.host)
        if not self.engine.threads:  # the processes share this machine's cores
            self.engine = replace(self.engine, threads=local_threads(1 + len(self.worker_layers)))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _engine_args(self) -> list[str]:
        e = self.engine
        args = ["--device", e.device, "--dtype", e.dtype, "--packed" if e.packed else "--no-packed"]
        return args + (["--threads", str(e.threads)] if e.threads else [])

    def start(self, timeout_s: float = 120.0, complete: bool = True) -> None:
        """Starts every process and waits until all nodes are registered and, if `complete`,
        their ranges make a pipeline (or await placement)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        coord = ["coordinator", "start", "--model", str(self.model), "--host", self.host,
                 "--port", str(self.port), *self._engine_args(), *self.coordinator_args]  # fmt: skip
        if self.coordinator_layers is not None:
            coord += ["--layers", str(self.coordinator_layers)]
        self.processes.append(LocalProcess("coordinator", coord, self.log_dir / "coordinator.log", self.port))
        for i, layers in enumerate(self.worker_layers):
            port = free_port(self.host)
            args = ["worker", "start", "--coordinator", self.address, "--model", str(self.model), "--host",
                    self.host, "--port", str(port), "--node-id", f"worker-{i}", *self._engine_args(),
                    "--data-dir", str(self.log_dir / f"worker-{i}.identity")]  # each its own Ed25519 key  # fmt: skip
            if layers is not None:
                args += ["--layers", str(layers)]
            if i < len(self.worker_args):
                args += self.worker_args[i]
            self.processes.append(LocalProcess(f"worker-{i}", args, self.log_dir / f"worker-{i}.log", port))
        try:
            for p in self.processes:  # workers retry registration until the coordinator listens
                p.start(env)
            self.wait_ready(timeout_s, complete)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float, complete: bool = True) -> None:
        """Polls the coordinator until every node is registered and alive."""
        from consortium.coordinator.client import Client
        from consortium.core.config import ClientConfig

        expected = len(self.worker_layers) + (1 if self.coordinator_layers is not None else 0)
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with Client(ClientConfig(self.address, connect_timeout_s=1.0)) as client:
            while time.monotonic() < deadline:
                for p in self.processes:
                    if p.exited() is not None:
                        raise ConsortiumError(
                            f"{p.name} exited with status {p.exited()}: {p.log_tail()} (log: {p.log_file})"
                        )
                try:
                    st = client.cluster_status()
                    alive = sum(n["alive"] for n in st["nodes"])
                    if alive >= expected and (st["route"] or st["flexible_pending"] or not complete):
                        return
                    last = st["placement_error"] or f"{alive} of {expected} nodes registered"
                except ConsortiumError as e:
                    last = str(e)
                time.sleep(0.2)
        raise ConsortiumError(
            f"local cluster not ready after {timeout_s:g} s: {last} (logs in {self.log_dir})"
        )

    def stop(self, grace_s: float = 10.0) -> None:
        for p in self.processes:
            p.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.processes:
            if p.proc is None:
                continue
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal_group(signal.SIGKILL)
                p.proc.wait(5)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def local_threads(processes: int) -> int:
    """Torch threads per process when `processes` share this machine: the cores divided
    among them, at least one. Measured on a shared 2-core machine: one thread per process
    decodes as fast as two (decode is memory-bound) and, unlike two, does not collapse when
    another process takes a core; results do not depend on the thread count (the SmolLM2 equality tests run
    `consortium generate` with torch's default threads against 1-thread stages)."""
    return max(1, (os.cpu_count() or 1) // processes)


def thirds(n_layers: int) -> list[LayerRange]:
    """Three contiguous ranges covering [0, n_layers): 0-10, 10-20, 20-30 for 30 layers."""
    if n_layers < 3:
        raise ConsortiumError(f"a three-stage pipeline needs at least 3 layers; the model has {n_layers}")
    cuts = [round(n_layers * k / 3) for k in range(4)]
    return [LayerRange(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
