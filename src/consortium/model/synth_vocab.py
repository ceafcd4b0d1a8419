"""A synthetic byte-level BPE vocabulary of any size, in the style of Llama-3 (or SmolLM2).

256 byte tokens, then tokens built by merges (every token's prefix is a token, so each merge
joins an earlier token and one byte: always valid, and text always round-trips): common English
words with and without a leading space, digit groups as Llama-3's pre-tokenizer splits them,
whitespace runs, then pseudo-words from syllables until the vocabulary is full; the special
tokens of the family at their real ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _words(text: str) -> list[str]:
    return text.split()


WORDS = _words("""the of and to in is was that for on are with as be at by this have from or one had not but what
all were when we there can an your which their said if do will each about how up out them then she
many some so these would other into has more her two like him see time could no make than first been
its who now people my made over did down only way find use may water long little very after words
called just where most know get through back much go good new write our me man too any day same right
look think also around another came come work three word must because does part even place well such
here take why things help put years different away again off went old number great tell men say small
every found still between name should home big give air line set own under read last never us left end
along while might next sound below saw something thought both few those always looked show large often
together asked house don world going want school important until form food keep children feet land side
without boy once animals life enough took sometimes four head above kind began almost live page got
earth need far hand high year mother light parts country father let night following picture being study
second eyes soon times story boys since white days ever paper hard near sentence better best across
during today others however sure means knew try told young miles sun ways thing whole hear example heard
several change answer room sea against top turned learn point city play toward five using himself usually
explain paragraph sky appears blue why red green color short hello model token language machine consortium
""")
ONSETS = _words("b c d f g h j k l m n p r s t v w z st tr pr ch sh th bl cl gr pl sp") + [""]
VOWELS = _words("a e i o u ea ou ai io ee oo")
CODAS = _words("n r s t l m nd ng st ck rt ll ss") + ["", ""]
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM_SPECIALS = _words(
    "<|endoftext|> <|im_start|> <|im_end|> <repo_name> <reponame> <file_sep> <filename> <gh_stars> "
    "<issue_start> <issue_comment> <issue_closed> <jupyter_start> <jupyter_text> <jupyter_code> "
    "<jupyter_output> <jupyter_script> <empty_output>"
)


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]  # GGUF token types: 1 normal, 3 control
    merges: list[str]
    bos: int
    eos: int
    pre: str
    add_bos: bool
    chat_template: str


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = 256 + extra, extra + 1
    return [chr(table[b]) for b in range(256)]


def llama3_specials(n: int) -> list[str]:
    """Llama-3.1's 256 special tokens (named ones at their ids, the rest reserved), first n of them."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>"}
    named |= {6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>"}
    named[10] = "<|python_tag|>"
    out, reserved = [], 0
    for i in range(n):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n pseudo-words of 1-3 syllables, most with a leading space (Ġ), some capitalised."""
    parts = [rng.choice(np.array(p, dtype=object), size=(n, 3)) for p in (ONSETS, VOWELS, CODAS)]
    n_syl, space, cap = rng.integers(1, 4, n), rng.random(n) < 0.7, rng.random(n) < 0.15
    words = []
    for i in range(n):
        w = "".join(parts[0][i, j] + parts[1][i, j] + parts[2][i, j] for j in range(n_syl[i]))
        w = w.capitalize() if cap[i] else w
        words.append(("Ġ" if space[i] else "") + w)
    return words


def _regular_tokens(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n regular tokens (256 bytes first) and the merges that build all but the bytes, in rank order."""
    tokens, merges = byte_tokens(), []
    known = set(tokens)

    def add(word: str) -> None:
        for end in range(2, len(word) + 1):
            if len(tokens) >= n:
                return
            piece = word[:end]
            if piece not in known:
                known.add(piece)
                tokens.append(piece)
                merges.append(f"{word[: end - 1]} {word[end - 1]}")

    seeds = [w for word in WORDS for w in ("Ġ" + word, word, "Ġ" + word.capitalize(), word.capitalize())]
    seeds += [str(i) for i in range(1000)] + ["Ġ" * k for k in range(2, 17)] + ["ĊĊ", "ĊĊĊ", "ĉĉ", "Ġ(", ".Ċ"]
    for word in seeds:
        add(word)
    rng = np.random.default_rng(seed)
    while len(tokens) < n:
        for word in _pseudo_words(rng, 4096):
            add(word)
    return tokens, merges


def make_vocab(size: int, family: str, seed: int = 0) -> Vocab:
    """A valid byte-level BPE vocabulary of exactly `size` tokens for a model family."""
    if family == "smollm":
        specials = SMOLLM_SPECIALS
        regular, merges = _regular_tokens(size - len(specials), seed)
        tokens = specials + regular
        return Vocab(
            tokens, [3] * len(specials) + [1] * len(regular), merges, 1, 2, "smollm", False, CHATML_TEMPLATE
        )
    n_special = min(256, size // 4)
    regular, merges = _regular_tokens(size - n_special, seed)
    tokens = regular + llama3_specials(n_special)
    first = len(regular)
    types = [1] * len(regular) + [3] * n_special
    return Vocab(tokens, types, merges, first, first + 9, "llama-bpe", True, LLAMA3_TEMPLATE)
