"""Packed weights kept on disk between loads (the way llama.cpp maps its file).

Repacking a GGUF's blocks for a CPU kernel (bf16: PyTorch's int4 kernel, quants.py; fp32: the
strict kernel, cpu_kernel.py) is CPU work: about 20 s for an 8B on two
cores, while llama.cpp maps its file in a few seconds once it is in the page cache. The first
load of a matrix writes its packed segments under the cache folder; later loads map them
(torch.load with mmap: no copy, pages read as the kernel touches them). The folder's key is the
GGUF file's identity (path, size, mtime, inode), this PyTorch and its packed layout, so a changed
file or kernel repacks. A missing, unreadable or inconsistent entry is repacked, never trusted.
The weights' identity in receipts (layers_digest) is always hashed from the GGUF itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from consortium.core.config import EngineConfig
from consortium.model.cpu_kernel import QuantSegment
from consortium.model.gguf_file import GGUFModel
from consortium.model.quants import Int4Segment, fast_layout_ok

log = logging.getLogger(__name__)

FORMAT = 3  # bump when the stored form changes
Segment = Int4Segment | QuantSegment
# each packed form: its segment type and the dtypes its tensors must have
STORED = {
    "int4": (Int4Segment, {"weight": torch.uint8, "sz": torch.bfloat16}),
    "fp32": (QuantSegment, {"scale": torch.float32}),
}
# a smaller model packs in about a second: entries would only fill the disk (each test's too)
MIN_MODEL_BYTES = 256 << 20
FREE_MARGIN = 1 << 30  # never fill the disk: leave this much free after writing an entry


def open_model(path: str | Path, engine: EngineConfig) -> GGUFModel:
    """The GGUF a node serves, its packed forms cached on disk unless the engine says not to (a
    coordinator's audit stages pack in the audited node's form, whatever its own)."""
    gguf = GGUFModel(path)
    if engine.pack_cache and gguf.path.stat().st_size >= MIN_MODEL_BYTES:
        gguf.pack_cache = PackCache(default_root())
    return gguf


def default_root() -> Path:
    """$CONSORTIUM_CACHE_DIR/packed, else ~/.cache/consortium/packed."""
    base = os.environ.get("CONSORTIUM_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "consortium") / "packed"


@dataclass
class PackCache:
    """Entries are written by one background thread, so a first load takes no longer than
    packing (writing an 8B's 5.3 GB took as long again); `flush` waits for them."""

    root: Path
    _queue: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _writer: threading.Thread | None = field(default=None, repr=False)

    def folder(self, model: Path) -> Path:
        st = model.stat()
        ident = [FORMAT, str(model.resolve()), st.st_size, st.st_mtime_ns, st.st_ino]
        ident += [torch.__version__, fast_layout_ok()]
        return self.root / hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]

    def entry(self, model: Path, names: list[str], form: str) -> Path:
        return self.folder(model) / f"{names[0]}+{len(names)}.{form}.pt"

    def load(self, model: Path, names: list[str], rows: int, form: str = "int4") -> list[Segment] | None:
        """The packed segments (`form`: int4 or fp32) of the fused matrices `names` ([rows]
        output rows), or None."""
        path = self.entry(model, names, form)
        if not path.is_file():
            return None
        cls, dtypes = STORED[form]
        try:
            data = torch.load(path, mmap=True, weights_only=True)
            segments = [cls(**fields) for fields in data["segments"]]
            ok = data["names"] == names and sum(s.rows for s in segments) == rows
            ok = ok and all(getattr(s, k).dtype == want for s in segments for k, want in dtypes.items())
            if ok:
                return segments
            log.warning("packed cache entry %s does not match its matrices: repacking", path)
        except Exception as e:  # a torn or foreign file: repack rather than trust it
            log.warning("packed cache entry %s unreadable (%s): repacking", path, e)
        return None

    def _new_folder(self, model: Path, folder: Path) -> None:
        """A folder for this identity of the file; those of its earlier identities (the file was
        replaced or rewritten) go: they would never be read again."""
        source = str(model.resolve())
        for old in self.root.glob("*/source.json") if self.root.is_dir() else []:
            try:
                if json.loads(old.read_text()).get("path") == source:
                    shutil.rmtree(old.parent, ignore_errors=True)
            except (OSError, ValueError, AttributeError):
                continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "source.json").write_text(json.dumps({"path": source}))

    def save(self, model: Path, names: list[str], segments: list[Segment]) -> None:
        """Queue an entry; best effort: a full disk or a read-only home only means repacking next
        time (an entry torn by a kill is a stray .tmp, swept when its folder is next written)."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_all, name="pack-cache", daemon=True)
            self._writer.start()
        self._queue.put((model, names, segments))

    def flush(self) -> None:
        """Wait until every queued entry is on disk (or given up)."""
        self._queue.join()

    def _write_all(self) -> None:
        while True:
            model, names, segments = self._queue.get()
            try:
                self._write(model, names, segments)
            except Exception as e:  # never take the node down for a cache
                log.info("packed cache not written (%s)", e)
            finally:
                self._queue.task_done()

    def _write(self, model: Path, names: list[str], segments: list[Segment]) -> None:
        form = "int4" if isinstance(segments[0], Int4Segment) else "fp32"
        path = self.entry(model, names, form)
        size = sum(t.nbytes for s in segments for t in vars(s).values() if isinstance(t, torch.Tensor))
        if not path.parent.is_dir():
            self._new_folder(model, path.parent)
        for stray in path.parent.glob("*.tmp"):  # a writer killed mid-entry, an hour or more ago
            if time.time() - stray.stat().st_mtime > 3600:
                stray.unlink(missing_ok=True)
        if shutil.disk_usage(path.parent).free < size + FREE_MARGIN:
            return
        data = {
            "names": names,
            "segments": [{f.name: getattr(s, f.name) for f in fields(s)} for s in segments],
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
            os.replace(tmp, path)  # atomic: processes loading the same layers never read half
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
