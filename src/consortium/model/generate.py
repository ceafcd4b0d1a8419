"""Single-node generation: the baseline every distributed run must equal."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from tokenizers.decoders import DecodeStream

from consortium.core.config import EngineConfig
from consortium.errors import InvalidRequestError
from consortium.model.model import Stage, StageSpec
from consortium.model.pack_cache import open_model
from consortium.model.sampling import SamplingParams, sample
from consortium.model.tokenizer import GGUFTokenizer


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    tokens_per_second: float
    time_to_first_token_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_request(prompt_ids: list[int], max_tokens: int, context_length: int) -> None:
    if not prompt_ids:
        raise InvalidRequestError("empty prompt")
    if max_tokens <= 0:
        raise InvalidRequestError(f"max-tokens must be positive, got {max_tokens}")
    if len(prompt_ids) >= context_length:
        raise InvalidRequestError(
            f"prompt of {len(prompt_ids)} tokens does not fit the model's context of {context_length}"
        )


class TextStream:
    """Turns a growing token list into text deltas (multi-byte characters arrive whole). Each
    token decodes only a short window of the latest tokens (tokenizers' DecodeStream), not the
    whole text again: a long session's token costs what its first did."""

    def __init__(self, tokenizer: GGUFTokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0  # sent: characters emitted
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self._stream is not None:
            try:
                delta = self._stream.step(self.tokenizer.tok, token) or ""  # None: a partial character
                self.sent += len(delta)
                return delta
            except Exception:  # it refuses some byte-fallback runs: whole decodes from here on
                self._stream = None
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def flush(self) -> str:
        """What push held back at the end (an incomplete UTF-8 sequence, as replacement characters)."""
        text = self.tokenizer.decode(self.ids)
        delta, self.sent = text[self.sent :], len(text)
        return delta


def generate(
    stage: Stage,
    tokenizer: GGUFTokenizer,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: SamplingParams,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Prefill the prompt in one call, then decode one token per call until EOS or max_tokens."""
    if not (stage.is_first and stage.is_last):
        raise InvalidRequestError("single-node generation needs a stage holding every layer")
    ctx = stage.args.context_length
    check_request(prompt_ids, max_tokens, ctx)
    max_tokens = min(max_tokens, ctx - len(prompt_ids))
    cache = stage.new_cache(len(prompt_ids) + max_tokens)
    stream = TextStream(tokenizer)
    tokens: list[int] = []
    t0 = time.perf_counter()
    x = torch.tensor(prompt_ids, dtype=torch.long)
    ttft = 0.0
    for _ in range(max_tokens):
        logits = stage(x, cache)
        token = sample(logits[-1], sampling, position=cache.length)
        if not tokens:
            ttft = time.perf_counter() - t0
        if token in tokenizer.stop_ids:
            break
        tokens.append(token)
        if on_text is not None:
            on_text(stream.push(token))
        x = torch.tensor([token], dtype=torch.long)
    if on_text is not None and (tail := stream.flush()):
        on_text(tail)
    elapsed = time.perf_counter() - t0
    decode_time = elapsed - ttft
    tps = (len(tokens) - 1) / decode_time if len(tokens) > 1 and decode_time > 0 else 0.0
    return GenerationResult(tokens, tokenizer.decode(tokens), len(prompt_ids), tps, ttft)


@contextmanager
def load_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr for Stage's (layers done, layers) callback; it draws only
    on a terminal, so logs and pipes stay clean."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


DEFAULT_ENGINE = EngineConfig()


def load_single_node(
    model: str,
    device: str = DEFAULT_ENGINE.device,
    dtype: str | None = None,
    packed: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    pack_cache: bool = DEFAULT_ENGINE.pack_cache,
):
    """The model, a stage of every layer and the tokenizer; a progress bar unless `progress` is
    given. dtype, packed None: as EngineConfig decides for the device."""
    engine = EngineConfig(device=device, dtype=dtype, packed=packed, pack_cache=pack_cache)
    gguf = open_model(model, engine)
    spec = StageSpec(0, gguf.args.n_layers, device=device, dtype=engine.dtype, packed=engine.packed)
    if progress is not None:
        return gguf, Stage(gguf, spec, progress), GGUFTokenizer(gguf)
    with load_progress(f"loading {gguf.path.name}") as bar:
        stage = Stage(gguf, spec, bar)
    return gguf, stage, GGUFTokenizer(gguf)
