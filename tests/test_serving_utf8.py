"""The HTTP API's text when a generation ends inside a multi-byte character: the serving layer's
deltas (streamed, and joined for a full response) must add up to the session's text, held-back
bytes included (as U+FFFD, like `generate` and the gRPC client). Events are made as the
coordinator's token loop makes them, with the tiny model's byte-level tokenizer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from consortium.coordinator.audits import SessionAudits
from consortium.core.config import SessionRequest
from consortium.core.records import RollbackRecord
from consortium.core.session import Session
from consortium.model.generate import TextStream
from consortium.model.gguf_file import GGUFModel
from consortium.model.tokenizer import GGUFTokenizer
from consortium.serving.generation import Generation
from consortium.transport.proto import consortium_pb2 as pb


@pytest.fixture(scope="module")
def tok(tiny_gguf) -> GGUFTokenizer:
    return GGUFTokenizer(GGUFModel(tiny_gguf))


@pytest.fixture(scope="module")
def cut(tok) -> list[int]:
    """Token ids of "hi 🙂" without the emoji's last byte: the text ends mid-character."""
    ids = tok.encode("hi 🙂", add_bos=False)[:-1]
    assert tok.decode(ids).endswith("\ufffd") and "".join(_deltas(tok, ids)) == "hi "
    return ids


def _deltas(tok: GGUFTokenizer, ids: list[int]) -> list[str]:
    stream = TextStream(tok)
    return [stream.push(t) for t in ids]


def session(caught: int = 0) -> Session:
    s = Session("utf8-session", SessionRequest("p"), [1, 2], 16, [])
    s.audits = SessionAudits(s.session_id, random.Random(0), 0.0)
    s.audits.caught = {f"worker-{i}" for i in range(caught)}  # rollbacks on their way to the stream
    return s


def events(tok: GGUFTokenizer, s: Session, ids: list[int], rollback: tuple[list[int], int] | None = None):
    """As the token loop: one token event per token (its TextStream delta), an optional rollback
    (withdrawn tokens first, then how many stand), the summary with the session's whole text."""

    def run() -> Iterator[pb.GenerateEvent]:
        tokens: list[int] = []
        if rollback is not None:
            withdrawn, kept = rollback
            for t, text in zip(withdrawn, _deltas(tok, withdrawn), strict=True):
                yield pb.GenerateEvent(token=pb.TokenEvent(token=t, text=text))
            r = RollbackRecord(1, 10 + kept, "worker-0", "failed audit", kept, "coordinator")
            yield pb.GenerateEvent(rollback=r.to_proto())
            tokens = withdrawn[:kept]
        stream = TextStream(tok)
        for t in tokens:  # the loop's _text_stream after a rollback: kept text counts as sent
            stream.push(t)
        for t in ids:
            tokens.append(t)
            yield pb.GenerateEvent(token=pb.TokenEvent(token=t, text=stream.push(t)))
        s.tokens = tokens
        yield pb.GenerateEvent(done=pb.SessionSummary(text=tok.decode(tokens), stop_reason="max_tokens"))

    return run()


def collect(
    s: Session, evs, verified: bool, stops: list[str], streaming: bool
) -> tuple[list[str], Generation]:
    """The deltas of a Generation (made in the event loop: it bridges the events into it)."""

    async def go() -> tuple[list[str], Generation]:
        gen = Generation(s, evs, verified, stops)
        if streaming:
            return [d async for d in gen.deltas()], gen
        return [await gen.text()], gen

    return asyncio.run(go())


@pytest.mark.parametrize("verified", [True, False], ids=["verified", "optimistic"])
@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "full"])
def test_text_ending_mid_character_keeps_its_held_back_bytes(tok, cut, verified, streaming):
    s = session()
    out, gen = collect(s, events(tok, s, cut), verified, [], streaming)
    assert "".join(out) == tok.decode(cut) == "hi \ufffd"
    assert gen.finish_reason == "length" and gen.usage()["completion_tokens"] == len(cut)


def test_a_rollback_then_an_end_mid_character(tok, cut):
    s = session(caught=1)  # held until the rollback's event reached the stream
    withdrawn = tok.encode("hi 🙂", add_bos=False)
    out, _ = collect(s, events(tok, s, cut[3:], rollback=(withdrawn, 3)), True, [], streaming=True)
    assert "".join(out) == tok.decode(cut) == "hi \ufffd"


def test_a_stop_string_reaching_into_the_held_back_bytes_ends_the_text(tok, cut):
    s = session()
    out, gen = collect(s, events(tok, s, cut), True, [" \ufffd"], streaming=True)
    assert "".join(out) == "hi" and gen.finish_reason == "stop"


def test_complete_characters_add_nothing(tok):
    ids = tok.encode("hi 🙂 日本", add_bos=False)
    s = session()
    out, _ = collect(s, events(tok, s, ids), False, [], streaming=True)
    assert out == [d for d in _deltas(tok, ids) if d]
