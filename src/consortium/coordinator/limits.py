"""Per-client limits on sessions: how many run at once and how fast new ones may start.

A client is identified by its authenticated key when it has one, else by its network
address; the table is bounded so that many addresses cannot grow it without end.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from consortium.errors import CacheError

MAX_CLIENTS = 10_000  # clients remembered at once (the least recently seen idle ones are forgotten)


class TooManySessionsError(CacheError):
    """A client is over its limit (RESOURCE_EXHAUSTED)."""


@dataclass
class _Client:
    tokens: float  # session starts left in the bucket
    last: float  # when the bucket was last refilled
    running: int = 0


class ClientLimits:
    def __init__(self, max_running: int, per_minute: float, clock=time.monotonic):
        self.max_running, self.per_minute, self.clock = max_running, per_minute, clock
        self.burst = max(1.0, float(max_running), per_minute / 2)  # half a minute's starts at once
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, client: str) -> None:
        """Counts a new session of `client`, or raises TooManySessionsError with nothing counted."""
        now = self.clock()
        with self._lock:
            c = self._clients.get(client) or _Client(self.burst, now)
            c.tokens = min(self.burst, c.tokens + (now - c.last) * self.per_minute / 60.0)
            c.last = now
            if c.running >= self.max_running:
                raise TooManySessionsError(
                    f"client {client} has {c.running} sessions running; at most {self.max_running} at once"
                )
            if c.tokens < 1.0:
                raise TooManySessionsError(
                    f"client {client} starts sessions too fast: at most {self.per_minute:g} a minute"
                )
            c.tokens -= 1.0
            c.running += 1
            self._clients[client] = c
            self._clients.move_to_end(client)
            self._forget_idle()

    @contextmanager
    def starting(self, client: str) -> Iterator[None]:
        """Counts a session of `client` while it starts; uncounted again if starting it fails."""
        self.admit(client)
        try:
            yield
        except BaseException:
            self.release(client)
            raise

    def release(self, client: str) -> None:
        with self._lock:
            c = self._clients.get(client)
            if c is not None and c.running > 0:
                c.running -= 1

    def _forget_idle(self) -> None:
        for key in list(self._clients)[: max(0, len(self._clients) - MAX_CLIENTS)]:
            if self._clients[key].running == 0:
                del self._clients[key]


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:127.0.0.1:5000" -> "127.0.0.1")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
