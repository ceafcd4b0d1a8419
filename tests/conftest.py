"""Fixtures of every test: the tiny random GGUF and the real default model. Shared helpers
live in the tests/helpers package (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.tiny_model import TinySpec, write_tiny_gguf

from consortium.model.files import default_model_path


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory, monkeypatch) -> None:
    """Keys and coordinator pins (trust on first use) of whatever a test starts without
    --data-dir go to a fresh folder, never ~/.local/share/consortium: a pin left there by an
    earlier run's coordinator on the same port would (rightly) be refused."""
    monkeypatch.setenv("CONSORTIUM_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    # packed-weight caches and digest memos of the test's throwaway models stay out of ~/.cache
    monkeypatch.setenv("CONSORTIUM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 4-layer random Llama GGUF using every supported quant type."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TinySpec())


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The real default model (pulled by `make test`); tests needing it skip only outside CI."""
    p = default_model_path()
    if not p.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"default model missing at {p}: run `consortium model pull`")
        pytest.skip("default model not pulled")
    return p
