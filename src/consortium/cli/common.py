"""Shared pieces of the CLI: the error-reporting group, options whose defaults come from the
config dataclasses (each default is written once, in core/config.py), and common option sets."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from consortium.core.config import (
    AUDIT_COVERAGES,
    INSECURE_WARNING,
    ClientConfig,
    CoordinatorConfig,
    EngineConfig,
    SessionRequest,
)
from consortium.errors import ConsortiumError
from consortium.model.sampling import SamplingParams
from consortium.serving.config import OPTIMISTIC, VERIFIED, ServeConfig, read_api_keys

MB = 2**20
GB = 2**30


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


def default(cls: type, name: str) -> Any:
    """The default of dataclass field `name` of `cls`."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default


def config_option(cls: type, name: str, *decls: str, scale: int = 1, positive: bool = False, **kw):
    """A click option for field `name` of `cls` (like vLLM's get_kwargs): the default and its
    type come from the dataclass, shown in the flag's unit (`scale`: bytes per unit, e.g. MB);
    the command receives the value in the field's unit under the field's name."""
    value = default(cls, name)
    if value is not None and scale != 1:
        value //= scale
    if value is not None and not isinstance(value, bool):
        kw.setdefault("type", type(value))
        kw.setdefault("show_default", True)

    def convert(ctx, param, v):
        if positive and v is not None and v <= 0:
            raise click.BadParameter(f"must be positive, got {v}")
        return round(v * scale) if v is not None and scale != 1 else v  # whole bytes

    return click.option(*decls, name, default=value, callback=convert, **kw)


def fill(cls: type, options: dict[str, Any], **extra: Any) -> Any:
    """`cls` built from `extra` and the options named after its fields (taken out of `options`);
    an option left at None keeps the field's default."""
    names = {f.name for f in fields(cls)} - set(extra)
    picked = {k: options.pop(k) for k in list(options) if k in names}
    return cls(**{k: v for k, v in picked.items() if v is not None}, **extra)


def options(*decorators):
    """One decorator applying click options in the order listed (the order of --help)."""

    def apply(f):
        for decorate in reversed(decorators):
            f = decorate(f)
        return f

    return apply


model_option = click.option(
    "--model",
    default=None,
    metavar="GGUF",
    help="GGUF model path (default: the pulled SmolLM2-135M-Instruct Q4_1).",
)
engine_options = options(  # fill(EngineConfig, options)
    config_option(
        EngineConfig,
        "packed",
        "--packed/--no-packed",
        show_default=True,
        help="Keep quantized weights packed on the CPU: fp32 runs the strict compact kernel, bf16 "
        "PyTorch's int4 kernel (loose class). Default: packed for cpu fp32, dense otherwise.",
    ),
    config_option(
        EngineConfig,
        "pack_cache",
        "--pack-cache/--no-pack-cache",
        show_default=True,
        help="Keep packed weights on disk ($CONSORTIUM_CACHE_DIR/packed): the next load maps them.",
    ),
    config_option(
        EngineConfig,
        "dtype",
        "--dtype",
        type=click.Choice(["fp32", "fp16", "bf16"]),
        help="Default: fp32 (packed) on a CPU, fp16 on cuda and mps.",
    ),
    config_option(EngineConfig, "device", "--device", help="auto, cpu, cuda[:N] or mps."),
)
sampling_options = options(  # fill(SamplingParams, options)
    config_option(SamplingParams, "top_p", "--top-p", help="1 = off."),
    config_option(SamplingParams, "top_k", "--top-k", help="0 = off."),
    config_option(SamplingParams, "temperature", "--temperature", help="0 = greedy."),
    config_option(SamplingParams, "seed", "--seed"),
)
max_tokens_option = config_option(SessionRequest, "max_tokens", "--max-tokens")
no_chat_option = click.option(
    "--no-chat", is_flag=True, help="Send the prompt as is, without the chat template."
)
audit_options = options(
    config_option(
        SessionRequest,
        "audit_seed",
        "--audit-seed",
        type=int,
        help="Choose audited units reproducibly (default: a CSPRNG).",
    ),
    config_option(
        SessionRequest,
        "audit_probability",
        "--audit-probability",
        type=float,
        help=f"Share of work units audited (default {default(CoordinatorConfig, 'audit_probability'):g}).",
    ),
    config_option(
        SessionRequest,
        "audit_coverage",
        "--audit-coverage",
        type=click.Choice(AUDIT_COVERAGES),
        help="full: every row of the audited stages is recomputed by the session's end (each answer "
        "checked); sampled: a drawn share of them is, at the session's end (cheaper, see SECURITY.md). "
        f"Default {default(CoordinatorConfig, 'audit_coverage')}.",
    ),
)
wait_audits_option = click.option(
    "--no-wait-audits", is_flag=True, help="Finish without waiting for pending audits."
)
coordinator_option = config_option(ClientConfig, "coordinator", "--coordinator", metavar="HOST:PORT")
connect_timeout_option = config_option(ClientConfig, "connect_timeout_s", "--connect-timeout", positive=True)


def file_option(flag: str, help: str, exists: bool = False, **kw):
    """An option naming a file (a Path; None when not given)."""
    kind = click.Path(exists=exists, dir_okay=False, path_type=Path)
    return click.option(flag, type=kind, default=None, help=help, **kw)


def folder_option(flag: str, help: str, **kw):
    """An option naming a folder (a Path; None when not given)."""
    return click.option(flag, type=click.Path(file_okay=False, path_type=Path), default=None, help=help, **kw)


serve_options = options(  # serve_config(options)
    config_option(
        ServeConfig,
        "http_port",
        "--http-port",
        type=int,
        metavar="PORT",
        help="Serve the OpenAI-compatible API, /metrics and the status page over HTTP (0 = any free port).",
    ),
    config_option(
        ServeConfig,
        "http_host",
        "--http-host",
        help="Interface of the HTTP API (without --api-keys: loopback only, unless --no-auth).",
    ),
    file_option("--api-keys", "Bearer keys of the HTTP API, one per line.", exists=True),
    config_option(
        ServeConfig,
        "no_auth",
        "--no-auth",
        is_flag=True,
        help="Serve the HTTP API without keys on any interface (only on a network you trust).",
    ),
    config_option(
        ServeConfig,
        "release",
        "--release",
        type=click.Choice([VERIFIED, OPTIMISTIC]),
        show_default=True,
        help="verified: a token is sent once no audit can roll it back; optimistic: at once "
        "(a rollback that withdraws sent text then ends the stream with an error).",
    ),
    config_option(
        ServeConfig,
        "default_max_tokens",
        "--default-max-tokens",
        positive=True,
        help="Tokens generated for an HTTP request that names no max_tokens.",
    ),
    file_option("--http-tls-cert", "Serve the HTTP API over TLS with this certificate (PEM).", exists=True),
    file_option("--http-tls-key", "The private key (PEM) of --http-tls-cert.", exists=True),
)


def serve_config(options: dict[str, Any]) -> ServeConfig:
    """The ServeConfig of serve_options (taken out of `options`; --api-keys read and checked)."""
    path = options.pop("api_keys")
    return fill(ServeConfig, options, api_keys=read_api_keys(path) if path else None)


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)


def session_request(options: dict[str, Any]) -> SessionRequest:
    """The checked SessionRequest of --prompt, --max-tokens, sampling_options, --no-chat and, where the
    command has them, audit_options and --no-wait-audits (taken out of `options`)."""
    sampling = fill(SamplingParams, options)
    chat = not options.pop("no_chat")
    extra = {"wait_audits": not options.pop("no_wait_audits")} if "no_wait_audits" in options else {}
    return fill(SessionRequest, options, sampling=sampling, chat=chat, **extra).check()


def print_delta(text: str) -> None:
    """Streams generated text to stdout as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


DATA_DIR_DEFAULT = "default $CONSORTIUM_DATA_DIR or ~/.local/share/consortium"


def trust_options(cls: type):
    """--insecure and --coordinator-cert of a worker or a client (fields of `cls`)."""
    return options(
        config_option(
            cls,
            "insecure",
            "--insecure",
            is_flag=True,
            help="Plain-text gRPC without TLS, for a coordinator started with --insecure (warned loudly).",
        ),
        config_option(
            cls,
            "coordinator_cert",
            "--coordinator-cert",
            type=str,
            metavar="FILE|SHA256",
            help="Pin the coordinator's TLS certificate: its tls.crt, or its SHA-256 fingerprint (default: "
            "trusted on first use and pinned in the data directory; a different one later is refused).",
        ),
    )


client_options = options(  # fill(ClientConfig, options)
    trust_options(ClientConfig),
    folder_option(
        "--data-dir",
        f"Your key, which signs your calls (`consortium identity show`), and your coordinator pins ({DATA_DIR_DEFAULT}).",
    ),
)


def warn_if_insecure(insecure: bool) -> None:
    if insecure:
        click.echo(INSECURE_WARNING, err=True)


def client_config(options: dict[str, Any], **extra: Any) -> ClientConfig:
    """The ClientConfig of --coordinator, client_options (and --connect-timeout), taken out of
    `options`; prints the warning of --insecure."""
    cfg = fill(ClientConfig, options, **extra)
    warn_if_insecure(cfg.insecure)
    return cfg
