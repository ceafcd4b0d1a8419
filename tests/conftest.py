from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import TinySpec, write_tiny_gguf  # noqa: E402

from consortium.model.files import default_model_path  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 4-layer random Llama GGUF using every supported quant type."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TinySpec())


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The real default model (pulled by `make test`); tests needing it skip only outside CI."""
    p = default_model_path()
    if not p.is_file():
        import os

        if os.environ.get("CI"):
            pytest.fail(f"default model missing at {p}: run `consortium model pull`")
        pytest.skip("default model not pulled")
    return p
