"""Single-node generation on the real default model."""

from __future__ import annotations

import pytest

from consortium.errors import InvalidRequestError
from consortium.model.generate import generate, load_single_node
from consortium.model.sampling import SamplingParams

PROMPT = "Explain in one paragraph why the sky appears blue."
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smol(smollm_path):
    return load_single_node(smollm_path)


def test_greedy_answer_is_on_topic_and_reproducible(smol):
    gguf, stage, tok = smol
    ids = tok.encode_prompt(PROMPT, chat=True)
    a = generate(stage, tok, ids, 16, SamplingParams())
    assert a.text.startswith("The sky appears blue")
    assert a.prompt_tokens == len(ids) and len(a.tokens) == 16
    assert generate(stage, tok, ids, 16, SamplingParams()).tokens == a.tokens


def test_seeded_sampling_is_reproducible(smol):
    gguf, stage, tok = smol
    ids = tok.encode_prompt(PROMPT, chat=True)
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=3)
    a = generate(stage, tok, ids, 16, p)
    assert generate(stage, tok, ids, 16, p).tokens == a.tokens
    assert generate(stage, tok, ids, 16, SamplingParams(0.8, 40, 0.95, seed=4)).tokens != a.tokens


def test_streamed_text_equals_final_text(smol):
    gguf, stage, tok = smol
    pieces: list[str] = []
    r = generate(
        stage,
        tok,
        tok.encode_prompt("Write the word café three times.", chat=True),
        24,
        SamplingParams(),
        on_text=pieces.append,
    )
    assert "".join(pieces) == r.text


def test_stops_at_end_of_turn(smol):
    gguf, stage, tok = smol
    r = generate(stage, tok, tok.encode_prompt("Say only the word: yes", chat=True), 64, SamplingParams())
    assert len(r.tokens) < 64 and not set(r.tokens) & tok.stop_ids


def test_request_errors(smol):
    gguf, stage, tok = smol
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        generate(stage, tok, [], 4, SamplingParams())
    with pytest.raises(InvalidRequestError, match="context of 8192"):
        generate(stage, tok, [1] * 8192, 4, SamplingParams())
