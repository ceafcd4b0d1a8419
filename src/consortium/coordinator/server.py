"""The coordinator process: node registry, placement, sessions and the token loop, over gRPC.

It may host a stage itself (the seed topology: the last layers and the head), which it
drives in-process through the same StageRunner a worker uses.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import grpc

import consortium
from consortium.coordinator.loop import TokenLoop, stage_stats
from consortium.coordinator.pump import pumped
from consortium.coordinator.registry import Node, Registry
from consortium.coordinator.stages import LocalStage, RemoteStage, StageHandle
from consortium.coordinator.verifier import RemoteTarget, Verifier, audit_session_id
from consortium.core.config import CoordinatorConfig, LayerRange, SessionRequest, check_probability
from consortium.core.placement import (
    Capacity,
    Holder,
    PlacementError,
    check_tiling,
    describe,
    overlaps,
    plan_flexible,
    uncovered,
)
from consortium.core.session import RESUMABLE, RUNNING, Session, SessionNotFoundError, StageRef
from consortium.errors import CacheError, ConsortiumError, InvalidRequestError
from consortium.model.generate import check_request
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import DTYPES, resolve_device
from consortium.model.sampling import SamplingParams
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import PreconditionError, abort_for, bind, make_server
from consortium.verification.audit import LocalAuditor
from consortium.verification.ledger import Ledger
from consortium.verification.receipts import check_work_receipt, input_digest
from consortium.worker.runner import StageRunner, set_threads

log = logging.getLogger(__name__)
BACKUP_PREFIX = "\x00backup:"  # placement holder of a range the coordinator took over (never a node id)


class NoBackupError(PreconditionError):
    """A stage's node failed and no other node can take its layers (FAILED_PRECONDITION)."""


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig):
        self.cfg = cfg
        self.runner: StageRunner | None = None
        self._handles: dict[str, StageHandle] = {}
        self._handles_lock = threading.Lock()
        self._placement_lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._stop = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        set_threads(cfg.engine.threads)
        self.device = resolve_device(cfg.engine.device)
        engine = self.engine = type(cfg.engine)(
            self.device, cfg.engine.dtype, cfg.engine.packed, cfg.engine.threads
        )
        self.gguf = GGUFModel(cfg.model)
        self.args = self.gguf.args
        if cfg.layers is not None:
            cfg.layers.check(self.args.n_layers)
        self.tokenizer = GGUFTokenizer(self.gguf)
        self.digest = self.gguf.digest
        self.ledger = Ledger(cfg.ledger or Path(tempfile.mkdtemp(prefix="consortium-")) / "ledger.db")
        log.info("ledger: %s", self.ledger.path)
        for sid in self.ledger.interrupt_running():
            log.warning("session %s was cut off by the coordinator's stop: interrupted (`consortium session "
                        "resume --session-id %s` continues it)", sid, sid)  # fmt: skip
        self.auditor = LocalAuditor(self.gguf, resolve_device(cfg.audit_device), "fp32")
        self.auditor.node_id = cfg.node_id
        self.verifier = Verifier(self.gguf, self.ledger, self.auditor, cfg.audit_seed, self.remote_auditor,
                                 on_lost=lambda n: self.registry.mark_dead(n),
                                 recheck_probability=cfg.audit_recheck_probability)  # fmt: skip
        self.registry = Registry(
            self.digest, self.gguf.path.name, self.args.n_layers, cfg.node_timeout_s,
            pinned_key=self.ledger.public_key, is_banned=lambda n: n in self.verifier.banned,
            allow_keys=cfg.allow_keys,
        )  # fmt: skip
        self._backups: dict[tuple[int, int], LocalStage] = {}
        self.loop = TokenLoop(cfg, self.args, self.tokenizer, self.verifier, self.ledger,
                              lambda n: self.registry.get(n).public_key, self.replace_stage)  # fmt: skip
        self._server = make_server(max(32, cfg.max_sessions + 16), cfg.max_message_bytes)
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self), self._server)
        self.port = bind(self._server, cfg.host, cfg.port)
        self.address = f"{cfg.host}:{self.port}"
        if cfg.layers is not None:
            t0 = time.perf_counter()
            self.runner = StageRunner(
                self.gguf, cfg.layers, engine, cfg.kv_cache_bytes, cfg.session_idle_timeout_s
            )
            log.info("loaded layers %s (%s, %s) in %.1f s", cfg.layers, self.device, cfg.engine.dtype,
                     time.perf_counter() - t0)  # fmt: skip
            local = Node(
                node_id=cfg.node_id, address=self.address, backend=self.device.split(":")[0], device=self.device,
                dtype=cfg.engine.dtype, packed=cfg.engine.packed, memory_bytes=0, speed_gflops=0.0,
                layers=cfg.layers, model_digest=self.digest, layers_digest=self.runner.layers_digest,
                version=consortium.__version__, local=True,
            )  # fmt: skip
            self.registry.register(local)
            self._handles[cfg.node_id] = LocalStage(cfg.node_id, self.runner)
        self._server.start()
        threading.Thread(target=self._expiry_loop, name="kv-expiry", daemon=True).start()
        log.info("coordinator serving on %s, model %s (sha256 %s)", self.address, self.gguf.path, self.digest)

    def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        if hasattr(self, "verifier"):
            self.verifier.stop()
        for s in list(self._sessions.values()):
            s.cancel.set()
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
        with self._handles_lock:
            for h in self._handles.values():
                if isinstance(h, RemoteStage):
                    h.shutdown()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def _expiry_loop(self) -> None:
        period = max(0.5, min(30.0, self.cfg.session_idle_timeout_s / 4))
        while not self._stop.wait(period):
            if self.runner is not None:
                self.runner.expire()

    # --- nodes -------------------------------------------------------------------------

    def register(self, info: pb.NodeInfo) -> pb.RegisterResponse:
        node = Node.from_proto(info, self.args.n_layers)
        self.registry.register(node)
        self.ledger.upsert_node(node.node_id, node.public_key, node.address, node.backend, node.dtype)
        with self._handles_lock:
            old = self._handles.get(node.node_id)
            if not isinstance(old, RemoteStage) or old.address != node.address:
                if isinstance(old, RemoteStage):
                    old.shutdown()
                self._handles[node.node_id] = RemoteStage(
                    node.node_id, node.address, self.cfg.max_message_bytes,
                    silent_for=lambda nid=node.node_id: self.registry.silent_for(nid),
                    hang_after_s=self.cfg.hang_after_s,
                )  # fmt: skip
        log.info("node %s registered from %s: layers %s, %s %s, %.1f GFLOP/s, %.1f GiB", node.node_id,
                 node.address, node.layers or "unassigned", node.device, node.dtype, node.speed_gflops,
                 node.memory_bytes / 2**30)  # fmt: skip
        return pb.RegisterResponse(
            node_id=node.node_id,
            heartbeat_interval_s=self.cfg.heartbeat_interval_s,
            n_layers=self.args.n_layers,
        )

    def _layer_bytes(self, dtype: str, packed: bool) -> int:
        """Weight bytes of one layer in a node's compute format (placement's memory bound)."""
        names = self.gguf.layer_names(0)
        if packed:
            return int(sum(self.gguf.raw(n).nbytes for n in names) * 1.25)
        itemsize = DTYPES[dtype].itemsize
        return sum(int(self.gguf.tensor(n).n_elements) for n in names) * itemsize

    def route(self) -> list[StageRef]:
        """The current pipeline; assigns ranges to live workers that have none if layers are uncovered."""
        with self._placement_lock:
            serving, _ = self.registry.serving()
            flexible = self._flexible()
            fixed = [Holder(n.node_id, n.layers) for n in serving]
            gaps = uncovered(fixed, self.args.n_layers)
            if gaps and flexible and not overlaps(fixed):
                caps = [
                    Capacity(
                        n.node_id,
                        n.speed_gflops,
                        n.memory_bytes // max(1, self._layer_bytes(n.dtype, n.packed)),
                    )
                    for n in flexible
                ]
                for h in plan_flexible(gaps, caps):
                    log.info("placement: %s gets layers %s", h.node_id, h.layers)
                    info = self._handle(h.node_id).assign(h.layers, self.digest, self.cfg.assign_timeout_s)
                    self.registry.set_layers(h.node_id, h.layers, info.layers_digest)
                serving, _ = self.registry.serving()
            holders = [Holder(n.node_id, n.layers) for n in serving]
            # Ranges the coordinator took over (a failover or a ban) stay with it while no worker holds them.
            gaps = set(uncovered(holders, self.args.n_layers)) if not overlaps(holders) else set()
            backups = {r for r in self._backups if LayerRange(*r) in gaps}
            holders += [Holder(BACKUP_PREFIX + f"{a}-{b}", LayerRange(a, b)) for a, b in backups]
            try:
                order = check_tiling(holders, self.args.n_layers)
            except PlacementError as e:
                dead = [
                    Holder(n.node_id, n.layers)
                    for n, ok, _ in self.registry.snapshot()
                    if not ok and n.layers
                ]
                extra = f"; not alive: {describe(dead)}" if dead else ""
                extra += f"; without a range: {', '.join(n.node_id for n in flexible)}" if flexible else ""
                raise PlacementError(f"{e}{extra}") from None
            nodes = {n.node_id: n for n in serving}
            return [
                self._backup_ref(i, h.layers) if h.node_id.startswith(BACKUP_PREFIX) else StageRef(
                    i, h.node_id, nodes[h.node_id].address, h.layers, nodes[h.node_id].device,
                    nodes[h.node_id].dtype, nodes[h.node_id].local,
                )
                for i, h in enumerate(order)
            ]  # fmt: skip

    def _flexible(self) -> list[Node]:
        """Live workers without a range that placement may give one (standbys wait for failovers)."""
        return [n for n in self.registry.alive() if n.layers is None and not n.standby]

    def _backup_ref(self, index: int, layers: LayerRange) -> StageRef:
        return StageRef(
            index, self.cfg.node_id, self.address, layers, self.device, self.cfg.engine.dtype, True
        )

    def _handle(self, node_id: str) -> StageHandle:
        with self._handles_lock:
            return self._handles[node_id]

    def status(self) -> pb.ClusterStatus:
        st = pb.ClusterStatus(model_digest=self.digest, n_layers=self.args.n_layers)
        serving, spares = self.registry.serving()
        roles = {n.node_id: "serving" for n in serving} | {n.node_id: "spare" for n in spares}
        for node, alive, age in self.registry.snapshot():
            if node.node_id in self.verifier.banned and not node.local:
                role = "banned"
            elif not alive:
                role = "dead"
            else:
                role = roles.get(node.node_id, "standby" if node.standby else "unassigned")
            st.nodes.append(pb.NodeStatus(node=node.to_proto(), alive=alive, heartbeat_age_s=age,
                                          local=node.local, role=role))  # fmt: skip
        holders = [Holder(n.node_id, n.layers) for n in serving]
        try:
            order = check_tiling(holders, self.args.n_layers)
            nodes = {n.node_id: n for n in serving}
            for i, h in enumerate(order):
                n = nodes[h.node_id]
                st.route.append(pb.StageInfo(
                    index=i, node_id=n.node_id, address=n.address,
                    layers=pb.LayerRange(start=h.layers.start, end=h.layers.end),
                    device=n.device, dtype=n.dtype, local=n.local,
                ))  # fmt: skip
        except PlacementError as e:
            st.placement_error = str(e)
            st.flexible_pending = bool(self._flexible()) and not overlaps(holders)
        with self._sessions_lock:
            st.active_sessions = sum(s.state == RUNNING for s in self._sessions.values())
        return st

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """Marks the node alive and names the sessions it still caches but no longer runs (its
        stage moved while it was hung or cut off, or this coordinator restarted): it drops them."""
        self.registry.heartbeat(req.node_id)
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        live = {
            s.session_id
            for s in sessions
            if s.state == RUNNING and any(r.node_id == req.node_id for r in s.stages)
        }
        for s in sessions:  # audit sessions the node runs as a remote auditor
            if s.audits is not None:
                live |= {audit_session_id(s.session_id, i) for i, t in list(s.audits.targets.items())
                         if t.node_id == req.node_id}  # fmt: skip
        return pb.HeartbeatResponse(drop_sessions=[sid for sid in req.session_ids if sid not in live])

    # --- sessions ----------------------------------------------------------------------

    def new_session(self, req: pb.GenerateRequest) -> Session:
        if not req.prompt.strip():
            raise InvalidRequestError("empty prompt")
        if req.max_tokens <= 0:
            raise InvalidRequestError(f"max-tokens must be positive, got {req.max_tokens}")
        s = req.sampling
        sampling = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p or 1.0, seed=s.seed)
        ids = self.tokenizer.encode_prompt(req.prompt, chat=not req.no_chat)
        ctx = self.args.context_length
        check_request(ids, req.max_tokens, ctx)
        stages = self.route()
        session = Session(
            session_id=uuid.uuid4().hex,
            request=SessionRequest(req.prompt, req.max_tokens, sampling, not req.no_chat),
            prompt_ids=ids,
            max_tokens=min(req.max_tokens, ctx - len(ids)),
            stages=stages,
        )
        self._check_capacity()
        probability = self.cfg.audit_probability
        if req.HasField("audit_probability"):
            probability = check_probability(req.audit_probability)
        seed = req.audit_seed if req.HasField("audit_seed") else None
        session.request = replace(session.request, audit_probability=probability, audit_seed=seed,
                                  wait_audits=not req.no_wait_audits)  # fmt: skip
        session.audits = self.verifier.new_session_audits(session.session_id, probability, seed)
        self.ledger.create_session(
            session.session_id, ids,
            {"max_tokens": session.max_tokens, "temperature": sampling.temperature, "top_k": sampling.top_k,
             "top_p": sampling.top_p, "seed": sampling.seed, "chat": not req.no_chat,
             "audit_probability": probability, "model_digest": self.digest},
            _stages_record(stages),
        )  # fmt: skip
        with self._sessions_lock:
            self._sessions[session.session_id] = session
            self._trim_sessions()
        log.info("session %s: %d prompt tokens, up to %d new, stages %s", session.session_id, len(ids),
                 session.max_tokens, ", ".join(f"{r.node_id} {r.layers}" for r in stages))  # fmt: skip
        return session

    def _check_capacity(self) -> None:
        with self._sessions_lock:
            running = sum(x.state == RUNNING for x in self._sessions.values())
        if running >= self.cfg.max_sessions:
            raise CacheError(
                f"{running} sessions running; the coordinator takes at most {self.cfg.max_sessions}"
            )

    def resume_session(self, req: pb.ResumeRequest) -> Session:
        """A session the ledger holds as interrupted (or failed, or cancelled) continues from its
        committed tokens: same id, prompt, sampling and seed, so the tokens it goes on to
        generate are those it would have generated without the stop."""
        sid = req.session_id
        with self._sessions_lock:
            live = self._sessions.get(sid)
        if live is not None and live.state == RUNNING:
            raise PreconditionError(f"session {sid} is running; nothing to resume")
        rec = self.ledger.session(sid)
        if rec is None:
            raise SessionNotFoundError(f"unknown session {sid!r} (not in the ledger {self.ledger.path})")
        params, tokens = rec["params"], rec["tokens"]
        if rec["status"] not in RESUMABLE:
            raise PreconditionError(f"session {sid} is {rec['status']}; only an interrupted, failed or cancelled "
                                    "session can be resumed")  # fmt: skip
        if params.get("model_digest", self.digest) != self.digest:
            raise PreconditionError(f"session {sid} ran on model sha256 {params['model_digest'][:16]}…, this "
                                    f"coordinator serves {self.digest[:16]}…")  # fmt: skip
        if len(tokens) >= params["max_tokens"]:
            raise PreconditionError(f"session {sid} already has its {params['max_tokens']} tokens")
        self._check_capacity()
        stages = self.route()
        sampling = SamplingParams(temperature=params["temperature"], top_k=params["top_k"], top_p=params["top_p"],
                                  seed=params["seed"])  # fmt: skip
        probability = params.get("audit_probability", self.cfg.audit_probability)
        session = Session(
            session_id=sid,
            request=SessionRequest("", params["max_tokens"], sampling, params["chat"], probability,
                                   wait_audits=not req.no_wait_audits),  # fmt: skip
            prompt_ids=rec["prompt_ids"], max_tokens=params["max_tokens"], stages=stages, tokens=list(tokens),
            resumed=len(tokens),
        )  # fmt: skip
        session.audits = self.verifier.new_session_audits(sid, probability, self.cfg.audit_seed)
        session.first_step = self.ledger.resume_session(sid, _stages_record(stages))
        self.ledger.event(sid, "resumed", {"tokens": len(tokens), "from_status": rec["status"]})
        with self._sessions_lock:
            self._sessions[sid] = session
            self._sessions.move_to_end(sid)
        log.info("session %s resumed after %d tokens (%s), stages %s", sid, len(tokens), rec["status"],
                 ", ".join(f"{r.node_id} {r.layers}" for r in stages))  # fmt: skip
        return session

    def _trim_sessions(self) -> None:
        done = [s for s in self._sessions.values() if s.state != RUNNING]
        for s in done[: max(0, len(done) - self.cfg.keep_finished)]:
            del self._sessions[s.session_id]
        for s in done[: max(0, len(done) - self.cfg.keep_history)]:
            if s.frozen_stats is None:
                s.drop_history()

    def replace_stage(self, session: Session, index: int, bad_node: str) -> tuple[StageRef, StageHandle]:
        """A node for a stage whose node failed or was caught (it counts as dead until its next
        heartbeat). In this order, each list sorted by node id so that the choice is
        deterministic: a live worker already holding exactly those layers and not in the session
        (a spare); a standby, which loads the layers now (the fastest with the memory for them);
        the coordinator itself (unless started with --no-backup), loading the layers once."""
        old = session.stages[index]
        self.registry.mark_dead(bad_node)
        busy = {r.node_id for r in session.stages} | {bad_node}
        alive = sorted((n for n in self.registry.alive() if not n.local and n.node_id not in busy),
                       key=lambda n: n.node_id)  # fmt: skip
        for n in alive:
            if n.layers == old.layers:
                log.warning("stage %d (layers %s) moves from %s to %s, a spare holding those layers", index,
                            old.layers, bad_node, n.node_id)  # fmt: skip
                return self._ref(index, n), self._handle(n.node_id)

        def fits(n: Node) -> bool:
            return n.memory_bytes >= self._layer_bytes(n.dtype, n.packed) * len(old.layers)

        standbys = [n for n in alive if n.standby and n.layers is None]
        for n in sorted(standbys, key=lambda n: (not fits(n), -n.speed_gflops, n.node_id)):
            log.warning("stage %d (layers %s) moves from %s to the standby %s, which loads them now", index,
                        old.layers, bad_node, n.node_id)  # fmt: skip
            try:
                info = self._handle(n.node_id).assign(old.layers, self.digest, self.cfg.assign_timeout_s)
            except ConsortiumError as e:
                log.warning("standby %s could not take layers %s: %s", n.node_id, old.layers, e)
                self.registry.mark_dead(n.node_id)
                continue
            n = self.registry.set_layers(n.node_id, old.layers, info.layers_digest)
            return self._ref(index, n), self._handle(n.node_id)
        if not self.cfg.backup:
            raise NoBackupError(
                f"stage {index} (layers {old.layers}) lost node {bad_node} and no backup is available: no live "
                f"worker holds layers {old.layers}, no standby is free, and the coordinator does not take over "
                f"stages (--no-backup)"
            )
        key = (old.layers.start, old.layers.end)
        with self._handles_lock:
            handle = self._backups.get(key)
            if handle is None:
                runner = StageRunner(self.gguf, old.layers, self.engine, self.cfg.kv_cache_bytes,
                                     self.cfg.session_idle_timeout_s)  # fmt: skip
                handle = self._backups[key] = LocalStage(self.cfg.node_id, runner)
        ref = StageRef(
            index, self.cfg.node_id, self.address, old.layers, self.device, self.cfg.engine.dtype, True
        )
        log.warning("stage %d (layers %s) moves from %s to the coordinator", index, old.layers, bad_node)
        return ref, handle

    @staticmethod
    def _ref(index: int, n: Node) -> StageRef:
        return StageRef(index, n.node_id, n.address, n.layers, n.device, n.dtype, n.local)

    def remote_auditor(self, session: Session, stage: int, exclude: set[str]) -> RemoteTarget | None:
        """A live worker holding exactly the stage's layers and not one of `exclude` (the audited
        nodes, lost auditors) audits it: one on another backend than the audited node first, then
        by node id. None: the coordinator audits it itself."""
        ref = session.history[stage].stage
        serving = {r.node_id for r in session.stages}
        nodes = [n for n in self.registry.alive()
                 if not n.local and n.layers == ref.layers and n.node_id not in exclude | serving]  # fmt: skip
        if not nodes:
            return None
        audited = ref.device.split(":")[0]
        n = min(nodes, key=lambda n: (n.backend == audited, n.node_id))
        key, layers_digest = n.public_key, self.verifier.layers_digest(ref.layers.start, ref.layers.end)

        def check(order: pb.WorkOrder, res: pb.WorkResult, xw, out) -> None:  # like any work result
            expected_in = input_digest(order.session_id, order.stage_index, order.start_position, xw)
            check_work_receipt(res.receipt, order, key, layers_digest, expected_in, out)

        return RemoteTarget(self._handle(n.node_id), n, session.session_id, stage, ref.layers, session.capacity,
                            self.args, check)  # fmt: skip

    def handles_for(self, session: Session) -> list[StageHandle]:
        return [self._stage_handle(r) for r in session.stages]

    def _stage_handle(self, ref: StageRef) -> StageHandle:
        backup = self._backups.get((ref.layers.start, ref.layers.end)) if ref.local else None
        if backup is not None and ref.layers != self.cfg.layers:
            return backup
        return self._handle(ref.node_id)

    def session(self, session_id: str) -> Session:
        with self._sessions_lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise SessionNotFoundError(f"unknown session {session_id!r}")
        return s

    def session_status(self, session_id: str) -> pb.SessionStatus:
        try:
            s = self.session(session_id)
        except SessionNotFoundError:
            return self._ledger_status(session_id)
        end = s.finished if s.finished is not None else time.monotonic()
        return pb.SessionStatus(
            session_id=s.session_id, state=s.state, prompt_tokens=len(s.prompt_ids),
            generated_tokens=len(s.tokens), max_tokens=s.max_tokens, position=s.position,
            stages=[stage_stats(x) for x in s.stats()], error=s.error, age_s=end - s.created,
            tokens_per_second=s.tokens_per_second, tokens=s.tokens, text=self.tokenizer.decode(s.tokens),
            failovers=s.failovers, resumable=s.state in RESUMABLE and len(s.tokens) < s.max_tokens,
        )  # fmt: skip

    def _ledger_status(self, session_id: str) -> pb.SessionStatus:
        """A session this process never ran (e.g. before a restart): read back from the ledger."""
        rec = self.ledger.session(session_id)
        if rec is None:
            raise SessionNotFoundError(f"unknown session {session_id!r}")
        tokens, max_tokens = rec["tokens"], rec["params"]["max_tokens"]
        failovers = [
            pb.FailoverEvent(stage=e["stage"], token_index=e["token_index"], failed_node=e["failed_node"],
                             backup_node=e["backup_node"], latency_ms=e["latency_ms"],
                             replay_ms=e.get("replay_ms", 0.0), load_ms=e.get("load_ms", 0.0),
                             error=e.get("error", ""))
            for e in self.ledger.events(session_id, "failover")
        ]  # fmt: skip
        return pb.SessionStatus(
            session_id=session_id, state=rec["status"], prompt_tokens=len(rec["prompt_ids"]),
            generated_tokens=len(tokens), max_tokens=max_tokens, position=0, error=rec["error"] or "",
            age_s=max(0.0, time.time() - rec["created"]), tokens=tokens, text=self.tokenizer.decode(tokens),
            failovers=failovers, resumable=rec["status"] in RESUMABLE and len(tokens) < max_tokens,
        )  # fmt: skip


def _stages_record(stages: list[StageRef]) -> list[dict]:
    """A session's pipeline as the ledger stores it."""
    return [{"node": r.node_id, "layers": [r.layers.start, r.layers.end]} for r in stages]


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def Register(self, request, context):
        try:
            return self.c.register(request.node)
        except Exception as e:
            abort_for(context, e)

    def Heartbeat(self, request, context):
        try:
            return self.c.heartbeat(request)
        except Exception as e:
            abort_for(context, e)

    def Generate(self, request, context):
        try:
            session = self.c.new_session(request)
        except Exception as e:
            abort_for(context, e)
        yield from self._run(session, context)

    def Resume(self, request, context):
        try:
            session = self.c.resume_session(request)
        except Exception as e:
            abort_for(context, e)
        yield from self._run(session, context)

    def _run(self, session: Session, context):
        context.add_callback(session.cancel.set)  # client gone: stop at the next step
        events = pumped(self.c.loop.run(session, self.c.handles_for(session)), session.cancel,
                        f"session-{session.session_id[:8]}")  # fmt: skip
        try:
            yield from events
        except Exception as e:
            abort_for(context, e)
        finally:
            events.close()
            with self.c._sessions_lock:
                self.c._trim_sessions()

    def GetSession(self, request, context):
        try:
            return self.c.session_status(request.session_id)
        except Exception as e:
            abort_for(context, e)

    def GetStatus(self, request, context):
        try:
            return self.c.status()
        except Exception as e:
            abort_for(context, e)
