"""The coordinator's token loop and verifier in one process, for fast tests: no processes, no
gRPC, no signals.

- `InProcessNode`: a worker as the coordinator sees it (the StageHandle protocol) over a
  StageRunner that signs its receipts with its own identity, honest or misbehaving as
  `--misbehave` would build it. It fails like a dead node (UNAVAILABLE) or a hung one
  (DEADLINE_EXCEEDED) at the exact step `die-at=N` / `hang-at=N` names, dies on its n-th
  audit call, or blocks its audit calls until a test releases them.
- `InProcessCluster`: the coordinator's `Cluster` over such nodes and its own stage and
  backups, choosing backups and auditors with the pure functions NodeCluster uses.
- `InProcessCoordinator`: ledger, local auditor, verifier and token loop wired as
  `build_coordinator` wires them; `generate(...)` runs one session to the end.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
import torch

from consortium.coordinator.batching import Batcher, BatchPolicy, Done
from consortium.coordinator.cluster import NoBackupError
from consortium.coordinator.loop import TokenLoop
from consortium.coordinator.registry import Node
from consortium.coordinator.sessions import stages_record
from consortium.coordinator.stages import LocalStage, StageHandle
from consortium.coordinator.verifier import Verifier
from consortium.core.config import CoordinatorConfig, EngineConfig, LayerRange, SessionRequest
from consortium.core.placement import (
    COORDINATOR,
    Candidate,
    Holder,
    backup_plan,
    check_tiling,
    choose_auditor,
)
from consortium.core.records import FailoverRecord, RollbackRecord
from consortium.core.session import Session, StageRef
from consortium.identity import NodeIdentity
from consortium.model.generate import generate, load_single_node
from consortium.model.gguf_file import GGUFModel
from consortium.model.sampling import SamplingParams
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import RemoteError, status_for
from consortium.verification.audit import LocalAuditor
from consortium.verification.ledger import Ledger
from consortium.verification.misbehave import AUDIT_MARK, FAULTS, Misbehaviour, make_runner
from consortium.worker.runner import StageRunner

KV_CACHE_BYTES = 64 * 2**20
IDLE_TIMEOUT_S = 600.0
GATE_TIMEOUT_S = 120.0  # a blocked audit call gives up (as a hung node) if a test never releases it
ENGINE = EngineConfig()
OWN_LAYERS = LayerRange(2, 4)  # the coordinator's own stage of the tiny model (the seed topology)


@cache
def single_node_tokens(model: Path, prompt: str, max_tokens: int, sampling: SamplingParams) -> list[int]:
    """The baseline every distributed run must equal: `consortium generate` on one node."""
    _, stage, tok = load_single_node(str(model))
    return generate(stage, tok, tok.encode_prompt(prompt, chat=True), max_tokens, sampling).tokens


class InProcessNode:
    """A worker holding `layers`, called in-process. `misbehave` takes `--misbehave`'s values:
    a cheat goes to its runner; `die-at=N` / `hang-at=N` make this handle fail the decode
    order of step N (see Misbehaviour.fault_due) with UNAVAILABLE / DEADLINE_EXCEEDED, as a
    killed / stopped process does to the coordinator's call, and every later call too.
    `die_on_audit_call=n`: dies on its n-th audit call. `audit_gate`: audit calls wait for it
    (`audit_waiting` is set meanwhile). `engine`: its dtype and packing (default fp32)."""

    def __init__(
        self,
        node_id: str,
        gguf: GGUFModel,
        layers: LayerRange,
        misbehave: str | None = None,
        die_on_audit_call: int | None = None,
        audit_gate: threading.Event | None = None,
        engine: EngineConfig = ENGINE,
    ):
        m = Misbehaviour.parse(misbehave, enabled=True) if misbehave else None
        self.fault = m if m is not None and m.kind in FAULTS else None  # this handle fails, no signal
        self.identity = NodeIdentity.generate()
        self.node_id, self.layers = node_id, layers
        self.runner = make_runner(
            gguf,
            layers,
            engine,
            KV_CACHE_BYTES,
            IDLE_TIMEOUT_S,
            identity=self.identity,
            node_id=node_id,
            misbehaviour=None if self.fault else m,
        )
        self.info = Node(
            node_id=node_id,
            address=f"in-process:{node_id}",
            backend="cpu",
            device=engine.device,
            dtype=engine.dtype,
            packed=engine.packed,
            memory_bytes=2**30,
            speed_gflops=1.0,
            layers=layers,
            model_digest=gguf.digest,
            layers_digest=self.runner.layers_digest,
            public_key=self.identity.public_key,
        )
        self.die_on_audit_call, self.audit_gate = die_on_audit_call, audit_gate
        self.audit_waiting = threading.Event()
        self.audit_calls = 0
        self.failed: grpc.StatusCode | None = None
        self._lock = threading.Lock()
        # orders of the token loop go one at a time through a real Batcher, to `execute`
        self.batcher = Batcher(
            lambda orders, t: [self._answer(o, t) for o in orders], BatchPolicy(1), node_id
        )

    def _fail(self, code: grpc.StatusCode, why: str) -> None:
        with self._lock:
            self.failed = self.failed or code
        raise RemoteError(f"node {self.node_id} {why}", code)

    def _call(self, method, request):
        """The runner's answer, or its error as the worker's servicer would send it."""
        if self.failed is not None:
            self._fail(self.failed, "is down")
        try:
            return method(request)
        except Exception as e:
            raise RemoteError(f"node {self.node_id}: {e}", status_for(e)) from e

    def open(self, session_id: str, capacity: int, layers: LayerRange, timeout_s: float) -> None:
        lr = pb.LayerRange(start=layers.start, end=layers.end)
        self._call(
            self.runner.open, pb.OpenSessionRequest(session_id=session_id, capacity=capacity, layers=lr)
        )

    def submit(self, order: pb.WorkOrder, timeout_s: float, done: Done) -> None:
        self.batcher.submit(order, timeout_s, done)

    def _answer(self, order: pb.WorkOrder, timeout_s: float) -> pb.WorkResult | Exception:
        try:
            return self.execute(order, timeout_s)
        except Exception as e:
            return e

    def execute(self, order: pb.WorkOrder, timeout_s: float) -> pb.WorkResult:
        """Each order on its own, at once (an audit blocked on `audit_gate` holds up nothing else)."""
        if self.fault is not None and self.failed is None and self.fault.fault_due(order):
            dead = self.fault.kind == "die-at"
            code = grpc.StatusCode.UNAVAILABLE if dead else grpc.StatusCode.DEADLINE_EXCEEDED
            self._fail(code, f"{'died' if dead else 'hung'} at step {order.step}")
        if AUDIT_MARK in order.session_id and self.failed is None:
            self._audit_call()
        return self._call(self.runner.execute, order)

    def _audit_call(self) -> None:
        with self._lock:
            self.audit_calls += 1
            n = self.audit_calls
        if n == self.die_on_audit_call:
            self._fail(grpc.StatusCode.UNAVAILABLE, f"died on its audit call {n}")
        if self.audit_gate is not None:
            self.audit_waiting.set()
            if not self.audit_gate.wait(GATE_TIMEOUT_S):
                self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "never released")

    def close(self, session_id: str, timeout_s: float) -> None:
        self._call(self.runner.close, pb.CloseSessionRequest(session_id=session_id))

    def rollback(self, session_id: str, position: int, timeout_s: float) -> None:
        self._call(self.runner.rollback, pb.RollbackRequest(session_id=session_id, position=position))

    def assign(self, layers: LayerRange, model_digest: str, timeout_s: float) -> pb.NodeInfo:
        raise RemoteError(f"node {self.node_id} holds fixed layers", grpc.StatusCode.FAILED_PRECONDITION)


class InProcessCluster:
    """The Cluster protocol over in-process nodes; the coordinator hosts `cfg.layers` and backs
    up a lost stage (unless cfg.backup is False). No heartbeats: a node marked dead stays dead."""

    def __init__(self, cfg: CoordinatorConfig, gguf: GGUFModel, ledger: Ledger):
        self.cfg, self.gguf, self.ledger = cfg, gguf, ledger
        self.nodes: dict[str, InProcessNode] = {}
        self.dead: set[str] = set()
        self.banned: set[str] = set()
        self._backups: dict[LayerRange, LocalStage] = {}
        self._lock = threading.Lock()
        self.own = self._local(cfg.layers) if cfg.layers is not None else None

    def add(self, node: InProcessNode) -> InProcessNode:
        """A node registers (its key goes to the ledger, as Coordinator.register does)."""
        n = node.info
        self.ledger.upsert_node(n.node_id, n.public_key, n.address, n.backend, n.dtype)
        self.nodes[n.node_id] = node
        return node

    def _local(self, layers: LayerRange) -> LocalStage:
        runner = StageRunner(self.gguf, layers, ENGINE, KV_CACHE_BYTES, IDLE_TIMEOUT_S)
        return LocalStage(self.cfg.node_id, runner, self.cfg.batch_policy)

    def _local_ref(self, index: int, layers: LayerRange) -> StageRef:
        return StageRef(index, self.cfg.node_id, "", layers, ENGINE.device, ENGINE.dtype, True, ENGINE.packed)

    def _ref(self, index: int, node_id: str) -> StageRef:
        n = self.nodes[node_id].info
        return StageRef(index, n.node_id, n.address, n.layers, n.device, n.dtype, False, n.packed)

    def route(self, node_ids: list[str]) -> list[StageRef]:
        """The pipeline of these nodes, then the coordinator's own stage (checked to tile)."""
        holders = [Holder(nid, self.nodes[nid].layers) for nid in node_ids]
        if self.cfg.layers is not None:
            holders.append(Holder(self.cfg.node_id, self.cfg.layers, backup=True))
        order = check_tiling(holders, self.gguf.args.n_layers)
        return [
            self._local_ref(i, h.layers) if h.backup else self._ref(i, h.node_id) for i, h in enumerate(order)
        ]

    def handles_for(self, session: Session) -> list[StageHandle]:
        return [self.own if r.local else self.nodes[r.node_id] for r in session.stages]

    # --- the Cluster protocol ----------------------------------------------------------------

    def is_banned(self, node_id: str) -> bool:
        return node_id in self.banned

    def public_key(self, node_id: str) -> bytes:
        return self.nodes[node_id].identity.public_key

    def mark_dead(self, node_id: str) -> None:
        with self._lock:
            self.dead.add(node_id)

    def ban(self, node_id: str, reason: str) -> None:
        self.ledger.ban(node_id, reason)
        with self._lock:
            self.banned.add(node_id)

    def candidates(self) -> list[Candidate]:
        with self._lock:
            out = self.dead | self.banned
        return [
            Candidate(n.node_id, n.layers, n.info.backend)
            for n in self.nodes.values()
            if n.node_id not in out
        ]

    def replace_stage(self, session: Session, index: int, bad_node: str) -> tuple[StageRef, StageHandle]:
        """As NodeCluster: the bad node counts as dead, then `backup_plan` decides (no standbys here)."""
        layers = session.stages[index].layers
        self.mark_dead(bad_node)
        busy = {r.node_id for r in session.stages} | {bad_node}
        coordinator = self.cfg.node_id if self.cfg.backup else None
        for choice in backup_plan(layers, self.candidates(), busy, coordinator):
            if choice.kind == COORDINATOR:
                with self._lock:  # the coordinator's copy of a range it takes over, loaded once
                    if layers not in self._backups:
                        self._backups[layers] = self._local(layers)
                    return self._local_ref(index, layers), self._backups[layers]
            return self._ref(index, choice.node_id), self.nodes[choice.node_id]
        raise NoBackupError(
            f"stage {index} (layers {layers}) lost node {bad_node} and no backup is available"
        )

    def auditor_for(self, session: Session, stage: int, exclude: set[str]) -> tuple[StageHandle, Node] | None:
        ref = session.history[stage].stage
        exclude = exclude | {r.node_id for r in session.stages}
        chosen = choose_auditor(ref.layers, ref.device.split(":")[0], self.candidates(), exclude)
        return None if chosen is None else (self.nodes[chosen], self.nodes[chosen].info)


@dataclass
class Run:
    """A session run to its end (or to the expected error that ended it: `error`)."""

    session: Session
    events: list[pb.GenerateEvent]
    error: Exception | None = None

    @property
    def tokens(self) -> list[int]:
        return self.session.tokens

    @property
    def failovers(self) -> list[FailoverRecord]:
        return self.session.failovers

    @property
    def rollbacks(self) -> list[RollbackRecord]:
        return self.session.rollbacks

    @property
    def kinds(self) -> list[str]:
        return [e.WhichOneof("event") for e in self.events]

    @property
    def summary(self) -> pb.SessionSummary:
        assert self.kinds[-1] == "done", self.kinds
        return self.events[-1].done


class InProcessCoordinator:
    """The coordinator's parts as build_coordinator wires them, over an InProcessCluster. It
    hosts `layers` itself (the seed topology: the last layers and the head)."""

    def __init__(
        self,
        model: Path,
        ledger: Path,
        layers: LayerRange | None = OWN_LAYERS,
        audit_workers: int = 4,
        **cfg,
    ):
        cfg.setdefault("audit_wait_timeout_s", 120.0)
        self.cfg = CoordinatorConfig(model=model, layers=layers, ledger=ledger, **cfg)
        self.gguf = GGUFModel(model)
        self.ledger = Ledger(ledger)
        self.cluster = InProcessCluster(self.cfg, self.gguf, self.ledger)
        auditor = LocalAuditor(self.gguf, "cpu", budget=self.cfg.audit_memory_bytes)
        auditor.node_id = self.cfg.node_id
        self.verifier = Verifier(
            self.gguf,
            self.ledger,
            auditor,
            self.cluster,
            self.cfg.audit_seed,
            self.cfg.audit_recheck_probability,
            audit_workers,
        )
        self.tokenizer = GGUFTokenizer(self.gguf)
        self.loop = TokenLoop(
            self.cfg, self.gguf.args, self.tokenizer, self.verifier, self.ledger, self.cluster
        )
        self._ids = itertools.count()

    def add_node(self, node_id: str, layers: LayerRange, **kw) -> InProcessNode:
        """A worker holding `layers` joins; `kw` are InProcessNode's (misbehave,
        die_on_audit_call, audit_gate, engine)."""
        return self.cluster.add(InProcessNode(node_id, self.gguf, layers, **kw))

    def close(self) -> None:
        self.verifier.stop()
        self.ledger.close()

    def new_session(
        self,
        pipeline: list[str],
        prompt: str,
        max_tokens: int,
        sampling: SamplingParams,
        audit_probability: float = 0.0,
        audit_seed: int | None = None,
        wait_audits: bool = True,
        audit_coverage: str = "full",
    ) -> Session:
        """As Coordinator.new_session, over `pipeline` (node ids) and the coordinator's own stage;
        session ids are deterministic (a seed then chooses the same audited units every run)."""
        ids = self.tokenizer.encode_prompt(prompt, chat=True)
        request = SessionRequest(
            prompt,
            max_tokens,
            sampling,
            True,
            audit_probability,
            audit_seed,
            audit_coverage,
            wait_audits=wait_audits,
        )
        sid = f"session-{next(self._ids)}"
        session = Session(
            sid,
            request,
            ids,
            min(max_tokens, self.gguf.args.context_length - len(ids)),
            self.cluster.route(pipeline),
            audits=self.verifier.new_session_audits(sid, audit_probability, audit_seed, audit_coverage),
        )
        params = {"max_tokens": session.max_tokens, "audit_probability": audit_probability}
        self.ledger.create_session(sid, ids, params, stages_record(session))
        return session

    def events(self, session: Session) -> Iterator[pb.GenerateEvent]:
        return self.loop.run(session, self.cluster.handles_for(session))

    def run(
        self,
        session: Session,
        raises: type[Exception] | None = None,
        on_event: Callable[[pb.GenerateEvent], None] | None = None,
    ) -> Run:
        """Runs the session to its end, calling `on_event` with each event as the loop yields it
        (the loop waits for it). An error of type `raises` that ends the session is kept in
        `Run.error` with the events before it; any other error propagates."""
        run = Run(session, [])
        try:
            for ev in self.events(session):
                run.events.append(ev)
                if on_event is not None:
                    on_event(ev)
        except Exception as e:
            if raises is None or not isinstance(e, raises):
                raise
            run.error = e
        return run

    def generate(
        self,
        pipeline: list[str],
        prompt: str,
        max_tokens: int,
        sampling: SamplingParams,
        raises: type[Exception] | None = None,
        on_event: Callable[[pb.GenerateEvent], None] | None = None,
        **kw,
    ) -> Run:
        """A session over `pipeline` (new_session's keywords) run to its end (see run)."""
        session = self.new_session(pipeline, prompt, max_tokens, sampling, **kw)
        return self.run(session, raises, on_event)


def coordinators(model: Path, tmp_path: Path) -> Iterator[Callable[..., InProcessCoordinator]]:
    """A fixture's body: makes coordinators of `model` (InProcessCoordinator's keywords), each
    with its own ledger under tmp_path, and stops them at teardown. Torch runs one intra-op
    thread meanwhile: the tiny model's matrices gain nothing from more, and on a busy machine
    a team of spinning OpenMP threads makes each step ~10x slower (results do not depend on it)."""
    made: list[InProcessCoordinator] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(**kw) -> InProcessCoordinator:
        made.append(InProcessCoordinator(model, tmp_path / f"ledger-{len(made)}.db", **kw))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            c.close()
        torch.set_num_threads(threads)
