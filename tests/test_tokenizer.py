"""Tokenizers built from GGUF metadata: round trips, special tokens, BOS/EOS, chat templates."""

from __future__ import annotations

import pytest
from helpers.tiny_model import TinySpec, write_tiny_gguf

from consortium.errors import UnsupportedModelError
from consortium.model.gguf_file import GGUFModel
from consortium.model.tokenizer import ChatMessage, GGUFTokenizer

TEXTS = [
    "the cat in the hat",
    "Hello, world! 123 + 4567 = 4690",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "naïve café, 日本語, emoji 🙂",
    "don't stop; it's fine",
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_gguf):
    return GGUFTokenizer(GGUFModel(tiny_gguf))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    p = write_tiny_gguf(tmp_path_factory.mktemp("sp") / "sp.gguf", TinySpec(vocab_kind="llama"))
    return GGUFTokenizer(GGUFModel(p))


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(tiny_tok, text):
    ids = tiny_tok.encode(text)
    assert all(0 <= i < tiny_tok.vocab_size for i in ids)
    assert tiny_tok.decode(ids) == text


def test_byte_level_merges_apply(tiny_tok):
    # "Ġt he" is a merge: " the" is one token
    ids = tiny_tok.encode("in the")
    assert tiny_tok.tok.id_to_token(ids[-1]) == "Ġthe"


def test_special_tokens_are_matched_whole(tiny_tok):
    ids = tiny_tok.encode("<|im_start|>user\nhi<|im_end|>")
    start, end = tiny_tok.tok.token_to_id("<|im_start|>"), tiny_tok.tok.token_to_id("<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert tiny_tok.decode(ids) == "user\nhi"  # specials skipped
    assert tiny_tok.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|>"
    assert end in tiny_tok.stop_ids and tiny_tok.eos_id in tiny_tok.stop_ids


def test_chat_template(tiny_tok):
    text = tiny_tok.render_chat([ChatMessage("user", "hello")])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tok.encode_prompt("hello", chat=True) == tiny_tok.encode(text)
    assert tiny_tok.encode_prompt("hello", chat=False) == tiny_tok.encode("hello")


@pytest.mark.parametrize("text", ["the cat ate the hat", "a b  c", "Ωmega 🙂 x"])
def test_sentencepiece_round_trip_with_byte_fallback(sp_tok, text):
    ids = sp_tok.encode(text)
    assert ids[0] == sp_tok.bos_id  # llama vocabularies add BOS
    assert sp_tok.decode(ids) == text


def test_sentencepiece_merges_follow_scores(sp_tok):
    ids = sp_tok.encode("the cat", add_bos=False)
    assert [sp_tok.token_text(i) for i in ids] == ["▁the", "▁cat"]


def test_unsupported_tokenizer_kind(tmp_path):
    p = write_tiny_gguf(tmp_path / "x.gguf", TinySpec(tokenizer_model="rwkv"))
    with pytest.raises(UnsupportedModelError, match="unsupported tokenizer model 'rwkv'"):
        GGUFTokenizer(GGUFModel(p))


@pytest.mark.model
def test_smollm_tokenizer(smollm_path):
    tok = GGUFTokenizer(GGUFModel(smollm_path))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hello world!") == [19556, 905, 17]  # ids from HF's SmolLM2 tokenizer
    ids = tok.encode_prompt("Explain in one paragraph why the sky appears blue.", chat=True)
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|>system ... assistant\n
    assert tok.chat_template and 2 in tok.stop_ids


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_streamed_text_adds_up_to_the_whole_decode(tiny_tok, sp_tok, kind):
    """TextStream decodes a window per token (not the whole text again); its deltas, held-back
    bytes included, still add up to decoding every token at once. Byte-level: real texts cut at
    every length, and random ids (partial characters, special tokens). SentencePiece: whole
    texts; a cut inside a byte-fallback run has no stable whole decode (its decoder turns the
    entire run into replacement characters until the run is valid), for any stream of deltas."""
    import random

    from consortium.model.generate import TextStream

    tok = tiny_tok if kind == "byte-level" else sp_tok
    texts = [tok.encode(t, add_bos=False) for t in TEXTS]
    if kind == "byte-level":
        rng = random.Random(7)
        noise = [[rng.randrange(tok.vocab_size) for _ in range(200)] for _ in range(20)]
        cases = texts + [ids[:n] for ids in texts for n in range(1, len(ids))] + noise
    else:
        cases = texts
    for ids in cases:
        stream = TextStream(tok)
        deltas = [stream.push(t) for t in ids]
        held = stream.flush()
        assert "".join(deltas) + held == tok.decode(ids)
        if any(ids is whole for whole in texts):  # whole characters: everything streamed as it came
            assert held == "" and sum(map(bool, deltas)) >= len(ids) // 2
