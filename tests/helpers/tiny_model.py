"""A tiny random Llama GGUF written with gguf.GGUFWriter, for fast tests without the real model.

Byte-level BPE vocab (256 byte tokens, a few merges, ChatML specials), 4 layers whose
matrices use every supported quantization type, so loading and dequantization of each
type is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType
from gguf.quants import quantize

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "Ġ a", "o n", "Ġ s", "r e"]
# K-quant block layouts: (bytes per block, offsets of fp16 super-block scales)
K_BLOCKS = {Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


@dataclass
class TinySpec:
    n_layers: int = 4
    dim: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 512
    context_length: int = 128
    rope_base: float = 10000.0
    arch: str = "llama"
    tied: bool = False
    seed: int = 0
    # quant type per matrix kind; layers cycle through `layer_quants`
    layer_quants: list[Q] = field(
        default_factory=lambda: [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F32]
    )
    embed_quant: Q = Q.Q8_0
    vocab_kind: str = "gpt2"  # gpt2 (byte-level BPE) | llama (SentencePiece-style)
    tokenizer_model: str | None = None  # override the tokenizer.ggml.model name written
    extra_kv: dict = field(default_factory=dict)


SP_PIECES = [
    "▁",
    *"abcdefghijklmnopqrstuvwxyz",
    "▁t",
    "he",
    "▁the",
    "in",
    "▁a",
    "er",
    "at",
    "▁c",
    "▁cat",
    "▁h",
]


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """Llama-2-style vocab: <unk> <s> </s>, 256 byte-fallback tokens, then scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES + SPECIALS[1:]
    scores = [0.0] * 259 + [-float(i) if len(p) == 1 else 10.0 - i for i, p in enumerate(SP_PIECES)]
    scores += [0.0] * (len(SPECIALS) - 1)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * len(SP_PIECES) + [TokenType.CONTROL] * (len(SPECIALS) - 1)
    return tokens, scores, types


def _random_k_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    size, scale_offsets = K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    # Keep the fp16 super-block scales small: random sub-scales and codes reach |w| ~ 4000 d
    # (Q6_K), and activations must stay far below fp16's 65504 for the fp16 engine.
    for off in scale_offsets:
        d = (rng.uniform(0.0001, 0.0004, size=(rows, cols // 256)) * (1 if off != 2 else 0.5)).astype(
            np.float16
        )
        blocks[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def _matrix(rng: np.random.Generator, qtype: Q, rows: int, cols: int, std: float) -> tuple[np.ndarray, Q]:
    if qtype in K_BLOCKS:
        if cols % 256:
            qtype = Q.Q8_0  # K-quants need 256-wide rows
        else:
            return _random_k_blocks(rng, qtype, rows, cols), qtype
    w = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
    if qtype == Q.F32:
        return w, qtype
    if qtype == Q.F16:
        return w.astype(np.float16), qtype
    return quantize(w, qtype), qtype


def write_tiny_gguf(path: str | Path, spec: TinySpec | None = None) -> Path:
    spec = spec or TinySpec()
    rng = np.random.default_rng(spec.seed)
    if spec.vocab_kind == "llama":
        tokens, scores, types = _sentencepiece_vocab()
        bos, eos = 1, 2
    else:
        tokens = byte_tokens() + [m.replace(" ", "") for m in MERGES] + SPECIALS
        types = [TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [TokenType.CONTROL] * len(SPECIALS)
        bos = eos = tokens.index("<|endoftext|>")
    vocab = len(tokens)
    head_dim = spec.dim // spec.n_heads

    w = GGUFWriter(str(path), spec.arch)
    w.add_name("tiny-random-llama")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(spec.rope_base)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spec.vocab_kind == "llama":
        w.add_tokenizer_model(spec.tokenizer_model or "llama")
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    else:
        w.add_tokenizer_model(spec.tokenizer_model or "gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(MERGES)
        w.add_add_bos_token(False)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_chat_template(CHAT_TEMPLATE)
    for k, v in spec.extra_kv.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_float32(k, float(v))

    emb, et = _matrix(rng, spec.embed_quant, vocab, spec.dim, 1.0)
    w.add_tensor("token_embd.weight", emb, raw_dtype=et)
    qi = 0
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(spec.dim)).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(spec.dim)).astype(np.float32))
        for name, rows, cols in [
            ("attn_q", spec.n_heads * head_dim, spec.dim),
            ("attn_k", spec.n_kv_heads * head_dim, spec.dim),
            ("attn_v", spec.n_kv_heads * head_dim, spec.dim),
            ("attn_output", spec.dim, spec.n_heads * head_dim),
            ("ffn_gate", spec.ffn_dim, spec.dim),
            ("ffn_up", spec.ffn_dim, spec.dim),
            ("ffn_down", spec.dim, spec.ffn_dim),
        ]:
            data, qt = _matrix(
                rng, spec.layer_quants[qi % len(spec.layer_quants)], rows, cols, 0.5 / np.sqrt(cols)
            )
            qi += 1
            w.add_tensor(p + name + ".weight", data, raw_dtype=qt)
    w.add_tensor("output_norm.weight", np.ones(spec.dim, dtype=np.float32))
    if not spec.tied:
        out, ot = _matrix(rng, Q.F16, vocab, spec.dim, 1.0 / np.sqrt(spec.dim))
        w.add_tensor("output.weight", out, raw_dtype=ot)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
