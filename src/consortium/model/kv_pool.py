"""Per-session KV caches of one stage under a memory budget, with idle expiry."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from consortium.errors import CacheError
from consortium.model.model import KVCache, Stage


class UnknownSessionError(CacheError):
    """No cache for this session on this stage (never created, expired or dropped)."""


@dataclass
class CacheEntry:
    cache: KVCache
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one computation per session at a time


class CachePool:
    def __init__(self, stage: Stage, max_bytes: int, idle_timeout_s: float = 600.0):
        self.stage, self.max_bytes, self.idle_timeout_s = stage, max_bytes, idle_timeout_s
        self._entries: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.cache.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def create(self, session_id: str, capacity: int) -> KVCache:
        """A fresh cache for the session (replacing any old one), or CacheError if over budget."""
        self.expire()
        need = KVCache.nbytes_for(self.stage.args, self.stage.n_layers, capacity, self.stage.spec.torch_dtype)
        with self._lock:
            old = self._entries.pop(session_id, None)
            used = sum(e.cache.nbytes for e in self._entries.values())
            if used + need > self.max_bytes:
                if old is not None:
                    self._entries[session_id] = old
                raise CacheError(
                    f"KV cache for {capacity} positions needs {need / 2**20:.1f} MiB; "
                    f"{(self.max_bytes - used) / 2**20:.1f} MiB of {self.max_bytes / 2**20:.1f} MiB free"
                )
            entry = CacheEntry(self.stage.new_cache(capacity))
            self._entries[session_id] = entry
            return entry.cache

    def entry(self, session_id: str) -> CacheEntry:
        with self._lock:
            e = self._entries.get(session_id)
        if e is None:
            raise UnknownSessionError(f"unknown session {session_id!r} on this stage")
        e.last_used = time.monotonic()
        return e

    def get(self, session_id: str) -> KVCache:
        return self.entry(session_id).cache

    def drop(self, session_id: str) -> bool:
        with self._lock:
            return self._entries.pop(session_id, None) is not None

    def expire(self, now: float | None = None) -> list[str]:
        """Free caches idle longer than the timeout; returns their session ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [s for s, e in self._entries.items() if now - e.last_used > self.idle_timeout_s]
            for s in dead:
                del self._entries[s]
        return dead
