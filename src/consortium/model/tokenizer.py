"""Tokenizer and chat template from GGUF metadata, built with the `tokenizers` library.

Supports gpt2-style byte-level BPE (SmolLM2, Llama-3, Qwen ...) and the SentencePiece
style llama vocabulary (Llama-2, Mistral); special tokens (GGUF token types CONTROL
and USER_DEFINED) are matched whole in text.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from consortium.errors import UnsupportedModelError
from consortium.model.gguf_file import GGUFModel

# Pre-tokenizer regexes of llama.cpp's vocab pre-types (llama-vocab.cpp), by tokenizer.ggml.pre.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [GPT2_RE],
    "gpt-2": [GPT2_RE],
    "llama-bpe": [LLAMA3_RE],
    "llama3": [LLAMA3_RE],
    "smollm": [r"\p{N}", GPT2_RE],
    "starcoder": [r"\p{N}", GPT2_RE],
    "qwen2": [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
}
IGNORE_MERGES = frozenset({"llama-bpe", "llama3"})
CONTROL, USER_DEFINED = 3, 4


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class GGUFTokenizer:
    def __init__(self, gguf: GGUFModel):
        kind = gguf.meta("tokenizer.ggml.model")
        tokens: list[str] = gguf.meta("tokenizer.ggml.tokens") or []
        types: list[int] = gguf.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            self.tok = _byte_level_bpe(gguf, tokens)
        elif kind == "llama":
            self.tok = _sentencepiece_bpe(gguf, tokens)
        else:
            raise UnsupportedModelError(f"unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
        self.kind = kind
        specials = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=False)
            if ty in (CONTROL, USER_DEFINED)
        ]
        self.tok.add_special_tokens(specials)
        self.tokens = tokens
        self.bos_id = gguf.meta("tokenizer.ggml.bos_token_id")
        self.eos_id = gguf.meta("tokenizer.ggml.eos_token_id")
        default_bos = kind == "llama"
        self.add_bos = (
            bool(gguf.meta("tokenizer.ggml.add_bos_token", default_bos)) and self.bos_id is not None
        )
        self.chat_template: str | None = gguf.meta("tokenizer.chat_template")
        # Stop on EOS and on end-of-turn tokens the chat template emits.
        eot = gguf.meta("tokenizer.ggml.eot_token_id")
        self.stop_ids = {i for i in (self.eos_id, eot) if i is not None}
        for name in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"):
            i = self.tok.token_to_id(name)
            if i is not None:
                self.stop_ids.add(i)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a long prompt being
        # tokenized never stalls the process's other threads (a coordinator's heartbeats).
        return self.tok.encode_batch([text], add_special_tokens=False)[0].ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, i: int) -> str:
        return self.tokens[i]

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """Render the GGUF chat template with jinja2 in a sandbox (templates come from files)."""
        if not self.chat_template:
            raise UnsupportedModelError("this model has no chat template (use --no-chat)")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str):
            raise jinja2.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        return env.from_string(self.chat_template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of a user prompt, through the chat template when asked and available."""
        if chat and self.chat_template:
            text = self.render_chat([ChatMessage("user", prompt)])
            # The template writes BOS itself where the model wants one.
            ids = self._encode(text)
            if self.add_bos and (not ids or ids[0] != self.bos_id):
                ids = [self.bos_id, *ids]
            return ids
        return self.encode(prompt)


def _byte_level_bpe(gguf: GGUFModel, tokens: list[str]) -> Tokenizer:
    merges_raw: list[str] = gguf.meta("tokenizer.ggml.merges") or []
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = gguf.meta("tokenizer.ggml.pre", "default")
    # Llama-3 takes a pre-token that is a whole vocabulary entry as it is (llama.cpp and HF both do).
    ignore_merges = pre in IGNORE_MERGES
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    regexes = PRE_TOKENIZERS.get(pre)
    if regexes is None:
        raise UnsupportedModelError(
            f"unsupported BPE pre-tokenizer {pre!r} (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(gguf: GGUFModel, tokens: list[str]) -> Tokenizer:
    """Llama/Mistral SentencePiece vocab: BPE whose merge order follows the token scores."""
    scores: list[float] = gguf.meta("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for tok_str, score in zip(tokens, scores, strict=False):
        for k in range(1, len(tok_str)):
            a, b = tok_str[:k], tok_str[k:]
            if a in vocab and b in vocab:
                merges.append((score, vocab[a], vocab[b], a, b))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = gguf.meta("tokenizer.ggml.unknown_token_id", 0)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=tokens[unk],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_prefix = bool(gguf.meta("tokenizer.ggml.add_space_prefix", True))
    norms = [normalizers.Prepend("▁")] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*norms, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1 if add_prefix else 0, 0),
        ]
    )
    return tok
