"""One API request's session, run in-process on the Coordinator: its events come from a thread
into the event loop, and go out as text deltas in the order and at the time the release mode
allows (release.py), cut at a stop string; the client's disconnect cancels the session."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict
from typing import Any

import jinja2

from consortium.core.placement import PlacementError
from consortium.core.records import RollbackRecord
from consortium.core.session import Session
from consortium.errors import CacheError, ConsortiumError, InvalidRequestError, UnsupportedModelError
from consortium.serving.release import Releaser, StopMatcher, secured_tokens
from consortium.serving.schemas import ApiError
from consortium.transport.proto import consortium_pb2 as pb
from consortium.verification.tolerance import tolerance_class

POLL_S = 0.005  # while tokens are held: how often to look whether their audits settled
_END = object()


def api_error(e: BaseException) -> ApiError:
    """The HTTP status and OpenAI error of a library error."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequestError):
        code = "context_length_exceeded" if "context" in str(e) else None
        return ApiError(400, str(e), "messages" if code else None, code)
    if isinstance(e, (UnsupportedModelError, jinja2.TemplateError)):
        return ApiError(400, f"chat template: {e}", "messages")
    if isinstance(e, CacheError):
        return ApiError(429, str(e), None, "too_many_sessions")
    if isinstance(e, PlacementError):
        return ApiError(503, f"no complete pipeline: {e}", None, "no_pipeline")
    if isinstance(e, ConsortiumError):
        return ApiError(503, str(e), None, "session_failed")
    return ApiError(500, f"internal error: {e!r}")


class EventBridge:
    """Drains a blocking event iterator (Coordinator.run) in a thread into an asyncio queue."""

    def __init__(self, events: Iterator[pb.GenerateEvent], name: str):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._drain, args=(events,), name=name, daemon=True).start()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server stopping)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _drain(self, events: Iterator[pb.GenerateEvent]) -> None:
        try:
            for ev in events:
                self._put(ev)
            self._put(_END)
        except BaseException as e:  # re-raised by next()
            self._put(e)

    async def next(self, timeout: float | None) -> Any:
        """The next event, _END, or None when `timeout` passed first."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


def _held_back(text: str, streamed: str) -> str:
    """What of the session's text its token events held back: the coordinator's text stream
    waits while the decoded text ends in an incomplete UTF-8 sequence, so a generation ending
    mid-character leaves its last bytes (U+FFFD in `text`, as `generate` prints them) unsent."""
    return text[len(streamed) :] if text.startswith(streamed) else ""


class Generation:
    """Text deltas of one session; timings go to `on_token(gap_s, first)` as tokens go out."""

    def __init__(
        self,
        session: Session,
        events: Iterator[pb.GenerateEvent],
        verified: bool,
        stops: list[str],
        on_token: Callable[[float, bool], None] = lambda gap, first: None,
    ):
        self.session, self.verified, self.on_token = session, verified, on_token
        self.releaser = Releaser(verified)
        self.stop = StopMatcher(stops)
        self.t0 = self.last = time.perf_counter()
        self.prompt_tokens = len(session.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # stop | length; None: cancelled or failed
        self.token_texts: list[str] = []  # each standing token's delta (rollbacks drop theirs)
        self.held_back = ""  # text the token events never carried: an incomplete character at the end
        self.ended = False
        self.disconnected = False  # the client went away
        self.bridge = EventBridge(events, f"http-{session.session_id[:8]}")

    def cancel(self) -> None:
        """Stops the session at its next step; its caches close on every node."""
        self.session.cancel.set()

    async def deltas(self) -> AsyncIterator[str]:
        try:
            while not self.ended:
                ev = await self.bridge.next(POLL_S if self.releaser.held else None)
                self._handle(ev)
                final = self.finish_reason is not None  # the summary came: every audit is settled
                secured = secured_tokens(self.session, self.releaser.rollbacks_seen) if self.verified else 0
                for text in self.releaser.release(secured, final):
                    out = self._out(text)
                    if out:
                        yield out
                    if self.stop.stopped:
                        self.finish_reason = "stop"
                        return
            if self.finish_reason is None:  # ended without its summary: cancelled or stopped elsewhere
                s = self.session
                raise ApiError(503, f"session {s.session_id} ended {s.state}: {s.error}", None, s.state)
            # after every token's text, so that the deltas add up to the session's text
            out = self.stop.push(self.held_back) if self.held_back else ""
            if out:
                yield out
            if self.stop.stopped:
                self.finish_reason = "stop"
                return
            tail = self.stop.flush()
            if tail:
                yield tail
        finally:
            if not self.ended:  # a stop string, a disconnect, an error: the session ends here
                self.cancel()

    def _handle(self, ev: Any) -> None:
        if ev is _END:
            self.ended = True
            return
        kind = ev.WhichOneof("event") if ev is not None else None
        if kind == "token":
            self.releaser.token(ev.token.text)
            self.token_texts.append(ev.token.text)
        elif kind == "rollback":
            rb = RollbackRecord.from_proto(ev.rollback)
            self.releaser.rollback(rb)
            del self.token_texts[rb.kept_tokens :]
        elif kind == "done":
            self.finish_reason = "stop" if ev.done.stop_reason == "eos" else "length"
            self.held_back = _held_back(ev.done.text, "".join(self.token_texts))

    def _out(self, text: str) -> str:
        now = time.perf_counter()
        self.on_token(now - self.last, self.completion_tokens == 0)
        self.last = now
        self.completion_tokens += 1
        return self.stop.push(text)

    async def text(self) -> str:
        return "".join([d async for d in self.deltas()])

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def consortium(self) -> dict:
        """What verification did for this response."""
        s = self.session
        return {
            "session_id": s.session_id,
            "audits": asdict(s.audits.counts()),
            "failovers": [f.to_dict() for f in s.failovers],
            "rollbacks": [r.to_dict() for r in s.rollbacks],
            "verification": tolerance_class(*(r.dtype for r in s.stages)).name,
            "release": "verified" if self.verified else "optimistic",
        }

    async def cancel_on_disconnect(self, receive) -> None:
        """Awaits the client's disconnect (the body was read already) and cancels the session."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self.cancel()
