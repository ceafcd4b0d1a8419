"""Committed outputs kept on disk instead of in memory: a remote last stage's logits.

Audits compare the logits a last stage committed (the coordinator's re-check from position 0
included), so a running session keeps every one of them: a vocabulary of fp32 per token,
513 KB for Llama 3, 2 GB for a 4k-token session, on the coordinator. They go to an anonymous
file beside the ledger instead (unlinked from the start: the OS frees it once no record points
into it), and a record keeps dtype, shape and where its bytes are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from consortium.errors import CacheError, ConsortiumError
from consortium.transport.tensors import WireTensor

DISK_MARGIN = 2**30  # what the default budget leaves free on the disk (the ledger grows too)


class SpillError(ConsortiumError):
    """The disk beside the ledger cannot take a committed output (full, or not writable)."""


class SpillFullError(CacheError):
    """The spill budget cannot hold a new session's logits (RESOURCE_EXHAUSTED: nothing held)."""


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class SpillBudget:
    """The disk the spill files may take together. A session whose last stage is remote reserves
    its worst case when it starts (a row of logits per token it may generate), so that a session
    admitted never runs the disk full halfway; one that needs more (a rollback redoes steps)
    grows its share while the budget has room. A finished session gives back what it did not
    use, and the rest when its history is dropped."""

    def __init__(self, directory: Path, limit: int | None = None):
        self.directory = directory
        if limit is None:  # what the disk has free now, less a margin
            try:
                directory.mkdir(parents=True, exist_ok=True)
                limit = max(0, shutil.disk_usage(directory).free - DISK_MARGIN)
            except OSError as e:
                raise SpillError(f"cannot keep committed logits in {directory}: {e.strerror or e}") from e
        self.limit = limit
        self.held = 0  # reserved by the open files, written or not
        self._lock = threading.Lock()

    def open(self, reserve: int) -> SpillFile:
        """A spill file with `reserve` bytes set aside (SpillFullError if they do not fit)."""
        self.take(
            reserve,
            lambda free: SpillFullError(
                f"the coordinator's disk budget for committed logits ({_gb(self.limit)} in {self.directory}) "
                f"cannot hold this session's {_gb(reserve)}: {_gb(free)} free. Ask for fewer tokens, try "
                "again when sessions end, or raise --spill-gb"
            ),
        )
        try:
            return SpillFile(self.directory, self, reserve)
        except BaseException:
            self.give_back(reserve)
            raise

    def take(self, n: int, error: Callable[[int], Exception]) -> None:
        """Sets n bytes aside, or raises error(bytes free)."""
        with self._lock:
            if self.held + n > self.limit:
                raise error(self.limit - self.held)
            self.held += n

    def give_back(self, n: int) -> None:
        with self._lock:
            self.held -= n


class SpillFile:
    """Append-only bytes on disk; reads from any thread (positional, no shared offset). With a
    budget, writes stay within what it grants."""

    def __init__(self, directory: Path, budget: SpillBudget | None = None, reserved: int = 0):
        self.directory, self.budget = directory, budget
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # no context manager: the file lives as long as the records that point into it
            self._file = tempfile.TemporaryFile(dir=directory, prefix="consortium-spill-")  # noqa: SIM115
        except OSError as e:
            raise SpillError(f"cannot keep committed logits in {directory}: {e.strerror or e}") from e
        self._end = 0
        self.reserved = reserved  # bytes the budget granted this file
        self._lock = threading.Lock()

    def _grow(self, n: int) -> None:
        """Room for n more bytes beyond the grant (SpillError when the budget has none)."""
        if self.budget is None or self._end + n <= self.reserved:
            return
        extra = self._end + n - self.reserved
        self.budget.take(
            extra,
            lambda free: SpillError(
                f"the coordinator's disk budget for committed logits ({_gb(self.budget.limit)}) is full: "
                f"this session has {_gb(self._end)} and needs more (raise --spill-gb)"
            ),
        )
        self.reserved += extra

    def settle(self) -> None:
        """The session ended: what it reserved and did not write goes back to the budget."""
        with self._lock:
            if self.budget is not None and self.reserved > self._end:
                self.budget.give_back(self.reserved - self._end)
                self.reserved = self._end

    def release(self) -> None:
        """The session's history is dropped: all of it goes back (the OS frees the bytes once
        the last record that points into them is gone)."""
        with self._lock:
            if self.budget is not None:
                self.budget.give_back(self.reserved)
            self.reserved, self.budget = 0, None

    def put(self, w: WireTensor) -> SpilledTensor:
        data = memoryview(w.data)
        with self._lock:
            self._grow(len(data))
            at = self._end
            done = 0
            try:
                while done < len(data):  # a regular file takes it all at once unless the disk is full
                    done += os.pwrite(self._file.fileno(), data[done:], at + done)
            except OSError as e:
                raise SpillError(
                    f"cannot keep committed logits in {self.directory}: {e.strerror or e}"
                ) from e
            self._end += len(data)
        return SpilledTensor(w.dtype, w.shape, self, at, len(data))

    def read(self, at: int, n: int) -> bytes:
        data = os.pread(self._file.fileno(), n, at)
        if len(data) != n:
            raise OSError(f"spill file: {len(data)} of {n} bytes at offset {at}")
        return data


@dataclass(frozen=True)
class SpilledTensor:
    """A WireTensor whose bytes are in a SpillFile."""

    dtype: str
    shape: tuple[int, ...]
    file: SpillFile
    offset: int
    nbytes: int

    def load(self) -> WireTensor:
        return WireTensor(self.dtype, self.shape, self.file.read(self.offset, self.nbytes))
