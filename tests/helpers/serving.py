"""Helpers of the serving tests: a tiny model with a long context, the single-node text the API
must equal, and /metrics as a dict."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from consortium.model.generate import generate, load_single_node
from consortium.model.sampling import SamplingParams
from helpers.tiny_model import TinySpec, write_tiny_gguf


def long_tiny_gguf(path: Path) -> Path:
    """The tiny model with room for long generations (disconnect tests)."""
    return write_tiny_gguf(path, TinySpec(context_length=2048))


def single_node_text(model: Path, prompt: str, max_tokens: int, chat: bool = True) -> tuple[str, list[int]]:
    """What `consortium generate` streams (greedy): its text deltas joined, the flushed end of an
    incomplete character included (the tiny model often ends mid-character); equal to its text."""
    _, stage, tok = load_single_node(str(model))
    deltas: list[str] = []
    result = generate(
        stage, tok, tok.encode_prompt(prompt, chat=chat), max_tokens, SamplingParams(), deltas.append
    )
    assert "".join(deltas) == result.text
    return result.text, result.tokens


class Metrics:
    """A /metrics scrape: value(name, **labels), 0 when absent."""

    def __init__(self, text: str):
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def __contains__(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)
