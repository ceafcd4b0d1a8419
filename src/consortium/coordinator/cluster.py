"""The cluster as the token loop and the verifier see it: nodes, their stage handles, the
pipeline, and who replaces or audits a stage.

`Cluster` is the one interface those two get (no callbacks); `NodeCluster` implements it
over the registry, the ledger and the coordinator's own stages. The choices themselves
(backup order, auditor) are pure functions in core/placement.py.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from consortium.coordinator.registry import Node, Registry
from consortium.coordinator.stages import Dialer, LocalStage, RemoteStage, StageHandle
from consortium.core.config import CoordinatorConfig, EngineConfig, LayerRange
from consortium.core.placement import (
    COORDINATOR,
    STANDBY,
    Candidate,
    Capacity,
    Holder,
    PlacementError,
    backup_plan,
    check_tiling,
    choose_auditor,
    describe,
    overlaps,
    plan_flexible,
    uncovered,
)
from consortium.core.session import Session, StageRef
from consortium.errors import ConsortiumError
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import DTYPES
from consortium.transport.rpc import PreconditionError
from consortium.verification.ledger import Ledger
from consortium.worker.runner import StageRunner

log = logging.getLogger(__name__)


class NoBackupError(PreconditionError):
    """A stage's node failed and no other node can take its layers (FAILED_PRECONDITION)."""


class Cluster(Protocol):
    """What the token loop and the verifier may ask of the cluster."""

    def public_key(self, node_id: str) -> bytes: ...

    def mark_dead(self, node_id: str) -> None: ...

    def ban(self, node_id: str, reason: str) -> None: ...

    def is_banned(self, node_id: str) -> bool: ...

    def replace_stage(self, session: Session, index: int, bad_node: str) -> tuple[StageRef, StageHandle]: ...

    def auditor_for(
        self, session: Session, stage: int, exclude: set[str]
    ) -> tuple[StageHandle, Node] | None: ...


def stage_ref(index: int, n: Node) -> StageRef:
    return StageRef(index, n.node_id, n.address, n.layers, n.device, n.dtype, n.local, n.packed)


class NodeCluster:
    """Registered nodes and their handles; the coordinator's own stage and the stages it took
    over (backups) are local handles."""

    def __init__(
        self,
        cfg: CoordinatorConfig,
        engine: EngineConfig,
        gguf: GGUFModel,
        registry: Registry,
        ledger: Ledger,
    ):
        self.cfg, self.engine, self.gguf, self.registry, self.ledger = cfg, engine, gguf, registry, ledger
        self.n_layers = gguf.args.n_layers
        self.address = ""  # set once the server is bound
        self.dialer: Dialer | None = None  # set by Coordinator.start: signs orders, pins certificates
        self._handles: dict[str, StageHandle] = {}
        self._backups: dict[LayerRange, LocalStage] = {}  # ranges the coordinator took over
        self._lock = threading.Lock()  # handles and backups
        self._placement_lock = threading.Lock()

    # --- nodes -----------------------------------------------------------------------------

    def add_local(self, node: Node, runner: StageRunner) -> None:
        self.registry.register(node)
        self._handles[node.node_id] = LocalStage(node.node_id, runner, self.cfg.batch_policy)

    def add_remote(self, node: Node) -> None:
        """A (re-)registered worker: a channel to its address (kept if its address, key and
        certificate are the same)."""
        self.registry.register(node)
        with self._lock:
            old = self._handles.get(node.node_id)
            if isinstance(old, RemoteStage) and old.peer_id == (node.address, node.public_key, node.tls_cert):
                return
            if isinstance(old, RemoteStage):
                old.shutdown()
            assert self.dialer is not None, "workers register once the coordinator serves"
            self._handles[node.node_id] = RemoteStage(
                node,
                self.dialer,
                self.cfg.batch_policy,
                silent_for=lambda nid=node.node_id: self.registry.silent_for(nid),
                hang_after_s=self.cfg.hang_after_s,
            )

    def public_key(self, node_id: str) -> bytes:
        return self.registry.get(node_id).public_key

    def mark_dead(self, node_id: str) -> None:
        self.registry.mark_dead(node_id)

    def ban(self, node_id: str, reason: str) -> None:
        self.ledger.ban(node_id, reason)
        self.registry.ban(node_id)

    def is_banned(self, node_id: str) -> bool:
        return self.registry.is_banned(node_id)

    def handle(self, node_id: str) -> StageHandle:
        with self._lock:
            return self._handles[node_id]

    def handles_for(self, session: Session) -> list[StageHandle]:
        return [self._stage_handle(r) for r in session.stages]

    def _stage_handle(self, ref: StageRef) -> StageHandle:
        with self._lock:
            backup = self._backups.get(ref.layers) if ref.local else None
        if backup is not None and ref.layers != self.cfg.layers:
            return backup
        return self.handle(ref.node_id)

    def shutdown(self) -> None:
        with self._lock:
            for h in self._handles.values():
                if isinstance(h, RemoteStage):
                    h.shutdown()

    def layer_bytes(self, dtype: str, packed: bool) -> int:
        """Weight bytes of one layer in a node's compute format (placement's memory bound)."""
        names = self.gguf.layer_names(0)
        if packed:
            return int(sum(self.gguf.raw(n).nbytes for n in names) * 1.25)
        return sum(int(self.gguf.tensor(n).n_elements) for n in names) * DTYPES[dtype].itemsize

    def candidates(self, exclude_local: bool = True) -> list[Candidate]:
        """The live, admitted, non-banned workers (a snapshot for the pure choices)."""
        return [
            Candidate(
                n.node_id,
                n.layers,
                n.backend,
                n.standby,
                n.speed_gflops,
                n.memory_bytes // max(1, self.layer_bytes(n.dtype, n.packed)),
            )
            for n in self.registry.alive()
            if not (exclude_local and n.local)
        ]

    # --- the pipeline ----------------------------------------------------------------------

    def flexible(self) -> list[Node]:
        """Live workers without a range that placement may give one (standbys wait for failovers)."""
        return [n for n in self.registry.alive() if n.layers is None and not n.standby]

    def route(self) -> list[StageRef]:
        """The current pipeline; assigns ranges to live workers that have none if layers are uncovered."""
        with self._placement_lock:
            self._place_flexible()
            serving, _ = self.registry.serving()
            holders = [Holder(n.node_id, n.layers) for n in serving]
            # Ranges the coordinator took over (a failover or a ban) stay with it while no worker holds them.
            gaps = set(uncovered(holders, self.n_layers)) if not overlaps(holders) else set()
            with self._lock:
                taken = [r for r in self._backups if r in gaps]
            holders += [Holder(self.cfg.node_id, r, backup=True) for r in taken]
            try:
                order = check_tiling(holders, self.n_layers)
            except PlacementError as e:
                raise PlacementError(f"{e}{self._why_not()}") from None
            nodes = {n.node_id: n for n in serving}
            return [
                self._backup_ref(i, h.layers) if h.backup else stage_ref(i, nodes[h.node_id])
                for i, h in enumerate(order)
            ]

    def _place_flexible(self) -> None:
        serving, _ = self.registry.serving()
        flexible = self.flexible()
        fixed = [Holder(n.node_id, n.layers) for n in serving]
        gaps = uncovered(fixed, self.n_layers)
        if not gaps or not flexible or overlaps(fixed):
            return
        caps = [
            Capacity(n.node_id, n.speed_gflops, n.memory_bytes // max(1, self.layer_bytes(n.dtype, n.packed)))
            for n in flexible
        ]
        for h in plan_flexible(gaps, caps):
            log.info("placement: %s gets layers %s", h.node_id, h.layers)
            info = self.handle(h.node_id).assign(h.layers, self.gguf.digest, self.cfg.assign_timeout_s)
            self.registry.set_layers(h.node_id, h.layers, info.layers_digest)

    def _why_not(self) -> str:
        dead = [Holder(n.node_id, n.layers) for n, ok, _ in self.registry.snapshot() if not ok and n.layers]
        flexible = self.flexible()
        extra = f"; not alive: {describe(dead)}" if dead else ""
        return extra + (f"; without a range: {', '.join(n.node_id for n in flexible)}" if flexible else "")

    def _backup_ref(self, index: int, layers: LayerRange) -> StageRef:
        e = self.engine
        return StageRef(index, self.cfg.node_id, self.address, layers, e.device, e.dtype, True, e.packed)

    # --- failover and audits ---------------------------------------------------------------

    def replace_stage(self, session: Session, index: int, bad_node: str) -> tuple[StageRef, StageHandle]:
        """A node for a stage whose node failed or was caught (it counts as dead until its next
        heartbeat), tried in the order of `backup_plan`: a spare, a standby (loads the layers
        now), the coordinator (unless --no-backup)."""
        layers = session.stages[index].layers
        self.registry.mark_dead(bad_node)
        busy = {r.node_id for r in session.stages} | {bad_node}
        coordinator = self.cfg.node_id if self.cfg.backup else None
        for choice in backup_plan(layers, self.candidates(), busy, coordinator):
            if choice.kind == COORDINATOR:
                log.warning("stage %d (layers %s) moves from %s to the coordinator", index, layers, bad_node)
                return self._backup_ref(index, layers), self._local_backup(layers)
            log.warning(
                "stage %d (layers %s) moves from %s to the %s %s",
                index,
                layers,
                bad_node,
                choice.kind,
                choice.node_id,
            )
            node = self.registry.get(choice.node_id)
            if choice.kind == STANDBY:
                try:
                    info = self.handle(node.node_id).assign(
                        layers, self.gguf.digest, self.cfg.assign_timeout_s
                    )
                except ConsortiumError as e:
                    log.warning("standby %s could not take layers %s: %s", node.node_id, layers, e)
                    self.registry.mark_dead(node.node_id)
                    continue
                node = self.registry.set_layers(node.node_id, layers, info.layers_digest)
            return stage_ref(index, node), self.handle(node.node_id)
        raise NoBackupError(
            f"stage {index} (layers {layers}) lost node {bad_node} and no backup is available: no live "
            f"worker holds layers {layers}, no standby is free, and the coordinator does not take over "
            f"stages (--no-backup)"
        )

    def _local_backup(self, layers: LayerRange) -> LocalStage:
        """The coordinator's own copy of a range it takes over, loaded once."""
        with self._lock:
            handle = self._backups.get(layers)
            if handle is None:
                runner = StageRunner(
                    self.gguf, layers, self.engine, self.cfg.kv_cache_bytes, self.cfg.session_idle_timeout_s
                )
                handle = self._backups[layers] = LocalStage(self.cfg.node_id, runner, self.cfg.batch_policy)
            return handle

    def auditor_for(self, session: Session, stage: int, exclude: set[str]) -> tuple[StageHandle, Node] | None:
        """A live worker to audit a session's stage (see `choose_auditor`), never one that serves
        the session; None: the coordinator audits it itself."""
        ref = session.history[stage].stage
        exclude = exclude | {r.node_id for r in session.stages}
        chosen = choose_auditor(ref.layers, ref.device.split(":")[0], self.candidates(), exclude)
        if chosen is None:
            return None
        return self.handle(chosen), self.registry.get(chosen)
