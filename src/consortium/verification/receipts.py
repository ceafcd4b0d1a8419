"""Signed receipts (DESIGN.md §4.2): what a node says it computed, signed with its key."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from consortium.errors import ConsortiumError
from consortium.identity import NodeIdentity, node_id_for, verify_signature

DOMAIN = b"consortium.receipt.v1"


class ReceiptError(ConsortiumError):
    """A receipt that does not check out: fraud evidence when it came from a node."""


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

        return b"".join([
            DOMAIN, s(self.session_id.encode()),
            struct.pack(">qqqiii", self.step, self.start_position, self.n_positions,
                        self.stage_index, self.layer_start, self.layer_end),
            s(self.layers_digest.encode()), s(self.input_digest), s(self.output_digest),
            s(self.node_id.encode()), struct.pack(">q", self.time_unix_ms),
        ])  # fmt: skip

    def signed(self, identity: NodeIdentity) -> Receipt:
        if identity.node_id != self.node_id:
            raise ReceiptError(f"receipt names node {self.node_id}, signer is {identity.node_id}")
        return replace(self, signature=identity.sign(self.signing_bytes()))

    def check_signature(self, public_key: bytes) -> None:
        """Raise ReceiptError unless signed by the key that the receipt's node id derives from."""
        try:
            expected = node_id_for(public_key)
        except ConsortiumError as e:
            raise ReceiptError(f"receipt check: {e}") from e
        if expected != self.node_id:
            raise ReceiptError(f"receipt of node {self.node_id} checked against the key of {expected}")
        if not verify_signature(public_key, self.signature, self.signing_bytes()):
            raise ReceiptError(
                f"bad signature on receipt of node {self.node_id} (session {self.session_id}, step {self.step}, "
                f"stage {self.stage_index})"
            )


def check_chain(receipts: list[Receipt], first_input_digest: bytes) -> None:
    """Stage k's input digest must equal stage k-1's output digest (or the token digest)."""
    expected = first_input_digest
    for r in sorted(receipts, key=lambda r: r.stage_index):
        if r.input_digest != expected:
            raise ReceiptError(
                f"digest chain broken at stage {r.stage_index} (session {r.session_id}, step {r.step}): "
                f"input {r.input_digest.hex()[:16]}… does not match {expected.hex()[:16]}…"
            )
        expected = r.output_digest
