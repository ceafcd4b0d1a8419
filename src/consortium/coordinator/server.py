"""The coordinator process: node registry, placement, sessions and the token loop, over gRPC.

`build_coordinator(cfg)` assembles the parts; `Coordinator` holds them, serves the gRPC
API and may host a stage itself (the seed topology: the last layers and the head), driven
in-process through the same StageRunner a worker uses.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

import consortium
from consortium.coordinator.admission import Admission, public_status
from consortium.coordinator.cluster import NodeCluster, stage_ref
from consortium.coordinator.limits import ClientLimits, peer_host
from consortium.coordinator.loop import TokenLoop
from consortium.coordinator.pump import pumped
from consortium.coordinator.registry import Node, Registry
from consortium.coordinator.sessions import SessionTable, stages_record
from consortium.coordinator.stages import Dialer
from consortium.coordinator.verifier import Verifier
from consortium.core.config import INSECURE_WARNING, CoordinatorConfig, EngineConfig, SessionRequest
from consortium.core.placement import Holder, PlacementError, check_tiling, overlaps
from consortium.core.session import RESUMABLE, RUNNING, Session, SessionNotFoundError
from consortium.errors import InvalidRequestError
from consortium.model.generate import check_request
from consortium.model.gguf_file import GGUFModel
from consortium.model.model import resolve_device
from consortium.model.pack_cache import open_model
from consortium.model.sampling import SamplingParams
from consortium.model.tokenizer import GGUFTokenizer
from consortium.transport.auth import service_name, signed
from consortium.transport.handlers import add_servicer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import PreconditionError, bind, make_server, maps_errors
from consortium.verification.audit import LocalAuditor
from consortium.verification.ledger import Ledger
from consortium.verification.tolerance import admitted_classes, calibration_report, load_calibration
from consortium.worker.runner import StageRunner, use_cores

log = logging.getLogger(__name__)


def build_coordinator(cfg: CoordinatorConfig) -> Coordinator:
    """Loads the model's metadata and tokenizer, opens the ledger, and wires the parts."""
    use_cores(cfg.engine)
    engine = replace(cfg.engine, device=resolve_device(cfg.engine.device))
    gguf = open_model(cfg.model, engine)
    if cfg.layers is not None:
        cfg.layers.check(gguf.args.n_layers)
    if cfg.calibration is not None:
        load_calibration(cfg.calibration, gguf.digest)
        log.info("tolerances: %s (calibrated on this model)", cfg.calibration)
    elif calibration_report()["model_digest"] != gguf.digest:  # the committed table is one model's
        log.warning(
            "no tolerances calibrated for %s: audits use the class-wide bounds, which catch gross "
            "cheats only (docs/tolerances.md; `consortium calibrate` measures a model, --calibration loads it)",
            gguf.path.name,
        )
    ledger = Ledger(cfg.ledger or Path(tempfile.mkdtemp(prefix="consortium-")) / "ledger.db")
    log.info("ledger: %s", ledger.path)
    for sid in ledger.interrupt_running():
        log.warning(
            "session %s was cut off by the coordinator's stop: interrupted (`consortium session resume "
            "--session-id %s` continues it)",
            sid,
            sid,
        )
    classes = admitted_classes(cfg.tolerance_classes)
    registry = Registry(
        gguf.digest, gguf.path.name, gguf.args.n_layers, cfg.node_timeout_s, ledger, cfg.allow_keys, classes
    )
    cluster = NodeCluster(cfg, engine, gguf, registry, ledger)
    auditor = LocalAuditor(gguf, resolve_device(cfg.audit_device), budget=cfg.audit_memory_bytes)
    auditor.node_id = cfg.node_id
    verifier = Verifier(
        gguf, ledger, auditor, cluster, cfg.audit_seed, cfg.audit_recheck_probability, cfg.audit_workers
    )
    tokenizer = GGUFTokenizer(gguf)
    loop = TokenLoop(cfg, gguf.args, tokenizer, verifier, ledger, cluster)
    spills = loop.spills  # measured now: the free disk at start
    log.info(
        "committed logits of remote last stages: up to %.1f GiB in %s", spills.limit / 2**30, spills.directory
    )
    sessions = SessionTable(cfg, ledger, tokenizer)
    limits = ClientLimits(cfg.max_sessions_per_client, cfg.sessions_per_minute_per_client)
    # a token is at most this many bytes of text, so a longer prompt has more tokens than the context
    token_bytes = max(len(t.encode()) for t in gguf.meta("tokenizer.ggml.tokens"))
    max_prompt = min(cfg.max_request_bytes, gguf.args.context_length * token_bytes)
    parts = (cfg, engine, gguf, tokenizer, ledger, registry, cluster, verifier, loop, sessions, limits)
    return Coordinator(*parts, max_prompt)


@dataclass
class Coordinator:
    cfg: CoordinatorConfig
    engine: EngineConfig  # with the device resolved
    gguf: GGUFModel
    tokenizer: GGUFTokenizer
    ledger: Ledger
    registry: Registry
    cluster: NodeCluster
    verifier: Verifier
    loop: TokenLoop
    sessions: SessionTable
    limits: ClientLimits
    max_prompt_bytes: int  # longer prompts cannot fit the context: refused before tokenizing
    runner: StageRunner | None = None  # the stage it hosts itself
    admission: Admission | None = None  # its key, TLS pair and front-door checks, once started
    address: str = ""
    port: int = 0
    _server: grpc.Server | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def digest(self) -> str:
        return self.gguf.digest

    @property
    def args(self):
        return self.gguf.args

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        self.admission = Admission.load(cfg, self.registry)
        self.cluster.dialer = Dialer(self.admission.identity, cfg.insecure, cfg.max_message_bytes)
        limit = min(cfg.max_request_bytes, cfg.max_message_bytes)  # what the coordinator receives
        self._server = make_server(max(32, cfg.max_sessions + 16), limit)
        add_servicer(self._server, CoordinatorServicer(self), "Coordinator")
        self.port = bind(self._server, cfg.host, cfg.port, self.admission.tls)
        if cfg.insecure:
            log.warning(INSECURE_WARNING)
        self.address = self.cluster.address = f"{cfg.host}:{self.port}"
        if cfg.layers is not None:
            self._host_stage()
        self._server.start()
        threading.Thread(target=self._expiry_loop, name="kv-expiry", daemon=True).start()
        log.info("coordinator serving on %s, model %s (sha256 %s)", self.address, self.gguf.path, self.digest)

    def _host_stage(self) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        self.runner = StageRunner(
            self.gguf, cfg.layers, self.engine, cfg.kv_cache_bytes, cfg.session_idle_timeout_s
        )
        log.info(
            "loaded layers %s (%s, %s) in %.1f s",
            cfg.layers,
            self.device,
            self.engine.dtype,
            time.perf_counter() - t0,
        )
        local = Node(
            node_id=cfg.node_id,
            address=self.address,
            backend=self.device.split(":")[0],
            device=self.device,
            dtype=self.engine.dtype,
            packed=self.engine.packed,
            memory_bytes=0,
            speed_gflops=0.0,
            layers=cfg.layers,
            model_digest=self.digest,
            layers_digest=self.runner.layers_digest,
            version=consortium.__version__,
            local=True,
        )
        self.cluster.add_local(local, self.runner)

    def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        self.verifier.stop()
        for s in self.sessions.all():
            s.cancel.set()
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
        self.cluster.shutdown()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def _expiry_loop(self) -> None:
        period = max(0.5, min(30.0, self.cfg.session_idle_timeout_s / 4))
        while not self._stop.wait(period):
            if self.runner is not None:
                self.runner.expire()

    # --- nodes -------------------------------------------------------------------------------

    def register(self, req: pb.RegisterRequest) -> pb.RegisterResponse:
        node = Node.from_proto(req.node, self.args.n_layers)
        self.admission.check_registration(req, node)  # proof of possession of the node's key
        self.cluster.add_remote(node)
        self.ledger.upsert_node(node.node_id, node.public_key, node.address, node.backend, node.dtype)
        log.info(
            "node %s registered from %s: layers %s, %s %s, %.1f GFLOP/s, %.1f GiB",
            node.node_id,
            node.address,
            node.layers or "unassigned",
            node.device,
            node.dtype,
            node.speed_gflops,
            node.memory_bytes / 2**30,
        )
        return pb.RegisterResponse(
            node_id=node.node_id,
            heartbeat_interval_s=self.cfg.heartbeat_interval_s,
            n_layers=self.args.n_layers,
        )

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """Marks the node alive and names the sessions it still caches but no longer runs (its
        stage moved while it was hung or cut off, or this coordinator restarted): it drops them."""
        self.registry.heartbeat(req.node_id)
        live = self.sessions.live_on(req.node_id)
        return pb.HeartbeatResponse(drop_sessions=[sid for sid in req.session_ids if sid not in live])

    def status(self) -> pb.ClusterStatus:
        st = pb.ClusterStatus(model_digest=self.digest, n_layers=self.args.n_layers)
        serving, spares = self.registry.serving()
        roles = {n.node_id: "serving" for n in serving} | {n.node_id: "spare" for n in spares}
        for node, alive, age in self.registry.snapshot():
            if self.registry.is_banned(node.node_id) and not node.local:
                role = "banned"
            elif not alive:
                role = "dead"
            else:
                role = roles.get(node.node_id, "standby" if node.standby else "unassigned")
            st.nodes.append(
                pb.NodeStatus(
                    node=node.to_proto(), alive=alive, heartbeat_age_s=age, local=node.local, role=role
                )
            )
        holders = [Holder(n.node_id, n.layers) for n in serving]
        try:
            order = check_tiling(holders, self.args.n_layers)
            nodes = {n.node_id: n for n in serving}
            st.route.extend(stage_ref(i, nodes[h.node_id]).to_proto() for i, h in enumerate(order))
        except PlacementError as e:
            st.placement_error = str(e)
            st.flexible_pending = bool(self.cluster.flexible()) and not overlaps(holders)
        st.active_sessions = self.sessions.running()
        st.spill_held_bytes, st.spill_limit_bytes = self.loop.spills.held, self.loop.spills.limit
        return st

    # --- sessions ----------------------------------------------------------------------------

    def new_session(self, req: pb.GenerateRequest, client: str = "") -> Session:
        """A session for `req` from `client` (its key or address: per-client limits). Cheap checks
        come first: the request's fields, then the prompt's size in bytes before tokenizing."""
        s = req.sampling
        request = SessionRequest(
            req.prompt,
            req.max_tokens,
            SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p or 1.0, seed=s.seed),
            not req.no_chat,
            req.audit_probability if req.HasField("audit_probability") else None,
            req.audit_seed if req.HasField("audit_seed") else None,
            req.audit_coverage if req.HasField("audit_coverage") else None,
            wait_audits=not req.no_wait_audits,
        ).check()
        if request.audit_probability is None:
            request = replace(request, audit_probability=self.cfg.audit_probability)
        if request.audit_coverage is None:
            request = replace(request, audit_coverage=self.cfg.audit_coverage)
        size = len(request.prompt.encode())
        if size > self.max_prompt_bytes:
            raise InvalidRequestError(
                f"prompt of {size} bytes cannot fit the model's context of {self.args.context_length} tokens "
                f"(at most {self.max_prompt_bytes} bytes)"
            )
        with self.limits.starting(client):
            return self._start(request, client)

    def _start(self, request: SessionRequest, client: str) -> Session:
        ids = self.tokenizer.encode_prompt(request.prompt, chat=request.chat)
        ctx = self.args.context_length
        check_request(ids, request.max_tokens, ctx)
        stages = self.cluster.route()
        self.sessions.check_capacity()
        sid = uuid.uuid4().hex
        audits = self.verifier.new_session_audits(
            sid, request.audit_probability, request.audit_seed, request.audit_coverage
        )
        max_tokens = min(request.max_tokens, ctx - len(ids))
        session = Session(sid, request, ids, max_tokens, stages, audits=audits, client=client)
        with self._spill_reserved(session):
            self.ledger.create_session(sid, ids, self._params(session), stages_record(session))
            self.sessions.add(session)
        log.info(
            "session %s: %d prompt tokens, up to %d new, stages %s",
            sid,
            len(ids),
            session.max_tokens,
            ", ".join(f"{r.node_id} {r.layers}" for r in stages),
        )
        return session

    def _params(self, session: Session) -> dict:
        """What the ledger keeps of a session's request (enough to resume it exactly)."""
        r, sampling = session.request, session.request.sampling
        return {
            "max_tokens": session.max_tokens,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
            "chat": r.chat,
            "audit_probability": r.audit_probability,
            "audit_coverage": r.audit_coverage,
            "model_digest": self.digest,
        }

    def resume_session(self, req: pb.ResumeRequest, client: str = "") -> Session:
        """A session the ledger holds as interrupted (or failed, or cancelled) continues from its
        committed tokens: same id, prompt, sampling and seed, so the tokens it goes on to
        generate are those it would have generated without the stop."""
        with self.limits.starting(client):
            return self._resume(req, client)

    def _resume(self, req: pb.ResumeRequest, client: str) -> Session:
        sid = req.session_id
        live = self.sessions.find(sid)
        if live is not None and live.state == RUNNING:
            raise PreconditionError(f"session {sid} is running; nothing to resume")
        rec = self.ledger.session(sid)
        if rec is None:
            raise SessionNotFoundError(f"unknown session {sid!r} (not in the ledger {self.ledger.path})")
        params, tokens = rec["params"], rec["tokens"]
        self._check_resumable(sid, rec["status"], params, tokens)
        self.sessions.check_capacity()
        stages = self.cluster.route()
        sampling = SamplingParams(params["temperature"], params["top_k"], params["top_p"], params["seed"])
        probability = params.get("audit_probability", self.cfg.audit_probability)
        coverage = params.get("audit_coverage") or self.cfg.audit_coverage  # older ledgers lack it
        request = SessionRequest(
            "",
            params["max_tokens"],
            sampling,
            params["chat"],
            probability,
            audit_coverage=coverage,
            wait_audits=not req.no_wait_audits,
        )
        session = Session(
            sid,
            request,
            rec["prompt_ids"],
            params["max_tokens"],
            stages,
            tokens=list(tokens),
            resumed=len(tokens),
            audits=self.verifier.new_session_audits(sid, probability, self.cfg.audit_seed, coverage),
            client=client,
        )
        with self._spill_reserved(session):
            session.first_step = self.ledger.resume_session(sid, stages_record(session))
            self.ledger.event(sid, "resumed", {"tokens": len(tokens), "from_status": rec["status"]})
            self.sessions.add(session)
        log.info(
            "session %s resumed after %d tokens (%s), stages %s",
            sid,
            len(tokens),
            rec["status"],
            ", ".join(f"{r.node_id} {r.layers}" for r in stages),
        )
        return session

    @contextmanager
    def _spill_reserved(self, session: Session) -> Iterator[None]:
        """The session's disk for logits set aside (core/spill.py) while it is recorded; given
        back if recording it fails."""
        self.loop.reserve_spill(session)
        try:
            yield
        except BaseException:
            if session.spill is not None:
                session.spill.release()
            raise

    def _check_resumable(self, sid: str, status: str, params: dict, tokens: list[int]) -> None:
        if status not in RESUMABLE:
            raise PreconditionError(
                f"session {sid} is {status}; only an interrupted, failed or cancelled session can be resumed"
            )
        if params.get("model_digest", self.digest) != self.digest:
            raise PreconditionError(
                f"session {sid} ran on model sha256 {params['model_digest'][:16]}…, this "
                f"coordinator serves {self.digest[:16]}…"
            )
        if len(tokens) >= params["max_tokens"]:
            raise PreconditionError(f"session {sid} already has its {params['max_tokens']} tokens")

    def run(self, session: Session) -> Iterator[pb.GenerateEvent]:
        """The session's events, computed ahead in its own thread (a slow client never delays
        the token loop)."""
        events = pumped(
            self.loop.run(session, self.cluster.handles_for(session)),
            session.cancel,
            f"session-{session.session_id[:8]}",
        )
        try:
            yield from events
        finally:
            events.close()
            self.limits.release(session.client)
            self.sessions.trim()


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Register proves the node's key in the request (challenge-response); every other call but
    Challenge is checked by auth.signed against Admission.authorize."""

    SERVICE = service_name("Coordinator")

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self.gate, self.authorize = coordinator.admission.gate, coordinator.admission.authorize

    @maps_errors
    def Challenge(self, request, context):
        return self.c.admission.challenge()

    @maps_errors
    def Register(self, request, context):
        return self.c.register(request)

    @maps_errors
    @signed
    def Heartbeat(self, request, context):
        return self.c.heartbeat(request)

    @maps_errors
    @signed
    def Generate(self, request, context, signer):
        client = self.c.admission.client_id(signer, peer_host(context.peer()))
        yield from self._run(self.c.new_session(request, client), context)

    @maps_errors
    @signed
    def Resume(self, request, context, signer):
        client = self.c.admission.client_id(signer, peer_host(context.peer()))
        yield from self._run(self.c.resume_session(request, client), context)

    def _run(self, session: Session, context) -> Iterator[pb.GenerateEvent]:
        context.add_callback(session.cancel.set)  # client gone: stop at the next step
        return self.c.run(session)

    @maps_errors
    @signed
    def GetSession(self, request, context):
        return self.c.sessions.status(request.session_id)

    @maps_errors
    @signed
    def GetStatus(self, request, context, signer):
        st = self.c.status()  # without --client-keys, or for a listed client: everything
        return st if self.c.admission.is_client(signer) else public_status(st)
