"""Committed outputs kept on disk instead of in memory: a remote last stage's logits.

Audits compare the logits a last stage committed (the coordinator's re-check from position 0
included), so a running session keeps every one of them: a vocabulary of fp32 per token,
513 KB for Llama 3, 2 GB for a 4k-token session, on the coordinator. They go to an anonymous
file beside the ledger instead (unlinked from the start: the OS frees it once no record points
into it), and a record keeps dtype, shape and where its bytes are.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from consortium.errors import ConsortiumError
from consortium.transport.tensors import WireTensor


class SpillError(ConsortiumError):
    """The disk beside the ledger cannot take a committed output (full, or not writable)."""


class SpillFile:
    """Append-only bytes on disk; reads from any thread (positional, no shared offset)."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # no context manager: the file lives as long as the records that point into it
            self._file = tempfile.TemporaryFile(dir=directory, prefix="consortium-spill-")  # noqa: SIM115
        except OSError as e:
            raise SpillError(f"cannot keep committed logits in {directory}: {e.strerror or e}") from e
        self._end = 0
        self._lock = threading.Lock()

    def put(self, w: WireTensor) -> SpilledTensor:
        data = memoryview(w.data)
        with self._lock:
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
