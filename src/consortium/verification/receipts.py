"""Signed receipts (DESIGN.md §4.2): what a node says it computed, signed with its key."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, replace

from consortium.errors import ConsortiumError
from consortium.identity import NodeIdentity, verify_signature
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import WireTensor
from consortium.verification.commitment import CommitHeader, digest

DOMAIN = b"consortium.receipt.v1"


class ReceiptError(ConsortiumError):
    """A validly signed receipt that does not check out: fraud evidence against its signer."""


class UnsignedError(ReceiptError):
    """No receipt, or one whose signature does not verify: nothing binds it to the node's key,
    so it is no evidence against the node (DESIGN.md §7): the stage fails over instead."""


@dataclass(frozen=True)
class Receipt:
    session_id: str
    step: int
    start_position: int
    n_positions: int
    stage_index: int
    layer_start: int
    layer_end: int
    layers_digest: str  # hex SHA-256 of the stored bytes of the layers used
    input_digest: bytes
    output_digest: bytes
    node_id: str
    time_unix_ms: int
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        """Unambiguous encoding of every field but the signature (length-prefixed strings)."""

        def s(b: bytes) -> bytes:
            return struct.pack(">I", len(b)) + b

        return b"".join(
            [
                DOMAIN,
                s(self.session_id.encode()),
                struct.pack(
                    ">qqqiii",
                    self.step,
                    self.start_position,
                    self.n_positions,
                    self.stage_index,
                    self.layer_start,
                    self.layer_end,
                ),
                s(self.layers_digest.encode()),
                s(self.input_digest),
                s(self.output_digest),
                s(self.node_id.encode()),
                struct.pack(">q", self.time_unix_ms),
            ]
        )

    def signed(self, identity: NodeIdentity) -> Receipt:
        return replace(self, signature=identity.sign(self.signing_bytes()))

    def check_signature(self, public_key: bytes) -> None:
        """Raise ReceiptError unless signed with `public_key` (the key the node's id is pinned to
        at registration; the ledger keeps that binding)."""
        if not verify_signature(public_key, self.signature, self.signing_bytes()):
            raise UnsignedError(
                f"bad signature on receipt of node {self.node_id} (session {self.session_id}, step {self.step}, "
                f"stage {self.stage_index})"
            )


def check_chain(receipts: list[Receipt], first_input_digest: bytes) -> None:
    """Stage k's input digest must equal stage k-1's output digest (or the token digest). Only
    remote stages sign receipts: where the coordinator ran a stage itself (its own layers, or a
    stage it took over), the link across it is its own work and is not in the ledger."""
    expected, prev = first_input_digest, -1
    for r in sorted(receipts, key=lambda r: r.stage_index):
        if r.stage_index == prev + 1 and r.input_digest != expected:
            raise ReceiptError(
                f"digest chain broken at stage {r.stage_index} (session {r.session_id}, step {r.step}): "
                f"input {r.input_digest.hex()[:16]}… does not match {expected.hex()[:16]}…"
            )
        expected, prev = r.output_digest, r.stage_index


# --- on the wire ---------------------------------------------------------------------------


def output_header(session_id: str, stage_index: int, start_position: int, w: WireTensor) -> CommitHeader:
    return CommitHeader(session_id, stage_index, start_position, w.rows, w.dtype, tuple(w.shape))


def input_digest(session_id: str, stage_index: int, start_position: int, w: WireTensor) -> bytes:
    """Digest of a stage's input as its producer committed it (stage -1: the token ids)."""
    return digest(output_header(session_id, stage_index - 1, start_position, w), w.data)


def output_digest(session_id: str, stage_index: int, start_position: int, w: WireTensor) -> bytes:
    return digest(output_header(session_id, stage_index, start_position, w), w.data)


def make_receipt(
    identity: NodeIdentity,
    node_id: str,
    order: pb.WorkOrder,
    layers_digest: str,
    inp: WireTensor,
    out: WireTensor,
) -> Receipt:
    """What a worker signs for one work order it executed."""
    return Receipt(
        session_id=order.session_id,
        step=order.step,
        start_position=order.start_position,
        n_positions=inp.rows,
        stage_index=order.stage_index,
        layer_start=order.layers.start,
        layer_end=order.layers.end,
        layers_digest=layers_digest,
        input_digest=input_digest(order.session_id, order.stage_index, order.start_position, inp),
        output_digest=output_digest(order.session_id, order.stage_index, order.start_position, out),
        node_id=node_id,
        time_unix_ms=int(time.time() * 1000),
    ).signed(identity)


def to_proto(r: Receipt) -> pb.Receipt:
    return pb.Receipt(
        session_id=r.session_id,
        step=r.step,
        start_position=r.start_position,
        n_positions=r.n_positions,
        stage_index=r.stage_index,
        layers=pb.LayerRange(start=r.layer_start, end=r.layer_end),
        layers_digest=r.layers_digest,
        input_digest=r.input_digest,
        output_digest=r.output_digest,
        node_id=r.node_id,
        time_unix_ms=r.time_unix_ms,
        signature=r.signature,
    )


def from_proto(m: pb.Receipt) -> Receipt:
    return Receipt(
        m.session_id,
        m.step,
        m.start_position,
        m.n_positions,
        m.stage_index,
        m.layers.start,
        m.layers.end,
        m.layers_digest,
        bytes(m.input_digest),
        bytes(m.output_digest),
        m.node_id,
        m.time_unix_ms,
        bytes(m.signature),
    )


def check_work_receipt(
    msg: pb.Receipt,
    order: pb.WorkOrder,
    public_key: bytes,
    expected_layers_digest: str,
    expected_input_digest: bytes,
    out: WireTensor,
) -> Receipt:
    """The coordinator's check before it uses a result: signature by the node's registered
    key, the receipt describes this very order, the layers are the model's, the input is
    what was sent (the digest chain), and the output digest commits to the bytes received.
    Raises UnsignedError when the receipt is missing or its signature fails (no evidence), and
    ReceiptError (fraud evidence: the node signed it) on any other mismatch."""
    if not msg.ByteSize():
        raise UnsignedError(f"no receipt for step {order.step} of stage {order.stage_index}")
    r = from_proto(msg)
    r.check_signature(public_key)
    want = (
        order.session_id,
        order.step,
        order.start_position,
        order.stage_index,
        order.layers.start,
        order.layers.end,
    )
    got = (r.session_id, r.step, r.start_position, r.stage_index, r.layer_start, r.layer_end)
    if got != want:
        raise ReceiptError(f"receipt describes {got}, not the work order {want} (replayed or forged)")
    if r.layers_digest != expected_layers_digest:
        raise ReceiptError(f"receipt names layer weights {r.layers_digest[:16]}…, not the model's")
    if r.input_digest != expected_input_digest:
        raise ReceiptError("receipt's input digest is not the digest of the input sent (chain broken)")
    if r.output_digest != output_digest(order.session_id, order.stage_index, order.start_position, out):
        raise ReceiptError("receipt's output digest does not commit to the output received")
    return r
