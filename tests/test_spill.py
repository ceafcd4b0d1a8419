"""The spill file (core/spill.py): a remote last stage's logits on disk, read back exactly,
from any thread, in a file no directory shows."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

from consortium.core.spill import SpillError, SpillFile
from consortium.transport.tensors import WireTensor


def test_spilled_tensors_read_back_byte_for_byte_from_any_thread(tmp_path):
    spill = SpillFile(tmp_path / "d")
    g = torch.Generator().manual_seed(0)
    tensors = [WireTensor.from_torch(torch.randn(1 + i % 3, 7 + i, generator=g)) for i in range(40)]
    spilled = [spill.put(w) for w in tensors]
    assert list((tmp_path / "d").iterdir()) == []  # anonymous: gone with its last reference
    assert [s.offset for s in spilled] == [sum(w.nbytes for w in tensors[:i]) for i in range(len(tensors))]
    assert all(s.load() == w for s, w in zip(spilled, tensors, strict=True))
    got: list[bool] = []
    readers = [
        threading.Thread(
            target=lambda: got.extend(s.load() == w for s, w in zip(spilled, tensors, strict=True))
        )
        for _ in range(4)
    ]
    for t in readers:
        t.start()
    more = [spill.put(w) for w in tensors]  # appends while others read
    for t in readers:
        t.join()
    assert got == [True] * (4 * len(tensors))
    assert [m.load() for m in more] == tensors


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    spill = SpillFile(tmp_path)
    w = WireTensor.from_torch(torch.ones(1, 8))
    kept = spill.put(w)

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(SpillError, match=f"cannot keep committed logits in {tmp_path}: No space left"):
        spill.put(w)
    assert kept.load() == w  # what was kept stays readable
    (tmp_path / "file").write_text("")
    with pytest.raises(SpillError, match="cannot keep committed logits in"):
        SpillFile(tmp_path / "file" / "sub")  # not a directory
