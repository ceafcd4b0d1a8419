"""The coordinator's node registry: registrations, heartbeats, liveness."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, replace

from consortium.core.config import LayerRange
from consortium.core.placement import Holder, choose_tiling
from consortium.errors import InvalidRequestError
from consortium.identity.keys import PUBLIC_KEY_BYTES, IdentityError
from consortium.identity.tls import check_cert
from consortium.model.model import DTYPES
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import NotFoundError, PermissionDeniedError, PreconditionError, check_address
from consortium.verification.ledger import Ledger
from consortium.verification.tolerance import class_of

MAX_NODE_ID = 64


@dataclass(frozen=True)
class Node:
    """What a node told the coordinator about itself (validated)."""

    node_id: str
    address: str
    backend: str
    device: str
    dtype: str
    packed: bool
    memory_bytes: int
    speed_gflops: float
    layers: LayerRange | None
    model_digest: str
    layers_digest: str = ""
    version: str = ""
    threads: int = 0
    local: bool = False
    public_key: bytes = b""  # Ed25519; verifies the node's receipts
    standby: bool = False  # waits for a failover: placement never gives it a range
    tls_cert: bytes = b""  # DER; the coordinator dials the node pinned to it (empty: --insecure)
    tls_binding: bytes = b""  # the node key's signature over the certificate (identity/tls.py)

    @classmethod
    def from_proto(cls, info: pb.NodeInfo, n_layers: int) -> Node:
        nid = info.node_id
        if not nid or len(nid) > MAX_NODE_ID or not nid.isprintable() or " " in nid:
            raise InvalidRequestError(
                f"bad node id {nid[:40]!r}: 1 to {MAX_NODE_ID} printable characters, no spaces"
            )
        try:
            check_address(info.address)
        except Exception as e:
            raise InvalidRequestError(f"node {nid}: {e}") from e
        if info.dtype not in DTYPES:
            raise InvalidRequestError(f"node {nid}: unknown dtype {info.dtype!r}")
        if len(info.public_key) != PUBLIC_KEY_BYTES:
            raise InvalidRequestError(
                f"node {nid}: public key of {len(info.public_key)} bytes (an Ed25519 key has {PUBLIC_KEY_BYTES})"
            )
        if info.tls_cert:
            try:
                check_cert(info.tls_cert)
            except IdentityError as e:
                raise InvalidRequestError(f"node {nid}: {e}") from None
        layers = None
        if info.HasField("layers"):
            layers = LayerRange(info.layers.start, info.layers.end)
            if not 0 <= layers.start < layers.end <= n_layers:
                raise InvalidRequestError(
                    f"node {nid}: layer range {layers} is beyond the model's {n_layers} layers "
                    f"(half-open: 0 <= start < end <= {n_layers})"
                )
        return cls(
            node_id=nid,
            address=info.address,
            backend=info.backend,
            device=info.device,
            dtype=info.dtype,
            packed=info.packed,
            memory_bytes=max(0, info.memory_bytes),
            speed_gflops=max(0.0, info.speed_gflops),
            layers=layers,
            model_digest=info.model_digest,
            layers_digest=info.layers_digest,
            version=info.version,
            threads=info.threads,
            public_key=bytes(info.public_key),
            standby=info.standby,
            tls_cert=bytes(info.tls_cert),
            tls_binding=bytes(info.tls_binding),
        )

    def to_proto(self) -> pb.NodeInfo:
        info = pb.NodeInfo(
            node_id=self.node_id,
            address=self.address,
            backend=self.backend,
            device=self.device,
            dtype=self.dtype,
            packed=self.packed,
            memory_bytes=self.memory_bytes,
            speed_gflops=self.speed_gflops,
            model_digest=self.model_digest,
            layers_digest=self.layers_digest,
            version=self.version,
            threads=self.threads,
            public_key=self.public_key,
            standby=self.standby,
            tls_cert=self.tls_cert,
            tls_binding=self.tls_binding,
        )
        if self.layers is not None:
            info.layers.CopyFrom(pb.LayerRange(start=self.layers.start, end=self.layers.end))
        return info


@dataclass
class _Entry:
    node: Node
    since: int  # order in which nodes took their current range: the earliest holder serves it
    last_seen: float = field(default_factory=time.monotonic)


class Registry:
    def __init__(
        self,
        model_digest: str,
        model_name: str,
        n_layers: int,
        node_timeout_s: float,
        ledger: Ledger | None = None,
        allow_keys: frozenset[bytes] | None = None,
        classes: frozenset[str] = frozenset({"strict"}),
    ):
        self.model_digest, self.model_name, self.n_layers = model_digest, model_name, n_layers
        self.node_timeout_s, self.ledger, self.allow_keys = node_timeout_s, ledger, allow_keys
        self.classes = classes  # the numeric classes admitted (--tolerance-classes)
        # the ledger pins an id to its first key, and bans persist across restarts
        self._banned: set[str] = set(ledger.banned_nodes()) if ledger is not None else set()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def register(self, node: Node) -> None:
        """Adds or replaces (a restarted node) a node; refuses a different model, an id claimed
        with another key, a key not admitted, and banned nodes."""
        if not node.local:
            if self.allow_keys is not None and node.public_key not in self.allow_keys:
                raise PermissionDeniedError(f"node {node.node_id}: its public key is not in the allowed keys")
            pinned = self.ledger.public_key(node.node_id) if self.ledger is not None else None
            if pinned is not None and pinned != node.public_key:
                raise PermissionDeniedError(
                    f"node id {node.node_id!r} is bound to another public key ({pinned.hex()[:16]}…)"
                )
            if self.is_banned(node.node_id):
                raise PermissionDeniedError(f"node {node.node_id} is banned (failed verification)")
            cls = class_of(node.dtype, node.packed, node.device)
            if cls not in self.classes:
                raise PreconditionError(
                    f"node {node.node_id} computes in the {cls} verification class ({node.dtype}"
                    f"{', packed' if node.packed else ''}), which this coordinator does not admit "
                    f"(--tolerance-classes {','.join(sorted(self.classes))})"
                )
        if node.model_digest != self.model_digest:
            raise PreconditionError(
                f"model digest mismatch: node {node.node_id} has sha256 {node.model_digest[:16] or '(none)'}…, "
                f"the coordinator serves {self.model_name} with sha256 {self.model_digest[:16]}…"
            )
        with self._lock:
            old = self._entries.get(node.node_id)
            if old is not None and old.node.local:
                raise PreconditionError(f"node id {node.node_id!r} is the coordinator's own")
            if old is not None and old.node.address != node.address and self._alive(old, time.monotonic()):
                raise PreconditionError(  # a live node is never swapped for another registration
                    f"node id {node.node_id!r} is registered and alive at {old.node.address}; a node "
                    f"restarted elsewhere can register once it has been silent {self.node_timeout_s:g} s"
                )
            self._entries[node.node_id] = _Entry(node, next(self._seq))

    def ban(self, node_id: str) -> None:
        with self._lock:
            self._banned.add(node_id)

    def is_banned(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._banned

    def heartbeat(self, node_id: str) -> None:
        with self._lock:
            e = self._entries.get(node_id)
            if e is None:
                raise NotFoundError(f"unknown node {node_id!r}: register first")
            now = time.monotonic()
            if not self._alive(e, now):  # back after a failure: a spare behind whoever replaced it
                e.since = next(self._seq)
            e.last_seen = now

    def mark_dead(self, node_id: str) -> None:
        """A node that failed a call counts as dead until its next heartbeat."""
        with self._lock:
            e = self._entries.get(node_id)
            if e is not None and not e.node.local:
                e.last_seen = time.monotonic() - self.node_timeout_s - 1.0

    def silent_for(self, node_id: str) -> float:
        """Seconds since the node's last heartbeat (0 for the coordinator's own, inf if unknown)."""
        with self._lock:
            e = self._entries.get(node_id)
        if e is None:
            return float("inf")
        return 0.0 if e.node.local else time.monotonic() - e.last_seen

    def set_layers(self, node_id: str, layers: LayerRange, layers_digest: str) -> Node:
        with self._lock:
            e = self._entries[node_id]
            e.node = replace(e.node, layers=layers, layers_digest=layers_digest)
            e.since = next(self._seq)
            return e.node

    def is_alive(self, node_id: str, now: float | None = None) -> bool:
        with self._lock:
            e = self._entries.get(node_id)
        return e is not None and self._alive(e, now or time.monotonic())

    def _alive(self, e: _Entry, now: float) -> bool:
        return e.node.local or now - e.last_seen <= self.node_timeout_s

    def snapshot(self) -> list[tuple[Node, bool, float]]:
        """(node, alive, seconds since last heartbeat) for every node, in registration order."""
        now = time.monotonic()
        with self._lock:
            return [(e.node, self._alive(e, now), now - e.last_seen) for e in self._entries.values()]

    def alive(self) -> list[Node]:
        """Live nodes that are not banned (a banned node gets no placement and no audits)."""
        return [n for n, ok, _ in self.snapshot() if ok and (n.local or not self.is_banned(n.node_id))]

    def serving(self) -> tuple[list[Node], list[Node]]:
        """Live holders of layer ranges split into (serving, spares). The serving nodes tile the
        model (`choose_tiling`): nodes without failed audits first, then whoever took its range
        first (e.g. the backup that replaced a failed node, not the failed node coming back);
        every other holder is a spare for failovers. With no exact tiling, the first holder of
        each distinct range serves (and placement reports the gap or overlap)."""
        with self._lock:
            order = {nid: e.since for nid, e in self._entries.items()}
        holders = sorted(
            (n for n in self.alive() if n.layers is not None),
            key=lambda n: (self._failed_audits(n), order[n.node_id]),
        )
        by_id = {n.node_id: n for n in holders}
        tiling = choose_tiling([Holder(n.node_id, n.layers) for n in holders], self.n_layers)
        if tiling is not None:
            chosen = [by_id[h.node_id] for h in tiling]
        else:
            first: dict[LayerRange, Node] = {}
            for n in holders:
                first.setdefault(n.layers, n)
            chosen = list(first.values())
        ids = {n.node_id for n in chosen}
        return chosen, [n for n in holders if n.node_id not in ids]

    def _failed_audits(self, n: Node) -> int:
        if n.local or self.ledger is None:
            return 0
        score = self.ledger.score(n.node_id)
        return score.audits_failed if score is not None else 0

    def get(self, node_id: str) -> Node:
        with self._lock:
            e = self._entries.get(node_id)
        if e is None:
            raise NotFoundError(f"unknown node {node_id!r}")
        return e.node
