"""The `consortium` command. Thin: parses options into config objects and calls the library."""

from __future__ import annotations

import json
import sys

import click

from consortium.cli.common import Group, engine_options, model_option, sampling_options
from consortium.cli.verification import calibrate, identity, receipts
from consortium.errors import ConsortiumError


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


# --- single-node generation -------------------------------------------------------------


@cli.command()
@model_option
@click.option("--prompt", required=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@sampling_options
@engine_options
@click.option("--no-chat", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate(
    model, prompt, max_tokens, seed, temperature, top_k, top_p, device, dtype, packed, no_chat, as_json
):
    """Generate on this machine alone (the baseline distributed runs must equal)."""
    from consortium.model.files import resolve_model
    from consortium.model.generate import check_request, generate, load_single_node
    from consortium.model.model import resolve_device
    from consortium.model.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    device = resolve_device(device)
    if max_tokens <= 0:
        raise ConsortiumError(f"max-tokens must be positive, got {max_tokens}")
    if not prompt.strip():
        raise ConsortiumError("empty prompt")
    gguf, stage, tok = load_single_node(resolve_model(model), device, dtype, packed)
    ids = tok.encode_prompt(prompt, chat=not no_chat)
    check_request(ids, max_tokens, gguf.args.context_length)

    def echo(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = generate(stage, tok, ids, max_tokens, params, on_text=None if as_json else echo)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo()
        click.echo(
            f"[{len(result.tokens)} tokens, {result.tokens_per_second:.1f} tok/s, "
            f"first token {result.time_to_first_token_s * 1000:.0f} ms]",
            err=True,
        )


# --- pipeline: coordinator, worker, session, demo (cli/pipeline.py) ------------------------

from consortium.cli.pipeline import COMMANDS as _PIPELINE_COMMANDS  # noqa: E402  (needs the helpers above)

for _command in _PIPELINE_COMMANDS:
    cli.add_command(_command)


for _command in (identity, calibrate, receipts):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="consortium")


if __name__ == "__main__":
    main()
