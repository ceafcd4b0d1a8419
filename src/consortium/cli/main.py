"""The `consortium` command. Thin: parses options into config objects and calls the library."""

from __future__ import annotations

import json

import click

from consortium.cli.common import (
    Group,
    engine_options,
    json_option,
    max_tokens_option,
    model_option,
    no_chat_option,
    print_delta,
    sampling_options,
    session_request,
)
from consortium.cli.pipeline import COMMANDS as PIPELINE_COMMANDS
from consortium.cli.session import COMMANDS as SESSION_COMMANDS
from consortium.cli.verification import calibrate, identity, receipts


@click.group(cls=Group)
@click.version_option(package_name="consortium")
def cli() -> None:
    """Consortium: verified, fault-tolerant pipeline-parallel LLM inference."""


# --- model -----------------------------------------------------------------------------


@cli.group(cls=Group)
def model() -> None:
    """Fetch and inspect model files."""


@model.command("pull")
@click.option(
    "--cache-dir",
    default=None,
    help="Model cache (default $CONSORTIUM_MODEL_DIR or ~/.cache/consortium/models).",
)
def model_pull(cache_dir: str | None) -> None:
    """Fetch the default model (SmolLM2-135M-Instruct Q4_1), verify size and sha256."""
    from consortium.model.files import pull

    click.echo(str(pull(cache_dir)))


@model.command("info")
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def model_info(path: str | None, as_json: bool) -> None:
    """Architecture, sizes, quantization and tokenizer of a GGUF file."""
    from consortium.model.files import resolve_model
    from consortium.model.gguf_file import GGUFModel

    g = GGUFModel(resolve_model(path))
    a = g.args
    info = {
        "path": str(g.path),
        "name": g.meta("general.name"),
        "architecture": a.arch,
        "layers": a.n_layers,
        "dim": a.dim,
        "ffn_dim": a.ffn_dim,
        "heads": a.n_heads,
        "kv_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "context_length": a.context_length,
        "rope_base": a.rope_base,
        "rope_scaling": a.rope_scaling.kind,
        "vocab_size": a.vocab_size,
        "tied_head": a.tied_head,
        "quant_types": g.quant_summary(),
        "tokenizer": g.meta("tokenizer.ggml.model"),
        "pre_tokenizer": g.meta("tokenizer.ggml.pre"),
        "chat_template": g.meta("tokenizer.chat_template") is not None,
        "file_bytes": g.path.stat().st_size,
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for k, v in info.items():
        table.add_row(k, ", ".join(f"{q}×{n}" for q, n in v.items()) if isinstance(v, dict) else str(v))
    Console().print(table)


@model.command("synth")
@click.option(
    "--shape", required=True, type=click.Choice(["llama3-8b", "llama3.2-1b", "smollm2-135m", "tiny"])
)
@click.option("--quant", required=True, type=click.Choice(["q4_k_m", "q4_0", "q8_0", "f16"]))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=int, default=None, help="Only the first N layers (a shorter model for tests).")
def model_synth(shape: str, quant: str, out: str, seed: int, layers: int | None) -> None:
    """Write a random-weights GGUF with the tensor layout, quant types and tokenizer of a real model."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from consortium.model.synth import synth

    with Progress(
        TextColumn("synth"), BarColumn(), DownloadColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task("synth", total=None)
        path = synth(
            shape, quant, out, seed, layers, lambda done, total: bar.update(task, completed=done, total=total)
        )
    click.echo(str(path))


# --- single-node generation -------------------------------------------------------------


@cli.command()
@model_option
@click.option("--prompt", required=True)
@max_tokens_option
@sampling_options
@engine_options
@no_chat_option
@json_option("Print one JSON object instead of streaming text.")
def generate(model, device, dtype, packed, as_json, **options):
    """Generate on this machine alone (the baseline distributed runs must equal)."""
    from consortium.model.files import resolve_model
    from consortium.model.generate import check_request, generate, load_single_node
    from consortium.model.model import resolve_device

    req = session_request(options)
    device = resolve_device(device)
    gguf, stage, tok = load_single_node(resolve_model(model), device, dtype, packed)
    ids = tok.encode_prompt(req.prompt, chat=req.chat)
    check_request(ids, req.max_tokens, gguf.args.context_length)
    result = generate(stage, tok, ids, req.max_tokens, req.sampling, on_text=None if as_json else print_delta)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo()
        click.echo(
            f"[{len(result.tokens)} tokens, {result.tokens_per_second:.1f} tok/s, "
            f"first token {result.time_to_first_token_s * 1000:.0f} ms]",
            err=True,
        )


for _command in (*PIPELINE_COMMANDS, *SESSION_COMMANDS, identity, calibrate, receipts):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="consortium")


if __name__ == "__main__":
    main()
