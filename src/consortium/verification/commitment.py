"""Commitments: SHA-256 over a header and the exact bytes a stage sent (DESIGN.md §4.1).

The next stage consumes exactly the committed bytes, so an auditor's input is
bit-identical to the worker's on any hardware; the digest binds values, the tolerance
comparison (tolerance.py) judges them.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

DOMAIN = b"consortium.commitment.v1"


@dataclass(frozen=True)
class CommitHeader:
    """What the bytes are: who produced them (stage index; -1 = the token ids fed to the
    first stage), for which positions, in which dtype and shape. The consumer can rebuild
    the header of its input, so stage k's input digest is stage k-1's output digest."""

    session_id: str
    stage_index: int
    start_position: int
    n_positions: int
    dtype: str  # fp32 | fp16 | bf16 | int64
    shape: tuple[int, ...]

    def encode(self) -> bytes:
        sid = self.session_id.encode()
        dt = self.dtype.encode()
        return b"".join(
            [
                DOMAIN,
                struct.pack(">I", len(sid)),
                sid,
                struct.pack(">iqq", self.stage_index, self.start_position, self.n_positions),
                struct.pack(">I", len(dt)),
                dt,
                struct.pack(">I", len(self.shape)),
                *(struct.pack(">q", s) for s in self.shape),
            ]
        )


def digest(header: CommitHeader, data: bytes) -> bytes:
    """The 32-byte commitment to `data` under `header`."""
    h = hashlib.sha256(header.encode())
    h.update(data)
    return h.digest()


def tokens_header(session_id: str, start_position: int, n: int) -> CommitHeader:
    """Header of the token ids a first stage consumes (the root of the digest chain)."""
    return CommitHeader(session_id, -1, start_position, n, "int64", (n,))


def token_digest(session_id: str, start_position: int, ids: list[int]) -> bytes:
    data = np.asarray(ids, dtype="<i8").tobytes()
    return digest(tokens_header(session_id, start_position, len(ids)), data)


def all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf outputs are invalid work, whatever their digest."""
    return bool(torch.isfinite(t).all())


def seed_style_hash(rows: torch.Tensor) -> list[str]:
    """The original plan's rule, kept for comparison only: per row, cast to fp16, snap to a
    1/64 grid, clamp to ±100, SHA-256. Honest work on other hardware fails its equality."""
    x = rows.to(torch.float16).float()
    x = torch.clamp(torch.round(x * 64) / 64, -100, 100).to(torch.float16)
    return [hashlib.sha256(r.numpy().tobytes()).hexdigest() for r in x.reshape(x.shape[0], -1)]
