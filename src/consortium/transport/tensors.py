"""Tensors on the wire: the one place that converts and validates them.

A tensor travels as raw little-endian bytes with a dtype from a short whitelist and a
shape; `len(data) == prod(shape) * itemsize` always. Activations go in the sender's
compute dtype, so the receiver gets bit-identical values (distributed == single-node)
and the coordinator can keep the exact bytes each stage consumed and produced.
Everything arriving from a peer passes through `from_proto` and one of the `decode_*`
checks before it touches a model.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from consortium.errors import InvalidRequestError
from consortium.transport.proto import consortium_pb2 as pb

# dtype name <-> proto enum <-> torch dtype. Nothing else may travel.
WIRE_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "fp32": (pb.DTYPE_FP32, torch.float32),
    "fp16": (pb.DTYPE_FP16, torch.float16),
    "bf16": (pb.DTYPE_BF16, torch.bfloat16),
    "int64": (pb.DTYPE_INT64, torch.int64),
}
FLOAT_DTYPES = frozenset({"fp32", "fp16", "bf16"})
_BY_ENUM = {enum: name for name, (enum, _) in WIRE_DTYPES.items()}
_BY_TORCH = {tdt: name for name, (_, tdt) in WIRE_DTYPES.items()}
ITEMSIZE = {name: torch.empty((), dtype=tdt).element_size() for name, (_, tdt) in WIRE_DTYPES.items()}

# Default gRPC message bound on both ends (client and server). A prefill of S tokens
# sends S * dim * itemsize bytes: 128 MiB covers 8k tokens of a 4096-wide fp32 model.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 2**20
MAX_RANK = 2


class TensorError(InvalidRequestError):
    """A tensor on the wire is malformed or does not fit the model (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class WireTensor:
    """The exact bytes of a tensor as sent or received, with dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_torch(cls, t: Tensor) -> WireTensor:
        name = _BY_TORCH.get(t.dtype)
        if name is None:
            raise TensorError(f"dtype {t.dtype} cannot travel (allowed: {', '.join(WIRE_DTYPES)})")
        if t.device.type != "cpu":
            t = t.cpu()
        if t.requires_grad:
            t = t.detach()
        t = t.contiguous()  # no-op (no copy) when it already is
        if t.dim() and t.numel():  # the last dimension reinterpreted as bytes: no reshape, one copy
            return cls(name, tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        return cls(name, tuple(t.shape), flat.numpy().tobytes())

    @classmethod
    def from_tokens(cls, ids: list[int]) -> WireTensor:
        """int64 [S], little-endian as a CPU tensor's bytes (packed here: no tensor to make)."""
        return cls("int64", (len(ids),), struct.pack(f"<{len(ids)}q", *ids))

    @classmethod
    def from_proto(cls, msg: pb.Tensor) -> WireTensor:
        """Checks dtype whitelist, shape and byte length; raises TensorError."""
        name = _BY_ENUM.get(msg.dtype)
        if name is None:
            raise TensorError(f"unsupported tensor dtype {msg.dtype} (allowed: {', '.join(WIRE_DTYPES)})")
        shape = tuple(int(s) for s in msg.shape)
        if not 1 <= len(shape) <= MAX_RANK:
            raise TensorError(f"tensor of rank {len(shape)}; expected 1 to {MAX_RANK} dimensions")
        if any(s < 0 for s in shape):
            raise TensorError(f"negative dimension in tensor shape {list(shape)}")
        expected = math.prod(shape) * ITEMSIZE[name]
        data = msg.data  # each access copies out of the message: read it once
        if len(data) != expected:
            raise TensorError(
                f"tensor data has {len(data)} bytes; shape {list(shape)} of {name} needs {expected}"
            )
        return cls(name, shape, data)

    def to_proto(self) -> pb.Tensor:
        return pb.Tensor(dtype=WIRE_DTYPES[self.dtype][0], shape=self.shape, data=self.data)

    def to_torch(self) -> Tensor:
        tdt = WIRE_DTYPES[self.dtype][1]
        if not self.data:
            return torch.empty(self.shape, dtype=tdt)
        # bytearray: a private writable copy, so the tensor never aliases the message buffer
        return torch.frombuffer(bytearray(self.data), dtype=tdt).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def rows(self) -> int:
        return self.shape[0]

    def digest(self) -> bytes:
        """SHA-256 over dtype, shape and bytes (what a receipt will commit to)."""
        h = hashlib.sha256(f"{self.dtype}:{list(self.shape)}:".encode())
        h.update(self.data)
        return h.digest()


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf. A finite fp32 sum proves it (any NaN or Inf makes the sum NaN or Inf)
    at a tenth of the cost of an elementwise check, which only runs when the sum overflows."""
    if math.isfinite(t.sum(dtype=torch.float32).item()):
        return True
    return bool(torch.isfinite(t).all())


def _check_rows(w: WireTensor, what: str, max_rows: int | None) -> None:
    if w.rows < 1:
        raise TensorError(f"{what} has no positions (shape {list(w.shape)})")
    if max_rows is not None and w.rows > max_rows:
        raise TensorError(f"{what} has {w.rows} positions; at most {max_rows} fit")


def decode_tokens(msg: pb.Tensor, vocab_size: int, max_rows: int | None = None) -> tuple[WireTensor, Tensor]:
    """Token ids for a first stage: int64 [S], each in [0, vocab_size)."""
    w = WireTensor.from_proto(msg)
    if w.dtype != "int64" or len(w.shape) != 1:
        raise TensorError(f"the first stage takes token ids as int64 [S]; got {w.dtype} {list(w.shape)}")
    _check_rows(w, "token input", max_rows)
    t = w.to_torch()
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        raise TensorError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size})")
    return w, t


def decode_hidden(msg: pb.Tensor, dim: int, max_rows: int | None = None) -> tuple[WireTensor, Tensor]:
    """Hidden states between stages: float [S, dim] with the model's hidden size, all finite."""
    w = WireTensor.from_proto(msg)
    _check_hidden_shape(w, dim, max_rows)  # before any copy of the data
    return w, _finite(w.to_torch(), "hidden states")


def check_hidden(t: Tensor, dim: int) -> WireTensor:
    """Hidden states as a stage computed them, checked as decode_hidden checks them and put on
    the wire for the next stage."""
    w = WireTensor.from_torch(t)
    _check_hidden_shape(w, dim, None)
    _finite(t, "hidden states")
    return w


def _check_hidden_shape(w: WireTensor, dim: int, max_rows: int | None) -> None:
    if w.dtype not in FLOAT_DTYPES or len(w.shape) != 2:
        raise TensorError(f"hidden states must be a float [S, {dim}] tensor; got {w.dtype} {list(w.shape)}")
    if w.shape[1] != dim:
        raise TensorError(f"hidden size {w.shape[1]} does not match the model's {dim}")
    _check_rows(w, "hidden states", max_rows)


def _finite(t: Tensor, what: str) -> Tensor:
    if not all_finite(t):
        raise TensorError(f"{what} contain NaN or Inf")
    return t


def decode_logits(msg: pb.Tensor, vocab_size: int, rows: int) -> tuple[WireTensor, Tensor]:
    """Logits from a last stage: fp32 [rows, vocab], all finite."""
    w = WireTensor.from_proto(msg)
    if w.dtype != "fp32" or w.shape != (rows, vocab_size):
        raise TensorError(f"expected fp32 logits [{rows}, {vocab_size}]; got {w.dtype} {list(w.shape)}")
    return w, check_logits(w.to_torch(), vocab_size, rows)


def check_logits(t: Tensor, vocab_size: int, rows: int) -> Tensor:
    """Logits as a last stage computed them (no wire in between): fp32 [rows, vocab], all finite."""
    if t.dtype != torch.float32 or tuple(t.shape) != (rows, vocab_size):
        raise TensorError(f"expected fp32 logits [{rows}, {vocab_size}]; got {t.dtype} {list(t.shape)}")
    return _finite(t, "logits")


def grpc_message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options bounding message size in both directions (set on both ends)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
