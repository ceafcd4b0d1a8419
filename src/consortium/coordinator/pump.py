"""Runs a session's event generator in its own thread, so that streaming an event to the
client (a gRPC stream write waits until the message is sent) never delays the token loop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def pumped(events: Iterator[T], cancel: threading.Event, name: str) -> Iterator[T]:
    """Yields what `events` yields, computed ahead in a thread. If the consumer stops early,
    `cancel` is set so that the producer ends at its next step; its exceptions re-raise here."""
    q: queue.SimpleQueue = queue.SimpleQueue()

    def produce() -> None:
        try:
            for ev in events:
                q.put((True, ev))
            q.put((True, _END))
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put((False, e))

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        if worker.is_alive():
            cancel.set()
