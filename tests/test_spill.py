"""The spill file (core/spill.py): a remote last stage's logits on disk, read back exactly,
from any thread, in a file no directory shows."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

from consortium.core.spill import SpillBudget, SpillError, SpillFile, SpillFullError
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


def test_the_budget_refuses_a_session_it_cannot_hold_and_gets_back_what_ends(tmp_path):
    """Sessions reserve their worst case when they start; a finished one gives back what it did
    not write, and the rest when its history goes."""
    row = WireTensor.from_torch(torch.zeros(1, 16))  # 64 bytes
    budget = SpillBudget(tmp_path, limit=10 * row.nbytes)
    a = budget.open(6 * row.nbytes)
    with pytest.raises(SpillFullError, match=r"cannot hold this session's .* free.*--spill-gb"):
        budget.open(5 * row.nbytes)
    assert budget.held == 6 * row.nbytes  # the refusal held nothing
    b = budget.open(4 * row.nbytes)
    for _ in range(2):
        a.put(row)
    a.settle()  # a ended after 2 of its 6 rows
    assert (a.reserved, budget.held) == (2 * row.nbytes, 6 * row.nbytes)
    c = budget.open(4 * row.nbytes)  # the 4 rows a did not use
    a.release()  # a's history dropped
    assert budget.held == 8 * row.nbytes and a.budget is None
    a.release()  # twice is harmless
    assert budget.held == 8 * row.nbytes
    for f in (b, c):
        f.release()
    assert budget.held == 0


def test_a_file_outgrowing_its_grant_grows_while_the_budget_has_room(tmp_path):
    """A rollback redoes steps: the session writes more rows than it reserved."""
    row = WireTensor.from_torch(torch.zeros(1, 16))
    budget = SpillBudget(tmp_path, limit=3 * row.nbytes)
    f = budget.open(row.nbytes)
    spilled = [f.put(row) for _ in range(3)]
    assert f.reserved == budget.held == 3 * row.nbytes
    with pytest.raises(SpillError, match="disk budget for committed logits .* is full"):
        f.put(row)
    assert budget.held == 3 * row.nbytes and all(s.load() == row for s in spilled)


def test_the_default_budget_is_the_free_disk_less_a_margin(tmp_path):
    import shutil

    from consortium.core.spill import DISK_MARGIN

    free = shutil.disk_usage(tmp_path).free
    assert abs(SpillBudget(tmp_path).limit - (free - DISK_MARGIN)) < 2**28  # (others write meanwhile)
