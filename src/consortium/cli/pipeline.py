"""Node commands: `coordinator` and `worker` (registered in main.py).

Layer ranges are half-open everywhere: `--layers 10-20` means layers 10 .. 19.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import click

from consortium.cli.common import (
    DATA_DIR_DEFAULT,
    GB,
    MB,
    Group,
    audit_options,
    client_config,
    client_options,
    config_option,
    coordinator_option,
    engine_options,
    file_option,
    fill,
    folder_option,
    json_option,
    model_option,
    options,
    serve_config,
    serve_options,
    trust_options,
    warn_if_insecure,
)
from consortium.core.config import (
    CoordinatorConfig,
    EngineConfig,
    LayerRange,
    WorkerConfig,
    read_allowed_keys,
)
from consortium.errors import ConsortiumError
from consortium.serving.config_file import configurable

log = logging.getLogger("consortium.cli")


def _layers(ctx, param, value: str | None) -> LayerRange | None:
    try:
        return LayerRange.parse(value) if value else None
    except ConsortiumError as e:
        raise click.BadParameter(str(e)) from None


def layers_option(help: str):
    return click.option("--layers", callback=_layers, default=None, metavar="A-B", help=help)


def _model_path(model: str | None) -> Path:
    from consortium.model.files import resolve_model

    return resolve_model(model)


def _cpus(ctx, param, value: str | None) -> tuple[int, ...] | None:
    from consortium.core import cpus

    return cpus.parse(value) if value else None  # a bad list: one line, as every ConsortiumError


def node_options(cls: type):
    """Options shared by `coordinator start` and `worker start` (defaults from `cls`)."""
    return options(
        config_option(cls, "host", "--host", help="Interface to listen on."),
        config_option(
            EngineConfig,
            "threads",
            "--threads",
            help="Torch intra-op threads (0 = torch's default; results do not depend on it).",
        ),
        click.option(
            "--cpus",
            callback=_cpus,
            default=None,
            metavar="LIST",
            help="Run on these CPUs only, e.g. 0-3,6 (Linux; default: any). Local clusters split the machine's.",
        ),
        config_option(
            cls,
            "kv_cache_bytes",
            "--kv-cache-mb",
            scale=MB,
            positive=True,
            help="Memory budget of this node's KV caches (all sessions).",
        ),
        config_option(
            cls,
            "session_idle_timeout_s",
            "--session-idle-timeout",
            positive=True,
            help="Seconds after which an idle session's KV cache is freed.",
        ),
        config_option(
            cls,
            "max_message_bytes",
            "--max-message-mb",
            scale=MB,
            positive=True,
            help="Largest gRPC message sent or received.",
        ),
        file_option(
            "--log-file", "Log file (default: $CONSORTIUM_LOG_DIR or ~/.cache/consortium/logs/ROLE-PORT.log)."
        ),
        click.option(
            "--exit-with-parent", is_flag=True, hidden=True, help="Stop when the parent process dies."
        ),
        file_option(
            "--port-file", "Write the bound port here once serving (launcher.py's protocol).", hidden=True
        ),
    )


def port_option(cls: type):
    return config_option(cls, "port", "--port", help="Port to listen on (0 = any free port).")


def _serve(node, role: str, banner, port_file: Path | None, exit_with_parent: bool) -> None:
    """Starts `node`, prints its banner, reports its port (--port-file), and serves until
    SIGTERM/SIGINT (or the parent dies)."""
    from consortium.coordinator.launcher import write_port_file

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if exit_with_parent:
        _watch_parent(stop)
    log.info("starting %s (pid %d)", role, os.getpid())
    try:
        try:
            node.start()
        except ConsortiumError as e:
            log.error("%s failed to start: %s", role, e)
            raise
        click.echo(banner(node))
        if port_file is not None:
            write_port_file(port_file, node.port)
        log.info("ready")
        while not stop.wait(0.5):
            pass
        log.info("stopping (SIGTERM)")
    except KeyboardInterrupt:
        log.info("stopping (SIGINT)")
        raise
    finally:
        node.stop()
        log.info("stopped")


def _watch_parent(stop: threading.Event) -> None:
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                log.warning("parent process %d is gone; stopping", parent)
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# --- coordinator -------------------------------------------------------------------------


@click.group(cls=Group)
def coordinator() -> None:
    """Run or inspect a coordinator."""


coordinator_start_options = options(  # fill(CoordinatorConfig, options)
    model_option,
    port_option(CoordinatorConfig),
    layers_option("Layers this process runs itself, half-open (e.g. 20-30: the last layers and the head)."),
    engine_options,
    node_options(CoordinatorConfig),
    config_option(
        CoordinatorConfig,
        "heartbeat_interval_s",
        "--heartbeat-interval",
        positive=True,
        help="Seconds between a worker's heartbeats (the coordinator tells the workers).",
    ),
    config_option(
        CoordinatorConfig,
        "node_timeout_s",
        "--node-timeout",
        positive=True,
        help="Seconds without a heartbeat after which a node counts as dead.",
    ),
    config_option(
        CoordinatorConfig,
        "hang_after_s",
        "--hang-after",
        positive=True,
        help="A long call (prefill, replay) fails over when the node sends no heartbeat for this long.",
    ),
    config_option(
        CoordinatorConfig,
        "backup",
        "--backup/--no-backup",
        show_default=True,
        help="Take over a failed stage here when no spare or standby worker can.",
    ),
    config_option(CoordinatorConfig, "max_sessions", "--max-sessions", positive=True),
    config_option(
        CoordinatorConfig,
        "max_batch",
        "--max-batch",
        positive=True,
        help="Sessions whose work one call to a stage carries (continuous batching; 1 turns it off).",
    ),
    config_option(
        CoordinatorConfig,
        "batches_in_flight",
        "--batches-in-flight",
        positive=True,
        help="Batches the running sessions split into, so that stages work on different ones at once.",
    ),
    config_option(
        CoordinatorConfig,
        "max_sessions_per_client",
        "--max-sessions-per-client",
        positive=True,
        help="Sessions one client (its key or address) may run at once.",
    ),
    config_option(
        CoordinatorConfig,
        "sessions_per_minute_per_client",
        "--sessions-per-minute-per-client",
        positive=True,
        help="Session starts one client may make a minute.",
    ),
    config_option(
        CoordinatorConfig,
        "max_request_bytes",
        "--max-request-mb",
        scale=MB,
        positive=True,
        help="Largest request the coordinator accepts (a prompt must also fit the model's context).",
    ),
    config_option(
        CoordinatorConfig,
        "spill_bytes",
        "--spill-gb",
        type=float,
        scale=GB,
        positive=True,
        help="Disk beside the ledger for a remote last stage's logits, which audits compare (about "
        "0.5 MB a token for Llama 3); a session that cannot fit its worst case is refused "
        "(default: the disk's free space at start, less 1 GiB).",
    ),
    audit_options,
    file_option(
        "--ledger",
        "SQLite ledger of receipts, audits, evidence, bans (default: a new one in a temporary folder).",
    ),
    file_option(
        "--allow-keys", "Admit only workers whose public key (hex, one per line) is listed.", exists=True
    ),
    file_option(
        "--client-keys",
        "Serve sessions only to clients whose public key (hex, one per line, as `consortium identity show` "
        "prints) is listed; any other caller's status shows only counts and coverage.",
        exists=True,
    ),
    folder_option("--data-dir", f"This coordinator's Ed25519 key and TLS certificate ({DATA_DIR_DEFAULT})."),
    config_option(
        CoordinatorConfig,
        "insecure",
        "--insecure",
        is_flag=True,
        help="Plain-text gRPC without TLS (warned loudly): only on a network you trust.",
    ),
    config_option(
        CoordinatorConfig,
        "audit_recheck_probability",
        "--audit-recheck",
        help="Share of a remote auditor's passes this coordinator recomputes itself (a colluding auditor is banned).",
    ),
    config_option(
        CoordinatorConfig,
        "audit_workers",
        "--audit-workers",
        positive=True,
        help="Sessions audited at once (each session's audits run one after another).",
    ),
    config_option(
        CoordinatorConfig,
        "audit_memory_bytes",
        "--audit-memory-mb",
        type=int,
        scale=MB,
        positive=True,
        help="Memory this coordinator's audit stages may hold, in the audited stages' own dtype "
        "(default: free memory less 1 GiB); an audit over it is refused as unverifiable, never fraud.",
    ),
    config_option(
        CoordinatorConfig,
        "tolerance_classes",
        "--tolerance-classes",
        help="Numeric classes of nodes admitted: strict (fp32, fp16), loose (bf16, packed: weaker "
        "verification, see SECURITY.md), or all.",
    ),
    config_option(
        CoordinatorConfig,
        "calibration",
        "--calibration",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="This model's tolerances: a report of `consortium calibrate --model ...` (default: the "
        "committed SmolLM2 report; other models then get its class-wide bounds).",
    ),
    serve_options,
    file_option(
        "--http-port-file", "Write the HTTP API's bound port here (launcher.py's protocol).", hidden=True
    ),
)


@coordinator.command("start")
@coordinator_start_options
def coordinator_start(
    model, log_file, exit_with_parent, port_file, allow_keys, client_keys, http_port_file, **options
):
    """Serve the node registry, sessions and the token loop (optionally hosting --layers)."""
    from consortium.coordinator.server import build_coordinator
    from consortium.core.logs import setup_logging

    path = setup_logging("coordinator", log_file, options["port"])
    click.echo(f"log: {path}")
    keys = read_allowed_keys(allow_keys) if allow_keys else None
    serve = serve_config(options)
    serve.check_exposure()  # before anything starts
    engine = fill(EngineConfig, options)
    clients = read_allowed_keys(client_keys) if client_keys else None
    cfg = fill(
        CoordinatorConfig,
        options,
        model=_model_path(model),
        engine=engine,
        log_file=path,
        allow_keys=keys,
        client_keys=clients,
    )
    warn_if_insecure(cfg.insecure)

    def banner(c) -> str:
        hosting = (
            f"hosting layers {cfg.layers} on {c.device}/{engine.dtype}" if cfg.layers else "hosting no layers"
        )
        return (
            f"coordinator listening on {c.address}: {c.gguf.path.name} (sha256 {c.digest[:12]}…, "
            f"{c.args.n_layers} layers), {hosting}"
        )

    node = build_coordinator(cfg)
    if serve.http_port is not None:  # the HTTP API, in this process (serving/)
        from consortium.serving.server import Served

        node = Served(node, serve, http_port_file)
    _serve(
        node, "coordinator", lambda c: banner(c) + getattr(c, "http_note", ""), port_file, exit_with_parent
    )


@coordinator.command("status")
@coordinator_option
@json_option("Print one JSON object.")
@client_options
def coordinator_status(as_json, **options):
    """Nodes, their layer ranges and liveness, and the current pipeline."""
    from consortium.coordinator.client import Client

    with Client(client_config(options, connect_timeout_s=5.0)) as client:
        st = client.cluster_status()
    if as_json:
        click.echo(json.dumps(st))
        return
    click.echo(
        f"model sha256 {st['model_digest'][:16]}…, {st['n_layers']} layers, {st['active_sessions']} active sessions"
    )
    if st["spill_limit_bytes"]:  # (a caller outside --client-keys is not told)
        click.echo(
            f"disk for remote logits: {st['spill_held_bytes'] / 2**30:.2f} of "
            f"{st['spill_limit_bytes'] / 2**30:.2f} GiB reserved"
        )
    for n in st["nodes"]:
        layers = f"{n['layers'][0]}-{n['layers'][1]}" if n["layers"] else "unassigned"
        state = n["role"] if n["alive"] else f"{n['role']} ({n['heartbeat_age_s']:.0f} s without a heartbeat)"
        click.echo(
            f"  {n['node_id']:<16} {n['address']:<22} layers {layers:<10} {n['device']}/{n['dtype']}  {state}"
        )
    route = " -> ".join(f"{r['node_id']} {r['layers'][0]}-{r['layers'][1]}" for r in st["route"])
    click.echo("pipeline: " + (route or f"incomplete: {st['placement_error']}"))


# --- worker ------------------------------------------------------------------------------


@click.group(cls=Group)
def worker() -> None:
    """Run a worker."""


worker_start_options = options(  # fill(WorkerConfig, options)
    click.option("--coordinator", required=True, metavar="HOST:PORT"),
    port_option(WorkerConfig),
    model_option,
    layers_option(
        "Layers to run, half-open (10-20 = layers 10..19). Without it the coordinator assigns a "
        "range in proportion to this node's measured speed, within its memory."
    ),
    engine_options,
    node_options(WorkerConfig),
    click.option(
        "--advertise", default=None, metavar="HOST:PORT", help="Address the coordinator should dial."
    ),
    click.option("--node-id", default=None, help="Node id (default: worker-<random>)."),
    config_option(
        WorkerConfig,
        "max_memory_bytes",
        "--max-memory-mb",
        scale=MB,
        positive=True,
        type=int,
        help="Memory offered for placement (default: what is free on the device).",
    ),
    config_option(
        WorkerConfig,
        "register_timeout_s",
        "--register-timeout",
        positive=True,
        help="Seconds to keep trying to reach the coordinator at start.",
    ),
    folder_option(
        "--data-dir",
        f"Holds this node's Ed25519 key, TLS certificate and coordinator pins ({DATA_DIR_DEFAULT}).",
    ),
    trust_options(WorkerConfig),
    click.option(
        "--misbehave",
        default=None,
        metavar="KIND",
        help="TESTS ONLY (needs CONSORTIUM_ALLOW_MISBEHAVE=1): cheat as KIND: skip-layer, noise=SIGMA, "
        "wrong-weights, int4-weights, int8-weights, flip-max, bad-signature, replay.",
    ),
    config_option(
        WorkerConfig,
        "standby",
        "--standby",
        is_flag=True,
        help="Hold no layers: wait as a backup; a failover assigns the failed stage's layers, loaded on demand.",
    ),
)


@worker.command("start")
@worker_start_options
def worker_start(model, log_file, exit_with_parent, port_file, **options):
    """Hold a layer range, register with the coordinator and execute its work orders."""
    from consortium.core.logs import setup_logging
    from consortium.worker.server import WorkerNode

    path = setup_logging("worker", log_file, options["port"])
    click.echo(f"log: {path}")
    engine = fill(EngineConfig, options)
    cfg = fill(WorkerConfig, options, model=_model_path(model), engine=engine, log_file=path)
    warn_if_insecure(cfg.insecure)

    def banner(w) -> str:
        if w.runner:
            held = f"layers {w.runner.layers}"
        else:
            held = (
                "no layers (standby: a failover assigns them)"
                if cfg.standby
                else "no layers yet (placement assigns them)"
            )
        return (
            f"worker {w.node_id} serving {held} on {w.address} ({w.device}/{engine.dtype}), "
            f"registered with {cfg.coordinator}"
        )

    _serve(WorkerNode(cfg), "worker", banner, port_file, exit_with_parent)


for _command in (coordinator_start, worker_start):
    configurable(_command)  # --config FILE.yaml, CONSORTIUM_* variables

COMMANDS = (coordinator, worker)
