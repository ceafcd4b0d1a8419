"""Session commands: `session run|status|resume|show` and `demo` (registered in main.py)."""

from __future__ import annotations

import json
import signal
from dataclasses import replace

import click

from consortium.cli.common import (
    Group,
    audit_options,
    client_config,
    client_options,
    config_option,
    connect_timeout_option,
    coordinator_option,
    engine_options,
    file_option,
    fill,
    folder_option,
    json_option,
    max_tokens_option,
    model_option,
    no_chat_option,
    options,
    print_delta,
    sampling_options,
    serve_config,
    serve_options,
    session_request,
    wait_audits_option,
    warn_if_insecure,
)
from consortium.coordinator.launcher import DEMO_PROMPT, DemoConfig
from consortium.core.config import EngineConfig
from consortium.errors import ConsortiumError
from consortium.serving.config_file import configurable

# --- session -----------------------------------------------------------------------------


@click.group(cls=Group)
def session() -> None:
    """Run sessions on a coordinator and inspect them."""


@session.command("run")
@coordinator_option
@click.option("--prompt", required=True)
@max_tokens_option
@sampling_options
@no_chat_option
@json_option("Print one JSON object instead of streaming text.")
@connect_timeout_option
@audit_options
@wait_audits_option
@client_options
def session_run(as_json, **options):
    """Generate through the pipeline: streams text, then a per-stage summary."""
    from consortium.coordinator.client import Client

    req = session_request(options)
    with Client(client_config(options)) as client:
        report = client.run(req, **_live(as_json))
    _print_report(report, as_json)


@session.command("status")
@coordinator_option
@click.option("--session-id", required=True)
@json_option("Print one JSON object.")
@client_options
def session_status(coordinator, session_id, as_json, **options):
    """State, progress and per-stage latency of a session."""
    from consortium.coordinator.client import Client

    with Client(client_config(options, coordinator=coordinator, connect_timeout_s=5.0)) as client:
        st = client.session_status(session_id)
    if as_json:
        click.echo(json.dumps(st))
        return
    click.echo(
        f"session {st['session_id']}: {st['state']}, {st['generated_tokens']}/{st['max_tokens']} tokens, "
        f"{st['prompt_tokens']} prompt tokens, position {st['position']}, {st['tokens_per_second']:.1f} tok/s"
        + (f", error: {st['error']}" if st["error"] else "")
    )
    for s in st["stages"]:
        click.echo(
            f"  stage {s['index']}: {s['node_id']:<16} layers {s['layers'][0]}-{s['layers'][1]:<4} "
            f"{s['device']}/{s['dtype']}  step {s['mean_step_ms']:.2f} ms, {s['steps']} steps"
        )
    for f in st["failovers"]:
        click.echo(
            f"  failover at token {f['token_index']}: stage {f['stage']} {f['failed_node']} -> {f['backup_node']}"
        )
    click.echo(f"  text: {st['text']!r}")
    if st["resumable"]:
        click.echo(
            f"  resumable: consortium session resume --coordinator {coordinator} --session-id {session_id}"
        )


@session.command("resume")
@coordinator_option
@click.option("--session-id", required=True)
@json_option("Print one JSON object instead of streaming text.")
@connect_timeout_option
@wait_audits_option
@client_options
def session_resume(session_id, as_json, no_wait_audits, **options):
    """Continue a session interrupted by a coordinator restart (or failed for want of a backup):
    prints its text so far, then streams the rest; the tokens are those of an uninterrupted run."""
    from consortium.coordinator.client import Client

    def on_start(ev) -> None:
        if not as_json:
            print_delta(ev.resumed_text)

    with Client(client_config(options)) as client:
        report = client.resume(
            session_id, wait_audits=not no_wait_audits, on_start=on_start, **_live(as_json)
        )
    _print_report(report, as_json)


@session.command("show")
@file_option(
    "--ledger",
    "The coordinator's SQLite ledger (readable while it runs, or after it stopped).",
    required=True,
)
@click.option("--session-id", default=None, help="One session (default: list them all).")
def session_show(ledger, session_id):
    """Read sessions back from a ledger, without a coordinator: status, prompt and generated token
    ids, parameters, stages, failovers and rollbacks, audit counts (one JSON object)."""
    from consortium.verification.ledger import Ledger

    led = Ledger(ledger, create=False, readonly=True)
    try:
        if session_id is None:
            hidden = ("prompt_ids", "tokens")
            sessions = [
                {k: v for k, v in (led.session(sid) or {}).items() if k not in hidden}
                for sid in led.sessions()
            ]
            click.echo(json.dumps(sessions))
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


DEMO_HTTP_PORT = 8000  # demo --serve without --http-port

# --- demo --------------------------------------------------------------------------------


demo_options = options(  # fill(DemoConfig, options)
    click.option("--prompt", default=DEMO_PROMPT, show_default=True),
    max_tokens_option,
    json_option("Print the object of `session run --json`."),
    model_option,
    sampling_options,
    engine_options,
    no_chat_option,
    folder_option(
        "--log-dir", "Where the three processes log (default: a new demo-* folder under the log directory)."
    ),
    audit_options,
    wait_audits_option,
    click.option(
        "--misbehave",
        default=None,
        metavar="KIND",
        help="TESTS ONLY (needs CONSORTIUM_ALLOW_MISBEHAVE=1): the worker of the middle layers cheats as KIND.",
    ),
    config_option(
        DemoConfig,
        "kill_at",
        "--kill-at",
        type=int,
        metavar="N",
        positive=True,
        help="Kill -9 the worker of the middle layers when N tokens have been generated (shows a failover).",
    ),
    config_option(
        DemoConfig,
        "standby",
        "--standby",
        is_flag=True,
        help="Also start a standby worker (no layers): a failover moves the stage there, not to the coordinator.",
    ),
    config_option(
        DemoConfig,
        "insecure",
        "--insecure",
        is_flag=True,
        help="Plain-text gRPC between the processes, no TLS (warned loudly).",
    ),
    click.option(
        "--serve",
        "serve_api",
        is_flag=True,
        help="Run no session: keep the cluster with the HTTP API (OpenAI-compatible, /metrics, status page "
        f"at /; port {DEMO_HTTP_PORT} unless --http-port) until Ctrl-C, and print its URL.",
    ),
    serve_options,
)


@click.command()
@demo_options
def demo(as_json, serve_api, **options):
    """Start a coordinator (last third of the layers) and two workers here, run one session, stop all."""
    from consortium.coordinator.client import format_report
    from consortium.coordinator.launcher import run_demo
    from consortium.serving.demo import serve_demo

    serving = _serving(serve_api, options)
    request = session_request(options)
    engine = fill(EngineConfig, options)
    cfg = fill(DemoConfig, options, request=request, engine=engine, quiet=as_json, **serving)
    warn_if_insecure(cfg.insecure)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    note = lambda text: click.echo(text, err=True)  # noqa: E731  (stdout stays text or JSON only)
    if cfg.serve is not None:
        return serve_demo(cfg, note)
    report = run_demo(cfg, note, on_end=None if as_json else click.echo, **_live(as_json))
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    for line in format_report(report):
        click.echo(line)


def _serving(serve_api: bool, options: dict) -> dict:
    """DemoConfig's serve and api_keys_file of --serve and serve_options (taken out of `options`)."""
    keys = options.get("api_keys")
    serve = serve_config(options)
    if not serve_api:
        return {}
    serve.check_exposure()
    port = DEMO_HTTP_PORT if serve.http_port is None else serve.http_port
    return {"serve": replace(serve, http_port=port), "api_keys_file": keys}


def _live(as_json: bool) -> dict:
    """The streaming callbacks of session run/resume and the demo: text, rollbacks and
    failovers as they happen (none with --json: one object at the end)."""
    if as_json:
        return {}
    return {"on_text": print_delta, "on_rollback": _print_rollback, "on_failover": _print_failover}


def _print_report(report, as_json: bool) -> None:
    from consortium.coordinator.client import format_report

    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    click.echo()
    for line in format_report(report):
        click.echo(line, err=True)


def _print_rollback(ev) -> None:
    print_delta(
        f"\n[rollback to position {ev.position}: stage {ev.stage} node {ev.node} caught "
        f"({ev.reason}); now on {ev.new_node}, {ev.kept_tokens} tokens kept]\n"
    )


def _print_failover(ev) -> None:
    print_delta(
        f"\n[failover at token {ev.token_index}: stage {ev.stage} node {ev.failed_node} failed; "
        f"now on {ev.backup_node} ({ev.replayed_positions} positions replayed in {ev.replay_ms:.0f} ms, "
        f"ready in {ev.latency_ms:.0f} ms)]\n"
    )


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


configurable(demo)  # --config FILE.yaml, CONSORTIUM_* variables

COMMANDS = (session, demo)
