"""The worker process: holds a layer range, registers with the coordinator, heartbeats,
and executes the coordinator's work orders over gRPC."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import grpc

import consortium
from consortium.core.config import INSECURE_WARNING, LayerRange, WorkerConfig
from consortium.errors import ConsortiumError
from consortium.identity import NodeIdentity
from consortium.identity.tls import TlsIdentity, bind_cert
from consortium.model.memory import available_bytes
from consortium.model.model import resolve_device
from consortium.model.pack_cache import open_model
from consortium.transport.auth import (
    CoordinatorLink,
    Gate,
    service_name,
    signed,
    signed_registration,
)
from consortium.transport.handlers import add_servicer
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import (
    PermissionDeniedError,
    PreconditionError,
    RemoteError,
    UnauthenticatedError,
    bind,
    check_address,
    local_address_towards,
    make_server,
    maps_errors,
    one_line,
)
from consortium.verification.misbehave import Misbehaviour, make_runner
from consortium.worker.capacity import measure_speed_gflops
from consortium.worker.runner import StageRunner, use_cores

log = logging.getLogger(__name__)
REFUSED = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
)


class WorkerServicer(pb_grpc.WorkerServicer):
    """Every call must be signed by the coordinator this worker registered with (auth.signed)."""

    SERVICE = service_name("Worker")

    def __init__(self, node: WorkerNode):
        self.node = node
        self.gate = node.gate

    def authorize(self, name: str, request, key: bytes | None) -> None:
        if key is None:
            raise UnauthenticatedError(f"{name} must be signed by the coordinator")
        pinned = self.node.coordinator_key
        if pinned is None:
            raise PermissionDeniedError(
                f"{name} refused: this worker has not registered with a coordinator yet"
            )
        if key != pinned:
            raise PermissionDeniedError(
                f"{name} refused: not signed by the coordinator this worker registered with ({pinned.hex()[:16]}…)"
            )

    def _runner(self) -> StageRunner:
        r = self.node.runner
        if r is None:
            raise PreconditionError(f"node {self.node.node_id} holds no layers yet (waiting for placement)")
        return r

    @maps_errors
    @signed
    def OpenChannel(self, request, context, signer: bytes):
        """A channel key for the coordinator's later calls (transport/auth.py): over TLS only,
        which keeps its secret between the two ends."""
        if self.node.tls is None:
            raise PreconditionError("no channel keys over plain text (--insecure): sign every call")
        key = self.gate.open_channel(signer)
        return pb.OpenChannelResponse(key_id=key.key_id, secret=key.secret)

    @maps_errors
    @signed
    def AssignLayers(self, request, context):
        return pb.AssignLayersResponse(node=self.node.assign(request))

    @maps_errors
    @signed
    def OpenSession(self, request, context):
        return self._runner().open(request)

    @maps_errors
    @signed
    def CloseSession(self, request, context):
        return self._runner().close(request)

    @maps_errors
    @signed
    def Execute(self, request, context):
        return self._runner().execute(request)

    @maps_errors
    @signed
    def ExecuteBatch(self, request, context):
        return self._runner().execute_batch(request)

    @maps_errors
    @signed
    def Rollback(self, request, context):
        return self._runner().rollback(request)

    @maps_errors
    @signed
    def GetStatus(self, request, context):
        r = self.node.runner
        return pb.WorkerStatus(
            node=self.node.info(),
            active_sessions=len(r.pool) if r else 0,
            cache_bytes=r.pool.used_bytes if r else 0,
            cache_budget_bytes=self.node.cfg.kv_cache_bytes,
        )


class WorkerNode:
    def __init__(self, cfg: WorkerConfig):
        check_address(cfg.coordinator)
        self.cfg = cfg
        # The key signs every receipt; the id defaults to the one derived from it.
        self.identity = NodeIdentity.load_or_create(cfg.data_dir)
        self.node_id = cfg.node_id or self.identity.node_id
        # TLS: a certificate bound to the key (the coordinator pins it); calls must be signed for the key
        self.tls = None if cfg.insecure else TlsIdentity.load_or_create(cfg.data_dir)
        self.tls_binding = bind_cert(self.identity, self.tls.cert_der) if self.tls else b""
        self.gate = Gate(self.identity.public_key)
        self._link: CoordinatorLink | None = None
        self.misbehaviour = Misbehaviour.parse(cfg.misbehave) if cfg.misbehave else None
        if self.misbehaviour is not None:
            log.warning("worker %s MISBEHAVES on purpose (%s): for tests only", self.node_id, cfg.misbehave)
        self.runner: StageRunner | None = None
        self.address = ""
        self.heartbeat_interval_s = 2.0
        self._assign_lock = threading.Lock()
        self._stop = threading.Event()
        self._server: grpc.Server | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Loads the model (only its layers), serves, and registers; raises ConsortiumError."""
        cfg = self.cfg
        use_cores(cfg.engine)
        self.device = resolve_device(cfg.engine.device)
        self.engine = replace(cfg.engine, device=self.device)
        self.gguf = open_model(cfg.model, self.engine)
        if cfg.layers is not None:
            cfg.layers.check(self.gguf.args.n_layers)
        self.model_digest = self.gguf.digest
        if cfg.layers is not None:
            self._load(cfg.layers)
        self.memory_bytes = available_bytes(self.device)
        if cfg.max_memory_bytes is not None:
            self.memory_bytes = min(self.memory_bytes, cfg.max_memory_bytes)
        self.speed_gflops = measure_speed_gflops(self.device, cfg.engine.dtype)
        self._server = make_server(cfg.max_concurrency, cfg.max_message_bytes)
        add_servicer(self._server, WorkerServicer(self), "Worker")  # unparseable requests: INVALID_ARGUMENT
        port = bind(self._server, cfg.host, cfg.port, self.tls)
        self._server.start()
        host = cfg.host
        if host in ("0.0.0.0", "::", ""):
            host = local_address_towards(cfg.coordinator)
        self.address = cfg.advertise or f"{host}:{port}"
        self.port = port
        log.info("worker %s serving on %s:%d (advertised %s)", self.node_id, cfg.host, port, self.address)
        if cfg.insecure:
            log.warning(INSECURE_WARNING)
        deadline = time.monotonic() + cfg.register_timeout_s
        self._link = CoordinatorLink(
            cfg.coordinator,
            self.identity,
            cfg.insecure,
            cfg.coordinator_cert,
            cfg.data_dir,
            cfg.max_message_bytes,
            cfg.register_timeout_s,
        )
        self._coordinator = self._link.stub
        self._register(deadline)
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._expiry_loop, "kv-expiry")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
        if self._link is not None:
            self._link.close()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    # --- layers ------------------------------------------------------------------------

    def _load(self, layers: LayerRange) -> None:
        t0 = time.perf_counter()
        cfg = self.cfg
        step = max(1, len(layers) // 4)

        def progress(done: int, total: int) -> None:  # an on-demand load: the operator sees it move
            if done % step == 0 or done == total:
                log.info("loading layers %s: %d/%d (%.1f s)", layers, done, total, time.perf_counter() - t0)

        self.runner = make_runner(
            self.gguf,
            layers,
            self.engine,
            cfg.kv_cache_bytes,
            cfg.session_idle_timeout_s,
            identity=self.identity,
            node_id=self.node_id,
            progress=progress,
            misbehaviour=self.misbehaviour,
        )
        log.info(
            "loaded layers %s (%s, %s) in %.1f s",
            layers,
            self.device,
            cfg.engine.dtype,
            time.perf_counter() - t0,
        )

    def assign(self, req: pb.AssignLayersRequest) -> pb.NodeInfo:
        """Placement gave this node a range: load it (once)."""
        if req.model_digest != self.model_digest:
            raise PreconditionError(
                f"assignment for model {req.model_digest[:12]}… but this node has {self.model_digest[:12]}…"
            )
        layers = LayerRange(req.layers.start, req.layers.end).check(self.gguf.args.n_layers)
        with self._assign_lock:
            if self.runner is None:
                self._load(layers)
            elif self.runner.layers != layers:
                raise PreconditionError(
                    f"node {self.node_id} already holds layers {self.runner.layers}, not {layers}"
                )
        return self.info()

    def info(self) -> pb.NodeInfo:
        cfg, r = self.cfg, self.runner
        info = pb.NodeInfo(
            node_id=self.node_id,
            address=self.address,
            backend=self.device.split(":")[0],
            device=self.device,
            dtype=cfg.engine.dtype,
            packed=cfg.engine.packed,
            memory_bytes=self.memory_bytes,
            speed_gflops=self.speed_gflops,
            model_digest=self.model_digest,
            version=consortium.__version__,
            threads=_threads(),
            public_key=self.identity.public_key,
            standby=cfg.standby,
            tls_cert=self.tls.cert_der if self.tls else b"",
            tls_binding=self.tls_binding,
        )
        if r is not None:
            info.layers.CopyFrom(pb.LayerRange(start=r.layers.start, end=r.layers.end))
            info.layers_digest = r.layers_digest
        return info

    # --- coordinator -------------------------------------------------------------------

    @property
    def coordinator_key(self) -> bytes | None:
        """The key of the coordinator this worker registered with: the only one it obeys."""
        return self._link.key if self._link is not None else None

    def _register(self, deadline: float) -> None:
        """Registers (challenge-response: proof of this node's key), retrying while the coordinator
        is unreachable; a refusal is final, and so is a coordinator that is not the one pinned."""
        addr = self.cfg.coordinator
        while True:
            try:
                req = signed_registration(self.identity, self._link.challenge(), self.info())
                resp = self._coordinator.Register(req, timeout=10)
                self.heartbeat_interval_s = resp.heartbeat_interval_s or self.heartbeat_interval_s
                log.info("registered with the coordinator at %s as %s", addr, self.node_id)
                return
            except grpc.RpcError as e:
                if e.code() in REFUSED:
                    raise ConsortiumError(
                        f"coordinator at {addr} refused this worker: {one_line(e.details() or '')}"
                    ) from e
                if time.monotonic() >= deadline or self._stop.is_set():
                    raise RemoteError.from_rpc(e, f"coordinator at {addr}") from e
                time.sleep(0.2)

    def _heartbeat_loop(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_interval_s):
            r = self.runner
            req = pb.HeartbeatRequest(
                node_id=self.node_id,
                active_sessions=len(r.pool) if r else 0,
                cache_bytes=r.pool.used_bytes if r else 0,
                session_ids=r.pool.session_ids() if r else [],
            )
            try:
                resp = self._coordinator.Heartbeat(req, timeout=max(self.heartbeat_interval_s, 1.0))
                if warned:
                    log.info("coordinator reachable again")
                warned = False
                for sid in resp.drop_sessions:  # stale: the stage moved away while we were gone
                    if r is not None and r.pool.drop(sid):
                        log.warning(
                            "dropped the KV cache of session %s: the coordinator no longer runs it here", sid
                        )
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                if e.code() == grpc.StatusCode.NOT_FOUND:  # coordinator restarted or forgot us
                    log.info("coordinator does not know this node; registering again")
                    try:
                        self._register(deadline=time.monotonic())
                    except ConsortiumError as err:
                        log.error("registering again failed: %s", err)
                elif not warned:
                    log.warning("heartbeat failed: %s", RemoteError.from_rpc(e, "coordinator"))
                    warned = True

    def _expiry_loop(self) -> None:
        period = max(0.5, min(30.0, self.cfg.session_idle_timeout_s / 4))
        while not self._stop.wait(period):
            if self.runner is not None:
                self.runner.expire()


def _threads() -> int:
    import torch

    return torch.get_num_threads()
