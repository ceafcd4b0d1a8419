"""`--config FILE.yaml` and CONSORTIUM_* environment variables for a click command.

Keys are the command's long flags without the dashes (`kv-cache-mb: 512`, `http-port: 8000`;
underscores work too), validated with a pydantic model built from the command's options.
Precedence is click's own: the command line, then the environment (CONSORTIUM_KV_CACHE_MB),
then the file (click's default_map), then the defaults. Paths are relative to the current
folder, as on the command line.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

import click
import yaml
from pydantic import ConfigDict, Field, ValidationError, create_model

from consortium.errors import ConsortiumError

ENV_PREFIX = "CONSORTIUM_"
NO_ENV = frozenset({"log-dir"})  # CONSORTIUM_LOG_DIR already names the log folder (a demo makes a subfolder)


def key(option: click.Option) -> str:
    """The file key of an option: its long flag without the dashes."""
    long = [o for o in option.opts if o.startswith("--")]
    return long[0][2:]


def env_name(option: click.Option) -> str:
    return ENV_PREFIX + key(option).upper().replace("-", "_")


def _options(command: click.Command) -> dict[str, click.Option]:
    return {
        key(p): p
        for p in command.params
        if isinstance(p, click.Option)
        and not p.hidden
        and any(o.startswith("--") for o in p.opts)
        and p.name != "config"
    }


def _python_type(option: click.Option) -> Any:
    t = option.type
    if isinstance(t, click.Choice):
        base = Literal[tuple(t.choices)]
    elif option.is_flag or isinstance(t, click.types.BoolParamType):
        base = bool
    elif isinstance(t, (click.types.IntParamType, click.IntRange)):
        base = int
    elif isinstance(t, (click.types.FloatParamType, click.FloatRange)):
        base = float
    else:
        base = str
    return base | None


@cache
def _model(command: click.Command):
    fields = {o.name: (_python_type(o), Field(None, alias=k)) for k, o in _options(command).items()}
    return create_model(f"{command.name}_config", __config__=ConfigDict(extra="forbid"), **fields)


def load(path: str | Path, command: click.Command) -> dict[str, Any]:
    """The file's values by parameter name (click's default_map), validated; ConsortiumError
    (one line) on a missing, unreadable or invalid file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConsortiumError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ConsortiumError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConsortiumError(
            f"{path}: expected option names and values (flag: value), got a {type(data).__name__}"
        )
    data = {str(k).replace("_", "-"): v for k, v in data.items()}
    try:
        values = _model(command).model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        extra = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConsortiumError(f"{path}: {where}: {err['msg']}{extra}") from None
    return values.model_dump(exclude_unset=True)


def configurable(command: click.Command) -> click.Command:
    """Adds --config FILE.yaml and a CONSORTIUM_* variable to every long option of `command`."""

    def read(ctx: click.Context, param, value) -> None:
        if value is not None:
            ctx.default_map = {**(ctx.default_map or {}), **load(value, command)}

    for k, option in _options(command).items():
        if option.envvar is None and k not in NO_ENV:
            option.envvar = env_name(option)
    config = click.Option(
        ["--config"],
        metavar="FILE.yaml",
        is_eager=True,
        expose_value=False,
        callback=read,
        envvar=ENV_PREFIX + "CONFIG",
        help="Options from a YAML file (keys: the long flags, e.g. kv-cache-mb: 512); "
        "the command line and CONSORTIUM_* variables take precedence.",
    )
    command.params.insert(0, config)
    return command
