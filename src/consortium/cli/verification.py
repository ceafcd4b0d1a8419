"""CLI commands of verification: identity, calibration, offline receipt checks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from consortium.cli.common import Group, model_option


@click.group(cls=Group)
def identity() -> None:
    """This node's Ed25519 identity."""


@identity.command("show")
@click.option(
    "--data-dir",
    default=None,
    help="Where the key lives (default $CONSORTIUM_DATA_DIR or ~/.local/share/consortium).",
)
@click.option("--json", "as_json", is_flag=True)
def identity_show(data_dir: str | None, as_json: bool) -> None:
    """Print the node id, public key and TLS certificate's SHA-256 (a worker's --coordinator-cert),
    creating them on first use."""
    from consortium.identity import NodeIdentity
    from consortium.identity.tls import TlsIdentity

    ident = NodeIdentity.load_or_create(data_dir)
    info = {"node_id": ident.node_id, "public_key": ident.public_key.hex(), "key_file": str(ident.path)}
    info["tls_cert_sha256"] = TlsIdentity.load_or_create(data_dir).fingerprint
    click.echo(json.dumps(info) if as_json else "\n".join(f"{k}: {v}" for k, v in info.items()))


@click.command()
@model_option
@click.option("--devices", default="cpu", show_default=True, help="Comma-separated devices to measure.")
@click.option("--dtypes", default="fp32,fp16,bf16", show_default=True, help="Comma-separated compute dtypes.")
@click.option(
    "--stages", type=int, default=3, show_default=True, help="Pipeline stages to split the model into."
)
@click.option(
    "--import-h200",
    "h200",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Also take honest CUDA figures from a shared H200 numerics file.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Report JSON path.")
def calibrate(model, devices, dtypes, stages, h200, out) -> None:
    """Measure honest spread per backend/dtype and the cheats' signatures; propose thresholds."""
    from consortium.model.files import resolve_model
    from consortium.model.model import resolve_device
    from consortium.verification.calibrate import calibrate as run

    devs = [resolve_device(d.strip()) for d in devices.split(",") if d.strip()]
    report = run(
        resolve_model(model),
        devs,
        [d.strip() for d in dtypes.split(",")],
        stages,
        h200=h200,
        log=lambda s: click.echo(s, err=True),
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    for klass, p in report["proposed"].items():
        click.echo(
            f"{klass}: tau rel-L2 {p['rel_l2']:.3g}, tau max/RMS {p['max_rel']:.3g}; "
            f"separates every required cheat: {p['separates_all_required']}"
        )
    click.echo(f"report written to {out}")


@click.group(cls=Group)
def receipts() -> None:
    """Offline checks of the receipts in a ledger."""


@receipts.command("verify")
@click.option("--ledger", "ledger_path", required=True, help="Ledger SQLite file.")
@click.option("--session", "session_id", required=True)
@click.option("--json", "as_json", is_flag=True)
def receipts_verify(ledger_path: str, session_id: str, as_json: bool) -> None:
    """Re-check every signature and the digest chain of a session."""
    from consortium.verification.ledger import Ledger

    led = Ledger(ledger_path, create=False, readonly=True)
    try:
        s = led.verify_session(session_id)
    finally:
        led.close()
    if as_json:
        click.echo(json.dumps({"ok": True, **s.to_dict()}))
    else:
        click.echo(
            f"ok: session {s.session_id}: {s.receipts} receipts over {s.steps} steps from "
            f"{len(s.nodes)} nodes verify; {s.tokens} tokens"
        )
