"""Who recomputes an audited stage: the coordinator itself (`LocalTarget`) or another node
holding the layers (`RemoteTarget`). Both keep a KV cache of the rows already verified, so
each audit of a session's stage recomputes only the rows since the previous one."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import Tensor

from consortium.coordinator.registry import Node
from consortium.coordinator.stages import StageHandle
from consortium.core.config import LayerRange
from consortium.errors import ConsortiumError
from consortium.model.gguf_file import ModelArgs
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.tensors import TensorError, WireTensor, decode_hidden, decode_logits
from consortium.verification.audit import LocalAuditor, Representation
from consortium.verification.receipts import ReceiptError
from consortium.verification.tolerance import class_of

log = logging.getLogger(__name__)
AUDIT_TIMEOUT_S = 300.0  # one remote audit call (a recompute of up to the whole context)
# checks a remote auditor's signed result like any work result; raises ReceiptError
ResultCheck = Callable[[pb.WorkOrder, pb.WorkResult, WireTensor, WireTensor], None]


class AuditorLost(Exception):
    """The remote auditor died, hung, or sent a result that does not check out."""


def audit_session_id(session_id: str, stage: int) -> str:
    """The session id under which a remote auditor keeps its cache of a session's stage."""
    return f"{session_id}.audit{stage}"


class LocalTarget:
    """The coordinator audits a stage itself: its own copy of the layers in the representation
    the audited stage declares (LocalAuditor), a KV cache of the rows it has verified. Raises
    AuditRefused when the auditor's memory budget cannot hold them."""

    remote = False

    def __init__(self, auditor: LocalAuditor, layers: LayerRange, capacity: int, declared: Representation):
        self.lease = auditor.open(layers.start, layers.end, declared, capacity)
        self.stage, self.cache, self.rep = self.lease.stage, self.lease.cache, self.lease.rep
        self.node_id = auditor.node_id

    @property
    def klass(self) -> str:
        """The numeric class of this auditor's results (tolerance.py)."""
        return self.rep.klass

    @property
    def length(self) -> int:
        return self.cache.length

    def open(self) -> None:
        pass

    def extend(self, x: Tensor) -> Tensor:
        return self.stage(x, self.cache, all_logits=self.stage.is_last)

    def truncate(self, n: int) -> None:
        self.cache.truncate(min(self.cache.length, n))

    def close(self) -> None:
        self.lease.close()  # the stage stays loaded for reuse, no longer held against the budget


class RemoteTarget:
    """Another node holding the stage's layers audits it (DESIGN.md §4: preferably on another
    backend). It runs the committed inputs as work orders of a session of its own, keeping the
    verified rows in its KV cache like the local auditor; its results are signed and checked
    like any work result. A mismatch it reports is confirmed by the coordinator before anyone
    is called a cheat (a lying auditor must not get an honest node banned)."""

    remote = True

    def __init__(
        self,
        handle: StageHandle,
        node: Node,
        session_id: str,
        stage: int,
        layers: LayerRange,
        capacity: int,
        args: ModelArgs,
        check: ResultCheck,
    ):
        self.handle, self.node_id = handle, node.node_id
        self.klass = class_of(node.dtype, node.packed)  # of the results it returns
        self.session_id, self.stage, self.layers = audit_session_id(session_id, stage), stage, layers
        self.args, self.check, self.capacity = args, check, capacity
        self.is_last = layers.end == args.n_layers
        self.length, self.steps = 0, 0

    def open(self) -> None:
        """Opens the audit session on the node (after the target is known to the coordinator, so
        that a heartbeat in between does not tell the node to drop it)."""
        try:
            self.handle.open(self.session_id, self.capacity, self.layers, AUDIT_TIMEOUT_S)
        except ConsortiumError as e:
            raise AuditorLost(str(e)) from e

    def extend(self, x: Tensor) -> Tensor:
        xw = WireTensor.from_torch(x)
        order = pb.WorkOrder(
            session_id=self.session_id,
            step=self.steps,
            stage_index=self.stage,
            layers=pb.LayerRange(start=self.layers.start, end=self.layers.end),
            start_position=self.length,
            input=xw.to_proto(),
            all_logits=self.is_last,
        )
        try:
            res = self.handle.execute(order, AUDIT_TIMEOUT_S)
            if self.is_last:
                out, y = decode_logits(res.output, self.args.vocab_size, rows=xw.rows)
            else:
                out, y = decode_hidden(res.output, self.args.dim)
                if out.rows != xw.rows:
                    raise TensorError(f"{out.rows} rows for {xw.rows}")
            self.check(order, res, xw, out)
        except (ConsortiumError, ReceiptError) as e:
            raise AuditorLost(str(e)) from e
        self.length += xw.rows
        self.steps += 1
        return y

    def truncate(self, n: int) -> None:
        if n < self.length:
            try:
                self.handle.rollback(self.session_id, n, 10.0)
            except ConsortiumError as e:
                raise AuditorLost(str(e)) from e
            self.length = n

    def close(self) -> None:
        try:
            self.handle.close(self.session_id, 2.0)
        except ConsortiumError as e:
            log.info("closing audit session %s on %s: %s", self.session_id, self.node_id, e)


Target = LocalTarget | RemoteTarget
