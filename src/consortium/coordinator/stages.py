"""Handles through which the token loop drives a stage: in-process (the coordinator's own
layers) or over gRPC (a worker). Both take and return the same protobuf messages, and
both end in a StageRunner, so the two paths validate and compute identically."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from consortium.coordinator.batching import Batcher, BatchPolicy, Done
from consortium.coordinator.registry import Node
from consortium.core.config import LayerRange
from consortium.identity import NodeIdentity
from consortium.transport.auth import KEY_ID_BYTES, SECRET_BYTES, CallSigner, ChannelKey
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import RemoteError, make_channel, one_line
from consortium.transport.tensors import DEFAULT_MAX_MESSAGE_BYTES
from consortium.worker.runner import StageRunner, Work

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a long call checks the node's heartbeats
OPEN_TIMEOUT_S = 10.0  # OpenChannel's deadline at most (a node that is up answers at once)
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


class StageHandle(Protocol):
    node_id: str
    batcher: Batcher

    def open(self, session_id: str, capacity: int, layers: LayerRange, timeout_s: float) -> None: ...

    def execute(self, order: pb.WorkOrder, timeout_s: float) -> pb.WorkResult:
        """The order's result, waited for."""
        ...

    def submit(self, order: pb.WorkOrder, timeout_s: float, done: Done) -> None:
        """Queues the order for the stage's next batch; `done` gets the result (a LocalStage's:
        its rows unencoded, runner.Work) or the error, in the batches' callback thread."""
        ...

    def close(self, session_id: str, timeout_s: float) -> None: ...

    def rollback(self, session_id: str, position: int, timeout_s: float) -> None: ...

    def assign(self, layers: LayerRange, model_digest: str, timeout_s: float) -> pb.NodeInfo: ...


def _range(layers: LayerRange) -> pb.LayerRange:
    return pb.LayerRange(start=layers.start, end=layers.end)


class LocalStage:
    def __init__(self, node_id: str, runner: StageRunner, policy: BatchPolicy):
        self.node_id, self.runner = node_id, runner
        self.batcher: Batcher[Work] = Batcher(lambda orders, _timeout: runner.compute(orders), policy, "own")

    def open(self, session_id: str, capacity: int, layers: LayerRange, timeout_s: float) -> None:
        self.runner.open(
            pb.OpenSessionRequest(session_id=session_id, capacity=capacity, layers=_range(layers))
        )

    def execute(self, order: pb.WorkOrder, timeout_s: float) -> pb.WorkResult:
        return self.runner.result(self.batcher.execute(order, timeout_s))

    def submit(self, order: pb.WorkOrder, timeout_s: float, done: Done[Work]) -> None:
        """The order's output rows come back as computed, not encoded (the logits the token loop
        samples need no trip through bytes)."""
        self.batcher.submit(order, timeout_s, done)

    def close(self, session_id: str, timeout_s: float) -> None:
        self.runner.close(pb.CloseSessionRequest(session_id=session_id))

    def rollback(self, session_id: str, position: int, timeout_s: float) -> None:
        self.runner.rollback(pb.RollbackRequest(session_id=session_id, position=position))

    def assign(self, layers: LayerRange, model_digest: str, timeout_s: float) -> pb.NodeInfo:
        raise RemoteError("the coordinator's own stage is fixed at start")


@dataclass(frozen=True)
class Dialer:
    """How the coordinator reaches a worker: TLS whose only root is the certificate the worker
    registered (plain text with --insecure), every call signed by the coordinator's key for
    that worker's key (transport/auth.py)."""

    identity: NodeIdentity
    insecure: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def channel(self, node: Node) -> tuple[grpc.Channel, CallSigner]:
        signer = CallSigner(self.identity, audience=node.public_key)
        pin = None if self.insecure else node.tls_cert
        return make_channel(node.address, self.max_message_bytes, pin=pin, interceptors=(signer,)), signer


class RemoteStage:
    def __init__(
        self,
        node: Node,
        dialer: Dialer,
        policy: BatchPolicy,
        silent_for: Callable[[], float] | None = None,
        hang_after_s: float = 3.0,
    ):
        self.node_id, self.address = node.node_id, node.address
        self.peer_id = (node.address, node.public_key, node.tls_cert)  # a new one needs a new channel
        self.channel, self.signer = dialer.channel(node)
        self.stub = pb_grpc.WorkerStub(self.channel)
        # calls carry a MAC under a key the node gives us (auth.py: ~2 us to check, not ~60): over TLS only
        self.keyed = not dialer.insecure
        self._key_lock = threading.Lock()
        # seconds since the node's last heartbeat: a long call is abandoned when they stop
        self.silent_for, self.hang_after_s = silent_for, hang_after_s
        self.batcher: Batcher[pb.WorkResult] = Batcher(self._execute_batch, policy, node.node_id)

    @property
    def peer(self) -> str:
        return f"node {self.node_id} at {self.address}"

    def _call(self, method, request, timeout_s: float):
        """The call's reply (RemoteError on failure), made under a channel key where there is one.
        A keyed call the node refuses as unauthenticated (it restarted and forgot our key) goes
        again once under a new key: its gate refused it before any work."""
        if self.keyed and self.signer.channel_key is None:
            self._open_channel(timeout_s)
        key = self.signer.channel_key
        try:
            return self._invoke(method, request, timeout_s)
        except RemoteError as e:
            if key is None or e.code != grpc.StatusCode.UNAUTHENTICATED:
                raise
            log.info("%s refused our channel key (%s): opening another", self.peer, e)
            with self._key_lock:
                if self.signer.channel_key is key:
                    self.signer.channel_key = None
            self._open_channel(timeout_s)
            return self._invoke(method, request, timeout_s)

    def _open_channel(self, timeout_s: float) -> None:
        """Asks the node for a channel key (a signed call); a node that gives none (plain text,
        or an older version) gets signed calls from now on."""
        with self._key_lock:
            if self.signer.channel_key is not None or not self.keyed:
                return
            try:
                reply = self._invoke(
                    self.stub.OpenChannel, pb.OpenChannelRequest(), min(timeout_s, OPEN_TIMEOUT_S)
                )
            except RemoteError as e:
                if e.code not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION):
                    raise
                log.info("%s gives no channel key (%s): its calls stay signed", self.peer, e)
                self.keyed = False
                return
            if len(reply.key_id) != KEY_ID_BYTES or len(reply.secret) != SECRET_BYTES:
                log.warning("%s sent a malformed channel key: its calls stay signed", self.peer)
                self.keyed = False
                return
            self.signer.channel_key = ChannelKey(bytes(reply.key_id), bytes(reply.secret))

    def _invoke(self, method, request, timeout_s: float):
        if self.silent_for is None or timeout_s <= self.hang_after_s:
            try:
                return method(request, timeout=timeout_s)
            except grpc.RpcError as e:
                raise RemoteError.from_rpc(e, self.peer) from e
        # A long call (prefill, replay, loading layers): its deadline cannot tell a hung node
        # from a slow one in seconds, the node's heartbeats can.
        call = method.future(request, timeout=timeout_s)
        while True:
            try:
                return call.result(timeout=POLL_S)
            except grpc.FutureTimeoutError:
                silent = self.silent_for()
                if silent > self.hang_after_s:
                    call.cancel()
                    raise RemoteError(
                        f"{self.peer} stopped heartbeating ({silent:.1f} s without one) during a call",
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ) from None
            except grpc.RpcError as e:
                raise RemoteError.from_rpc(e, self.peer) from e

    def open(self, session_id: str, capacity: int, layers: LayerRange, timeout_s: float) -> None:
        req = pb.OpenSessionRequest(session_id=session_id, capacity=capacity, layers=_range(layers))
        self._call(self.stub.OpenSession, req, timeout_s)

    def execute(self, order: pb.WorkOrder, timeout_s: float) -> pb.WorkResult:
        """The order's result, sent in one call with the other sessions' orders waiting."""
        return self.batcher.execute(order, timeout_s)

    def submit(self, order: pb.WorkOrder, timeout_s: float, done: Done[pb.WorkResult]) -> None:
        self.batcher.submit(order, timeout_s, done)

    def _execute_batch(self, orders: list[pb.WorkOrder], timeout_s: float) -> list[pb.WorkResult | Exception]:
        reply = self._call(self.stub.ExecuteBatch, pb.WorkBatch(orders=orders), timeout_s)
        if len(reply.items) != len(orders):  # nothing signed says which result is whose: no evidence
            raise RemoteError(
                f"{self.peer} answered {len(reply.items)} results for {len(orders)} orders",
                grpc.StatusCode.UNAVAILABLE,
            )
        return [self._item(it) for it in reply.items]

    def _item(self, item: pb.BatchItem) -> pb.WorkResult | Exception:
        if not item.code:
            return item.result
        try:
            code = grpc.StatusCode[_CODE_NAMES[item.code]]
        except KeyError:
            code = grpc.StatusCode.UNKNOWN
        return RemoteError(f"{self.peer}: {one_line(item.error)} [{code.name}]", code)

    def close(self, session_id: str, timeout_s: float) -> None:
        self._call(self.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), timeout_s)

    def rollback(self, session_id: str, position: int, timeout_s: float) -> None:
        req = pb.RollbackRequest(session_id=session_id, position=position)
        self._call(self.stub.Rollback, req, timeout_s)

    def assign(self, layers: LayerRange, model_digest: str, timeout_s: float) -> pb.NodeInfo:
        req = pb.AssignLayersRequest(layers=_range(layers), model_digest=model_digest)
        return self._call(self.stub.AssignLayers, req, timeout_s).node

    def shutdown(self) -> None:
        self.channel.close()
