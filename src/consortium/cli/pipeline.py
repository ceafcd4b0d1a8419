"""Pipeline commands: `coordinator`, `worker`, `session` and `demo` (registered in main.py).

Layer ranges are half-open everywhere: `--layers 10-20` means layers 10 .. 19.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from consortium.cli.common import Group, engine_options, model_option, sampling_options
from consortium.core.config import (
    ClientConfig,
    CoordinatorConfig,
    EngineConfig,
    LayerRange,
    SessionRequest,
    WorkerConfig,
    check_probability,
    default_log_dir,
    read_allowed_keys,
)
from consortium.errors import ConsortiumError

log = logging.getLogger("consortium.cli")
MB = 2**20
DEMO_PROMPT = "Explain in one paragraph why the sky appears blue."


def _layers(ctx, param, value: str | None) -> LayerRange | None:
    try:
        return LayerRange.parse(value) if value else None
    except ConsortiumError as e:
        raise click.BadParameter(str(e)) from None


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def _model_path(model: str | None) -> Path:
    from consortium.model.files import resolve_model

    return resolve_model(model)


def node_options(f):
    """Options shared by `coordinator start` and `worker start`."""
    f = click.option(
        "--exit-with-parent", is_flag=True, hidden=True, help="Stop when the parent process dies."
    )(f)
    f = click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Log file (default: $CONSORTIUM_LOG_DIR or ~/.cache/consortium/logs/ROLE-PORT.log).")(f)  # fmt: skip
    f = click.option("--max-message-mb", type=int, default=128, show_default=True, callback=_positive,
                     help="Largest gRPC message sent or received.")(f)  # fmt: skip
    f = click.option("--session-idle-timeout", type=float, default=600.0, show_default=True, callback=_positive,
                     help="Seconds after which an idle session's KV cache is freed.")(f)  # fmt: skip
    f = click.option("--kv-cache-mb", type=int, default=2048, show_default=True, callback=_positive,
                     help="Memory budget of this node's KV caches (all sessions).")(f)  # fmt: skip
    f = click.option("--threads", type=int, default=0, show_default=True,
                     help="Torch intra-op threads (0 = torch's default; results do not depend on it).")(f)  # fmt: skip
    f = click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")(f)
    return f


def _serve(node, role: str, banner, log_path: Path, exit_with_parent: bool) -> None:
    """Starts `node`, prints its banner, and serves until SIGTERM/SIGINT (or the parent dies)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if exit_with_parent:
        parent = os.getppid()

        def watch() -> None:
            while not stop.wait(1.0):
                if os.getppid() != parent:
                    log.warning("parent process %d is gone; stopping", parent)
                    stop.set()

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    log.info("starting %s (pid %d)", role, os.getpid())
    try:
        try:
            node.start()
        except ConsortiumError as e:
            log.error("%s failed to start: %s", role, e)
            raise
        click.echo(banner(node))
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


def audit_options(f):
    f = click.option("--audit-probability", type=float, default=None, callback=_probability,
                     help="Share of work units audited (default 0.2).")(f)  # fmt: skip
    f = click.option("--audit-seed", type=int, default=None,
                     help="Choose audited units reproducibly (default: a CSPRNG).")(f)  # fmt: skip
    return f


def _probability(ctx, param, value):
    return None if value is None else check_probability(value)


# --- coordinator -------------------------------------------------------------------------


@click.group(cls=Group)
def coordinator() -> None:
    """Run or inspect a coordinator."""


@coordinator.command("start")
@model_option
@click.option(
    "--port", type=int, default=50051, show_default=True, help="Port to listen on (0 = any free port)."
)
@click.option("--layers", callback=_layers, default=None, metavar="A-B",
              help="Layers this process runs itself, half-open (e.g. 20-30: the last layers and the head).")  # fmt: skip
@engine_options
@node_options
@click.option("--heartbeat-interval", type=float, default=1.0, show_default=True, callback=_positive,
              help="Seconds between a worker's heartbeats (the coordinator tells the workers).")  # fmt: skip
@click.option("--node-timeout", type=float, default=8.0, show_default=True, callback=_positive,
              help="Seconds without a heartbeat after which a node counts as dead.")  # fmt: skip
@click.option("--hang-after", type=float, default=3.0, show_default=True, callback=_positive,
              help="A long call (prefill, replay) fails over when the node sends no heartbeat for this long.")  # fmt: skip
@click.option("--backup/--no-backup", default=True, show_default=True,
              help="Take over a failed stage here when no spare or standby worker can.")  # fmt: skip
@click.option("--max-sessions", type=int, default=16, show_default=True, callback=_positive)
@audit_options
@click.option("--ledger", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SQLite ledger of receipts, audits, evidence, bans (default: a new one in a temporary folder).")  # fmt: skip
@click.option("--allow-keys", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Admit only workers whose public key (hex, one per line) is listed.")  # fmt: skip
@click.option("--audit-recheck", type=float, default=0.1, show_default=True,
              help="Share of a remote auditor's passes this coordinator recomputes itself (a colluding auditor is banned).")  # fmt: skip
def coordinator_start(model, port, layers, device, dtype, packed, host, threads, kv_cache_mb, session_idle_timeout,
                      max_message_mb, log_file, exit_with_parent, heartbeat_interval, node_timeout, hang_after,
                      backup, max_sessions, audit_probability, audit_seed, ledger, allow_keys, audit_recheck):  # fmt: skip
    """Serve the node registry, sessions and the token loop (optionally hosting --layers)."""
    from consortium.coordinator.server import Coordinator
    from consortium.core.logs import setup_logging

    path = setup_logging("coordinator", log_file, port)
    click.echo(f"log: {path}")
    cfg = CoordinatorConfig(
        audit_probability=0.2 if audit_probability is None else audit_probability, audit_seed=audit_seed,
        audit_recheck_probability=audit_recheck,
        ledger=ledger, allow_keys=read_allowed_keys(allow_keys) if allow_keys else None,
        model=_model_path(model), host=host, port=port, layers=layers,
        engine=EngineConfig(device, dtype, packed, threads), heartbeat_interval_s=heartbeat_interval,
        node_timeout_s=node_timeout, hang_after_s=hang_after, backup=backup,
        max_message_bytes=max_message_mb * MB, kv_cache_bytes=kv_cache_mb * MB,
        session_idle_timeout_s=session_idle_timeout, max_sessions=max_sessions, log_file=path,
    )  # fmt: skip

    def banner(c) -> str:
        hosting = f"hosting layers {layers} on {c.device}/{dtype}" if layers else "hosting no layers"
        return (f"coordinator listening on {c.address}: {c.gguf.path.name} (sha256 {c.digest[:12]}…, "
                f"{c.args.n_layers} layers), {hosting}")  # fmt: skip

    _serve(Coordinator(cfg), "coordinator", banner, path, exit_with_parent)


@coordinator.command("status")
@click.option("--coordinator", "address", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def coordinator_status(address, as_json):
    """Nodes, their layer ranges and liveness, and the current pipeline."""
    from consortium.coordinator.client import Client

    with Client(ClientConfig(address, connect_timeout_s=5.0)) as client:
        st = client.cluster_status()
    if as_json:
        click.echo(json.dumps(st))
        return
    click.echo(
        f"model sha256 {st['model_digest'][:16]}…, {st['n_layers']} layers, {st['active_sessions']} active sessions"
    )
    for n in st["nodes"]:
        layers = f"{n['layers'][0]}-{n['layers'][1]}" if n["layers"] else "unassigned"
        state = n["role"] if n["alive"] else f"{n['role']} ({n['heartbeat_age_s']:.0f} s without a heartbeat)"
        click.echo(
            f"  {n['node_id']:<16} {n['address']:<22} layers {layers:<10} {n['device']}/{n['dtype']}  {state}"
        )
    click.echo("pipeline: " + (" -> ".join(f"{r['node_id']} {r['layers'][0]}-{r['layers'][1]}" for r in st["route"])
                               or f"incomplete: {st['placement_error']}"))  # fmt: skip


# --- worker ------------------------------------------------------------------------------


@click.group(cls=Group)
def worker() -> None:
    """Run a worker."""


@worker.command("start")
@click.option("--coordinator", "coordinator_address", required=True, metavar="HOST:PORT")
@click.option("--port", type=int, default=0, show_default=True, help="Port to listen on (0 = any free port).")
@model_option
@click.option("--layers", callback=_layers, default=None, metavar="A-B",
              help="Layers to run, half-open (10-20 = layers 10..19). Without it the coordinator assigns a "
                   "range in proportion to this node's measured speed, within its memory.")  # fmt: skip
@engine_options
@node_options
@click.option("--advertise", default=None, metavar="HOST:PORT", help="Address the coordinator should dial.")
@click.option("--node-id", default=None, help="Node id (default: worker-<random>).")
@click.option("--max-memory-mb", type=int, default=None, callback=_positive,
              help="Memory offered for placement (default: what is free on the device).")  # fmt: skip
@click.option("--register-timeout", type=float, default=60.0, show_default=True, callback=_positive,
              help="Seconds to keep trying to reach the coordinator at start.")  # fmt: skip
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Holds this node's Ed25519 key (default $CONSORTIUM_DATA_DIR or ~/.local/share/consortium).")  # fmt: skip
@click.option("--misbehave", default=None, metavar="KIND",
              help="TESTS ONLY (needs CONSORTIUM_ALLOW_MISBEHAVE=1): cheat as KIND: skip-layer, noise=SIGMA, "
                   "wrong-weights, int4-weights, int8-weights, flip-max, bad-signature, replay.")  # fmt: skip
@click.option("--standby", is_flag=True,
              help="Hold no layers: wait as a backup; a failover assigns the failed stage's layers, loaded on demand.")  # fmt: skip
def worker_start(coordinator_address, port, model, layers, device, dtype, packed, host, threads, kv_cache_mb,
                 session_idle_timeout, max_message_mb, log_file, exit_with_parent, advertise, node_id,
                 max_memory_mb, register_timeout, data_dir, misbehave, standby):  # fmt: skip
    """Hold a layer range, register with the coordinator and execute its work orders."""
    from consortium.core.logs import setup_logging
    from consortium.worker.server import WorkerNode

    path = setup_logging("worker", log_file, port)
    click.echo(f"log: {path}")
    cfg = WorkerConfig(
        coordinator=coordinator_address, model=_model_path(model), host=host, port=port, advertise=advertise,
        layers=layers, engine=EngineConfig(device, dtype, packed, threads), node_id=node_id,
        max_memory_bytes=max_memory_mb * MB if max_memory_mb else None, kv_cache_bytes=kv_cache_mb * MB,
        session_idle_timeout_s=session_idle_timeout, max_message_bytes=max_message_mb * MB,
        register_timeout_s=register_timeout, log_file=path, data_dir=data_dir, misbehave=misbehave,
        standby=standby,
    )  # fmt: skip

    def banner(w) -> str:
        held = (
            f"layers {w.runner.layers}"
            if w.runner
            else (
                "no layers (standby: a failover assigns them)"
                if standby
                else "no layers yet (placement assigns them)"
            )
        )
        return (f"worker {w.node_id} serving {held} on {w.address} ({w.device}/{dtype}), "
                f"registered with {coordinator_address}")  # fmt: skip

    _serve(WorkerNode(cfg), "worker", banner, path, exit_with_parent)


# --- session -----------------------------------------------------------------------------


@click.group(cls=Group)
def session() -> None:
    """Run sessions on a coordinator and inspect them."""


def _print_delta(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


@session.command("run")
@click.option("--coordinator", "address", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT")
@click.option("--prompt", required=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@sampling_options
@click.option("--no-chat", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True, callback=_positive)
@audit_options
@click.option("--no-wait-audits", is_flag=True, help="Finish without waiting for pending audits.")
def session_run(
    address,
    prompt,
    max_tokens,
    seed,
    temperature,
    top_k,
    top_p,
    no_chat,
    as_json,
    connect_timeout,
    audit_probability,
    audit_seed,
    no_wait_audits,
):
    """Generate through the pipeline: streams text, then a per-stage summary."""
    from consortium.coordinator.client import Client
    from consortium.model.sampling import SamplingParams

    if max_tokens <= 0:
        raise ConsortiumError(f"max-tokens must be positive, got {max_tokens}")
    if not prompt.strip():
        raise ConsortiumError("empty prompt")
    req = SessionRequest(
        prompt,
        max_tokens,
        SamplingParams(temperature, top_k, top_p, seed),
        chat=not no_chat,
        audit_probability=audit_probability,
        audit_seed=audit_seed,
        wait_audits=not no_wait_audits,
    )
    with Client(ClientConfig(address, connect_timeout_s=connect_timeout)) as client:
        report = client.run(req, **_live(as_json))
    _print_report(report, as_json)


@session.command("status")
@click.option("--coordinator", "address", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT")
@click.option("--session-id", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def session_status(address, session_id, as_json):
    """State, progress and per-stage latency of a session."""
    from consortium.coordinator.client import Client

    with Client(ClientConfig(address, connect_timeout_s=5.0)) as client:
        st = client.session_status(session_id)
    if as_json:
        click.echo(json.dumps(st))
        return
    click.echo(f"session {st['session_id']}: {st['state']}, {st['generated_tokens']}/{st['max_tokens']} tokens, "
               f"{st['prompt_tokens']} prompt tokens, position {st['position']}, {st['tokens_per_second']:.1f} tok/s"
               + (f", error: {st['error']}" if st["error"] else ""))  # fmt: skip
    for s in st["stages"]:
        click.echo(f"  stage {s['index']}: {s['node_id']:<16} layers {s['layers'][0]}-{s['layers'][1]:<4} "
                   f"{s['device']}/{s['dtype']}  step {s['mean_step_ms']:.2f} ms, {s['steps']} steps")  # fmt: skip
    for f in st["failovers"]:
        click.echo(
            f"  failover at token {f['token_index']}: stage {f['stage']} {f['failed_node']} -> {f['backup_node']}"
        )
    click.echo(f"  text: {st['text']!r}")
    if st["resumable"]:
        click.echo(
            f"  resumable: consortium session resume --coordinator {address} --session-id {session_id}"
        )


@session.command("resume")
@click.option("--coordinator", "address", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT")
@click.option("--session-id", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True, callback=_positive)
@click.option("--no-wait-audits", is_flag=True, help="Finish without waiting for pending audits.")
def session_resume(address, session_id, as_json, connect_timeout, no_wait_audits):
    """Continue a session interrupted by a coordinator restart (or failed for want of a backup):
    prints its text so far, then streams the rest; the tokens are those of an uninterrupted run."""
    from consortium.coordinator.client import Client

    def on_start(ev) -> None:
        if not as_json:
            _print_delta(ev.resumed_text)

    with Client(ClientConfig(address, connect_timeout_s=connect_timeout)) as client:
        report = client.resume(
            session_id, wait_audits=not no_wait_audits, on_start=on_start, **_live(as_json)
        )
    _print_report(report, as_json)


@session.command("show")
@click.option("--ledger", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The coordinator's SQLite ledger (readable while it runs, or after it stopped).")  # fmt: skip
@click.option("--session-id", default=None, help="One session (default: list them all).")
def session_show(ledger, session_id):
    """Read sessions back from a ledger, without a coordinator: status, prompt and generated token
    ids, parameters, stages, failovers and rollbacks, audit counts (one JSON object)."""
    from consortium.verification.ledger import Ledger

    led = Ledger(ledger, create=False, readonly=True)
    try:
        if session_id is None:
            click.echo(json.dumps([
                {k: v for k, v in (led.session(sid) or {}).items() if k not in ("prompt_ids", "tokens")}
                for sid in led.sessions()
            ]))  # fmt: skip
            return
        rec = led.session(session_id)
        if rec is None:
            raise ConsortiumError(f"unknown session {session_id!r} in {ledger}")
        audits = led.audits(session_id)
        rec |= {
            "events": led.events(session_id),
            "audits": {"total": len(audits), "failed": sum(not a["passed"] for a in audits)},
            "receipts": len(led.receipts(session_id)),
        }
        click.echo(json.dumps(rec))
    finally:
        led.close()


# --- demo --------------------------------------------------------------------------------


@click.command()
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True, callback=_positive)
@click.option("--json", "as_json", is_flag=True, help="Print the object of `session run --json`.")
@model_option
@sampling_options
@engine_options
@click.option("--no-chat", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the three processes log (default: a new demo-* folder under the log directory).")  # fmt: skip
@audit_options
@click.option("--no-wait-audits", is_flag=True, help="Finish without waiting for pending audits.")
@click.option("--misbehave", default=None, metavar="KIND",
              help="TESTS ONLY (needs CONSORTIUM_ALLOW_MISBEHAVE=1): the worker of the middle layers cheats as KIND.")  # fmt: skip
@click.option("--kill-at", type=int, default=None, metavar="N", callback=_positive,
              help="Kill -9 the worker of the middle layers when N tokens have been generated (shows a failover).")  # fmt: skip
@click.option("--standby", is_flag=True,
              help="Also start a standby worker (no layers): a failover moves the stage there, not to the coordinator.")  # fmt: skip
def demo(prompt, max_tokens, as_json, model, seed, temperature, top_k, top_p, device, dtype, packed, no_chat,
         log_dir, audit_probability, audit_seed, no_wait_audits, misbehave, kill_at, standby):  # fmt: skip
    """Start a coordinator (last third of the layers) and two workers here, run one session, stop all."""
    from consortium.coordinator.client import Client, format_report
    from consortium.coordinator.launcher import LocalCluster, thirds
    from consortium.model.files import default_model_path, pull
    from consortium.model.gguf_file import GGUFModel
    from consortium.model.sampling import SamplingParams

    note = lambda text: click.echo(text, err=True)  # noqa: E731  (stdout stays text or JSON only)
    req = SessionRequest(
        prompt,
        max_tokens,
        SamplingParams(temperature, top_k, top_p, seed),
        chat=not no_chat,
        audit_probability=audit_probability,
        audit_seed=audit_seed,
        wait_audits=not no_wait_audits,
    )
    if misbehave:
        from consortium.verification.misbehave import Misbehaviour

        Misbehaviour.parse(misbehave)  # refused here, before anything starts, unless enabled
    if model is None and not default_model_path().is_file():
        note("pulling the default model ...")
        path = pull(quiet=as_json)
    else:
        path = _model_path(model)
    first, second, last = thirds(GGUFModel(path).args.n_layers)
    log_dir = log_dir or default_log_dir() / time.strftime("demo-%Y%m%d-%H%M%S")
    cluster = LocalCluster(path, last, [first, second] + ([None] if standby else []), log_dir,
                           EngineConfig(device, dtype, packed),
                           worker_args=[[], ["--misbehave", misbehave] if misbehave else [], ["--standby"]])  # fmt: skip
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        note(
            f"starting on {cluster.address}: coordinator (layers {last}), workers (layers {first}, {second})"
        )
        for name, layers, log_file in (("coordinator", last, "coordinator.log"), ("worker-0", first, "worker-0.log"),
                                       ("worker-1", second, "worker-1.log")):  # fmt: skip
            note(f"  {name:<12} layers {layers}  log: {log_dir / log_file}")
        if standby:
            note(f"  {'worker-2':<12} standby     log: {log_dir / 'worker-2.log'}")
        t0 = time.perf_counter()
        cluster.start()
        note(f"cluster ready in {time.perf_counter() - t0:.1f} s; prompt: {prompt!r}")
        live = _live(as_json)
        if kill_at is not None:
            live["on_text"] = _killer(cluster, "worker-1", kill_at, live.get("on_text"), note)
        with Client(ClientConfig(cluster.address)) as client:
            report = client.run(req, **live)
        if not as_json:
            click.echo()
    finally:
        cluster.stop()
        note("all processes stopped")
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    for line in format_report(report):
        click.echo(line)


def _live(as_json: bool) -> dict:
    """The streaming callbacks of session run/resume and the demo: text, rollbacks and
    failovers as they happen (none with --json: one object at the end)."""
    if as_json:
        return {}
    return {"on_text": _print_delta, "on_rollback": _print_rollback, "on_failover": _print_failover}


def _print_report(report, as_json: bool) -> None:
    from consortium.coordinator.client import format_report

    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    click.echo()
    for line in format_report(report):
        click.echo(line, err=True)


def _print_rollback(ev) -> None:
    sys.stdout.write(f"\n[rollback to position {ev.position}: stage {ev.stage} node {ev.node_id} caught "
                     f"({ev.reason}); now on {ev.new_node_id}, {ev.kept_tokens} tokens kept]\n")  # fmt: skip
    sys.stdout.flush()


def _print_failover(ev) -> None:
    sys.stdout.write(f"\n[failover at token {ev.token_index}: stage {ev.stage} node {ev.failed_node} failed; "
                     f"now on {ev.backup_node} ({ev.replayed_positions} positions replayed in {ev.replay_ms:.0f} ms, "
                     f"ready in {ev.latency_ms:.0f} ms)]\n")  # fmt: skip
    sys.stdout.flush()


def _killer(cluster, name: str, at: int, on_text, note):
    """An on_text callback that kills -9 the process `name` when `at` tokens have streamed in."""
    proc = next(p for p in cluster.processes if p.name == name)
    count = 0

    def on_token(text: str) -> None:
        nonlocal count
        count += 1
        if on_text is not None:
            on_text(text)
        if count == at:
            proc.signal_group(signal.SIGKILL)
            note(f"\n[killed {name} (pid {proc.pid}) with SIGKILL after {at} tokens]")

    return on_token


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


COMMANDS = (coordinator, worker, session, demo)
