"""Starts a coordinator and workers as local processes (the demo, benchmarks, tests), and the
demo itself (run_demo: a three-process cluster here, one session, everything stopped).

Each process runs in its own process group and session, logs to its own file, binds port 0
and reports the port it got in a port file (write_port_file), and exits if this process dies
(--exit-with-parent). `stop()` terminates every group, then kills what is left: nothing
outlives the cluster, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from consortium.core import cpus
from consortium.core.config import ClientConfig, EngineConfig, LayerRange, SessionRequest, default_log_dir
from consortium.errors import ConsortiumError
from consortium.identity.tls import CERT_FILE
from consortium.serving.config import ServeConfig
from consortium.verification.tolerance import class_of

DEMO_PROMPT = "Explain in one paragraph why the sky appears blue."


def write_port_file(path: Path, port: int) -> None:
    """Reports a child's bound port: written whole or not at all (rename), once it serves."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def read_port_file(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except FileNotFoundError:
        return None


@dataclass
class LocalProcess:
    """One `consortium coordinator|worker start` child; `port` is known once it reported it."""

    name: str
    args: list[str]
    log_file: Path
    proc: subprocess.Popen | None = None
    port: int | None = None
    http_port: int | None = None  # a coordinator started with --http-port: its HTTP API's

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def port_file(self) -> Path:
        return self.log_file.with_suffix(".port")

    @property
    def http_port_file(self) -> Path:
        return self.log_file.with_suffix(".http-port")

    def start(self, env: dict[str, str]) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)  # a previous run's, in a reused log folder
        extra = ["--log-file", str(self.log_file), "--exit-with-parent", "--port-file", str(self.port_file)]
        args = _with_value(self.args, "--port", self.port)  # a restart binds the port its peers know
        if "--http-port" in args:
            self.http_port_file.unlink(missing_ok=True)
            extra += ["--http-port-file", str(self.http_port_file)]
            args = _with_value(args, "--http-port", self.http_port)
        with open(self.log_file, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consortium", *args, *extra],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: Ctrl-C in a terminal reaches only us
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def check_running(self) -> None:
        if self.exited() is not None:
            raise ConsortiumError(
                f"{self.name} exited with status {self.exited()}: {self.log_tail()} (log: {self.log_file})"
            )

    def wait_port(self, timeout_s: float) -> int:
        """The port the process bound, once it serves (it writes its port file then)."""
        self.port = self._wait_file(self.port_file, timeout_s)
        return self.port

    def wait_http_port(self, timeout_s: float) -> int:
        """The HTTP API's port (a coordinator started with --http-port reports it before serving)."""
        self.http_port = self._wait_file(self.http_port_file, timeout_s)
        return self.http_port

    def _wait_file(self, path: Path, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while (port := read_port_file(path)) is None:
            self.check_running()
            if time.monotonic() > deadline:
                raise ConsortiumError(
                    f"{self.name} is not serving after {timeout_s:g} s (log: {self.log_file})"
                )
            time.sleep(0.05)
        return port

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
    port: int | None = None  # the coordinator's, once it serves
    insecure: bool = False  # plain-text gRPC everywhere (default: TLS, certificates pinned)
    http_port: int | None = None  # its HTTP API's, when coordinator_args has --http-port
    # each process's CPUs, coordinator first ([]: unpinned); None: cpus.local_plan of engine.cpus,
    # else of those this process may use, where the platform can pin
    cpu_plan: list[cpus.CPUs] | None = None

    def __post_init__(self) -> None:
        mine = cpus.machine(self.engine.cpus)
        if not self.engine.threads:  # the processes share these cores
            cores = len(mine) or os.cpu_count() or 1
            self.engine = replace(self.engine, threads=local_threads(cores, 1 + len(self.worker_layers)))
        if self.cpu_plan is None:
            self.cpu_plan = cpus.local_plan(mine, len(self.worker_layers))

    @property
    def address(self) -> str:
        if self.port is None:
            raise ConsortiumError("the local cluster's coordinator is not serving yet")
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        if self.http_port is None:
            raise ConsortiumError("the local cluster's coordinator serves no HTTP API")
        scheme = "https" if "--http-tls-cert" in self.coordinator_args else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def coordinator_dir(self) -> Path:
        """The coordinator's key and TLS pair (kept across its restarts); the cluster's workers
        (trust_args) and clients (client_config) pin its certificate."""
        return self.log_dir / "coordinator.identity"

    def trust_args(self) -> list[str]:
        cert = str(self.coordinator_dir / CERT_FILE)
        return ["--insecure"] if self.insecure else ["--coordinator-cert", cert]

    def client_config(self, **kw) -> ClientConfig:
        cert = None if self.insecure else str(self.coordinator_dir / CERT_FILE)
        trust = {"insecure": self.insecure, "coordinator_cert": cert, "data_dir": self.log_dir / "client"}
        return ClientConfig(self.address, **trust, **kw)

    def _engine_args(self, process: int) -> list[str]:
        """Process 0 is the coordinator, i + 1 worker i."""
        e = self.engine
        args = ["--device", e.device, "--dtype", e.dtype, "--packed" if e.packed else "--no-packed"]
        args += [] if e.pack_cache else ["--no-pack-cache"]
        args += ["--cpus", cpus.to_text(self.cpu_plan[process])] if self.cpu_plan else []
        return args + (["--threads", str(e.threads)] if e.threads else [])

    def _coordinator(self) -> LocalProcess:
        args = ["coordinator", "start", "--model", str(self.model), "--host", self.host, "--port", "0"]
        args += ["--data-dir", str(self.coordinator_dir), *self._engine_args(0), *self.coordinator_args]
        if class_of(self.engine.dtype, self.engine.packed) != "strict" and "--tolerance-classes" not in args:
            args += [
                "--tolerance-classes",
                "all",
            ]  # the engine asked for is the admission: its sessions say so
        args += ["--insecure"] if self.insecure else []
        if self.coordinator_layers is not None:
            args += ["--layers", str(self.coordinator_layers)]
        return LocalProcess("coordinator", args, self.log_dir / "coordinator.log")

    def _worker(self, i: int, layers: LayerRange | None) -> LocalProcess:
        args = [
            "worker",
            "start",
            "--coordinator",
            self.address,
            "--model",
            str(self.model),
            "--host",
            self.host,
        ]
        args += ["--node-id", f"worker-{i}", *self._engine_args(i + 1), *self.trust_args()]
        args += ["--data-dir", str(self.log_dir / f"worker-{i}.identity")]  # each its own Ed25519 key
        if layers is not None:
            args += ["--layers", str(layers)]
        if i < len(self.worker_args):
            args += self.worker_args[i]
        return LocalProcess(f"worker-{i}", args, self.log_dir / f"worker-{i}.log")

    def start(self, timeout_s: float = 120.0, complete: bool = True) -> None:
        """Starts the coordinator on a port of its choosing, then the workers, and waits until all
        nodes are registered and, if `complete`, their ranges make a pipeline (or await placement)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # the processes share this machine's cores: an idle process's OpenMP threads spin only
        # briefly before they sleep, instead of ~0.3 s against the busy one. PASSIVE (no spin)
        # costs a wake-up per op: SmolLM2 at 2 threads 59 -> 25 tok/s; a short spin keeps 56
        if "OMP_WAIT_POLICY" not in env:
            env.setdefault("GOMP_SPINCOUNT", "10000")
        deadline = time.monotonic() + timeout_s
        try:
            self.processes.append(self._coordinator())
            self.processes[0].start(env)
            self.port = self.processes[0].wait_port(timeout_s)
            if "--http-port" in self.coordinator_args:  # reported before the gRPC port: there now
                self.http_port = self.processes[0].wait_http_port(timeout_s)
            for i, layers in enumerate(self.worker_layers):
                self.processes.append(self._worker(i, layers))
                self.processes[-1].start(env)
            self.wait_ready(deadline - time.monotonic(), complete)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float, complete: bool = True) -> None:
        """Polls the coordinator until every node is registered and alive."""
        from consortium.coordinator.client import Client

        expected = len(self.worker_layers) + (1 if self.coordinator_layers is not None else 0)
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with Client(self.client_config(connect_timeout_s=1.0)) as client:
            while time.monotonic() < deadline:
                for p in self.processes:
                    p.check_running()
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

    def process(self, name: str) -> LocalProcess:
        return next(p for p in self.processes if p.name == name)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _with_value(args: list[str], flag: str, value: int | None) -> list[str]:
    """`args` with `flag`'s value replaced by `value` (unchanged when None or absent)."""
    if value is None or flag not in args:
        return args
    i = args.index(flag)
    return [*args[: i + 1], str(value), *args[i + 2 :]]


def local_threads(cores: int, processes: int) -> int:
    """Torch threads per process when `processes` share `cores` (those this process may use, not
    every core of the machine): the cores divided among them, at least one. Measured on a shared
    2-core machine (the demo, the packed fp32 kernel on OpenMP): two threads per process were
    slower than one, at 1 and 8 sessions (an idle process's threads sleep, and waking them costs
    more than the second thread gives); results do not depend on the thread count (the SmolLM2
    equality tests run `consortium generate` with torch's default threads against 1-thread
    stages)."""
    return max(1, cores // processes)


def thirds(n_layers: int) -> list[LayerRange]:
    """Three contiguous ranges covering [0, n_layers): 0-10, 10-20, 20-30 for 30 layers."""
    if n_layers < 3:
        raise ConsortiumError(f"a three-stage pipeline needs at least 3 layers; the model has {n_layers}")
    cuts = [round(n_layers * k / 3) for k in range(4)]
    return [LayerRange(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


# --- the demo ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """`consortium demo`: a coordinator (the last third of the layers) and two workers here."""

    request: SessionRequest = field(default_factory=lambda: SessionRequest(DEMO_PROMPT))
    model: Path | None = None  # None: the default model, pulled first if missing
    engine: EngineConfig = field(default_factory=EngineConfig)
    log_dir: Path | None = None  # None: a new demo-* folder under the log directory
    misbehave: str | None = None  # tests only: the worker of the middle layers cheats so
    kill_at: int | None = None  # kill -9 the worker of the middle layers after this many tokens
    standby: bool = False  # also a standby worker: a failover moves the stage there
    quiet: bool = False  # no pull progress on stdout
    serve: ServeConfig | None = None  # --serve: no session; the HTTP API until Ctrl-C (serve_demo)
    api_keys_file: Path | None = None  # the coordinator's --api-keys
    insecure: bool = False  # plain-text gRPC between the processes (warned)


def run_demo(cfg: DemoConfig, note: Callable[[str], None], on_end: Callable[[], None] | None = None, **live):
    """Starts the demo's cluster, runs its session (`live`: the streaming callbacks of
    Client.run; `on_end` runs when the session ended), stops every process, also on Ctrl-C;
    `note` gets the progress lines. Returns the SessionReport."""
    from consortium.coordinator.client import Client

    cfg.request.check()
    if cfg.misbehave:
        from consortium.verification.misbehave import Misbehaviour

        Misbehaviour.parse(cfg.misbehave)  # refused here, before anything starts, unless enabled
    cluster = demo_cluster(cfg, demo_model(cfg, note))
    try:
        for line in demo_layout(cluster):
            note(line)
        t0 = time.perf_counter()
        cluster.start()
        note(
            f"cluster ready on {cluster.address} in {time.perf_counter() - t0:.1f} s; prompt: {cfg.request.prompt!r}"
        )
        if cfg.kill_at is not None:
            live["on_text"] = kill_at_token(
                cluster.process("worker-1"), cfg.kill_at, live.get("on_text"), note
            )
        with Client(cluster.client_config()) as client:
            report = client.run(cfg.request, **live)
        if on_end is not None:
            on_end()
    finally:
        cluster.stop()
        note("all processes stopped")
    return report


def demo_ranges(n_layers: int, plan: list[cpus.CPUs]) -> list[LayerRange]:
    """The demo's three stages, the coordinator's last: thirds, unless the workers share CPUs
    the coordinator does not (fewer CPUs than processes: cpus.local_plan). Then the two CPU sets
    carry the two workers' stages against the coordinator's, whose CPU also runs the head and
    every session's bookkeeping: the coordinator takes 2/5 of the layers and the workers the
    rest evenly, which balanced the CPUs on the 2-core demo (SmolLM2 0-9 / 9-18 / 18-30: 8
    sessions 312 -> 332 tok/s over three alternating pairs; CPUs busy 0.73 / 0.81 -> 0.83 / 0.81)."""
    shared = len(plan) >= 3 and plan[1] == plan[2] and not set(plan[0]) & set(plan[1])
    if not shared:
        return thirds(n_layers)
    if n_layers < 3:
        raise ConsortiumError(f"a three-stage pipeline needs at least 3 layers; the model has {n_layers}")
    last = n_layers - round(n_layers * 2 / 5)
    first = round(last / 2)
    return [LayerRange(0, first), LayerRange(first, last), LayerRange(last, n_layers)]


def demo_cluster(cfg: DemoConfig, model: Path) -> LocalCluster:
    """The demo's processes: workers of the first and middle stages (and a standby), the
    coordinator hosting the last (demo_ranges), each on its share of the CPUs."""
    from consortium.model.gguf_file import GGUFModel

    workers_n = 3 if cfg.standby else 2
    plan = cpus.local_plan(cpus.machine(cfg.engine.cpus), workers_n)
    first, second, last = demo_ranges(GGUFModel(model).args.n_layers, plan)
    log_dir = cfg.log_dir or default_log_dir() / time.strftime("demo-%Y%m%d-%H%M%S")
    cheat = ["--misbehave", cfg.misbehave] if cfg.misbehave else []
    workers: list[LayerRange | None] = [first, second] + ([None] if cfg.standby else [])
    return LocalCluster(
        model,
        last,
        workers,
        log_dir,
        cfg.engine,
        coordinator_args=cfg.serve.cli_args(cfg.api_keys_file) if cfg.serve is not None else [],
        worker_args=[[], cheat, ["--standby"]],
        insecure=cfg.insecure,
        cpu_plan=plan,
    )


def demo_layout(cluster: LocalCluster) -> list[str]:
    """Which process runs which layers, and where each logs."""
    last, (first, second) = cluster.coordinator_layers, cluster.worker_layers[:2]
    lines = [f"starting: coordinator (layers {last}), workers (layers {first}, {second})"]
    plan = cluster.cpu_plan or []
    names = ["coordinator", *(f"worker-{k}" for k in range(len(cluster.worker_layers)))]
    for i, name in enumerate(names):
        layers = last if i == 0 else cluster.worker_layers[i - 1]
        what = f"layers {layers}" if layers is not None else "standby    "
        where = f"  on CPU{'s' * (len(plan[i]) > 1)} {cpus.to_text(plan[i])}" if plan else ""
        lines.append(f"  {name:<12} {what}{where}  log: {cluster.log_dir / name}.log")
    return lines


def demo_model(cfg: DemoConfig, note: Callable[[str], None]) -> Path:
    from consortium.model.files import default_model_path, pull, resolve_model

    if cfg.model is None and not default_model_path().is_file():
        note("pulling the default model ...")
        return pull(quiet=cfg.quiet)
    return resolve_model(cfg.model)


def kill_at_token(proc: LocalProcess, at: int, on_text, note: Callable[[str], None]):
    """An on_text callback that kills -9 `proc` when `at` tokens have streamed in."""
    count = 0

    def on_token(text: str) -> None:
        nonlocal count
        count += 1
        if on_text is not None:
            on_text(text)
        if count == at:
            proc.signal_group(signal.SIGKILL)
            note(f"\n[killed {proc.name} (pid {proc.pid}) with SIGKILL after {at} tokens]")

    return on_token
