"""Shared pieces of the CLI: the error-reporting group and common option sets."""

from __future__ import annotations

import click

from consortium.errors import ConsortiumError


class Group(click.Group):
    """Reports library errors as one line on stderr with a non-zero status, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConsortiumError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def model_option(f):
    return click.option(
        "--model", "model", default=None, metavar="GGUF",
        help="GGUF model path (default: the pulled SmolLM2-135M-Instruct Q4_1).",
    )(f)  # fmt: skip


def engine_options(f):
    f = click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda[:N] or mps.")(f)
    f = click.option(
        "--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True
    )(f)
    f = click.option(
        "--packed/--no-packed", default=False, show_default=True,
        help="Keep 4-bit weights packed and use the CPU int4 kernel (needs --dtype bf16).",
    )(f)  # fmt: skip
    return f


def sampling_options(f):
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")(f)
    f = click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")(f)
    f = click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off.")(f)
    return f
