"""Real coordinator and worker processes for integration tests: start them, add one more
worker, find leftovers, and wait for a condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from consortium.coordinator.client import Client
from consortium.coordinator.launcher import LocalCluster, LocalProcess
from consortium.core.config import LayerRange
from consortium.identity import NodeIdentity
from consortium.identity.tls import CERT_FILE, TlsIdentity, bind_cert
from consortium.transport.auth import CallSigner, CoordinatorLink, signed_registration
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import make_channel

STARTUP_S = 240.0  # three Python processes importing torch on a busy 2-core machine
T = TypeVar("T")


def start_cluster(
    request,
    model: Path,
    log_dir: Path,
    coordinator_layers: LayerRange | None,
    worker_layers: list[LayerRange | None],
    complete: bool = True,
    **kw: Any,
) -> LocalCluster:
    """A started LocalCluster, stopped by a finalizer of `request` whatever the test does."""
    cluster = LocalCluster(model, coordinator_layers, worker_layers, log_dir, **kw)
    request.addfinalizer(cluster.stop)
    cluster.start(timeout_s=STARTUP_S, complete=complete)
    return cluster


# (the coordinator's layers, the workers') of the three-process clusters the tests run
TINY_SPLIT = (LayerRange(2, 4), [LayerRange(0, 1), LayerRange(1, 2)])
SMOLLM_SPLIT = (LayerRange(20, 30), [LayerRange(0, 10), LayerRange(10, 20)])


def ledger_cluster(
    request, model: Path, tmp_path: Path, split, coordinator_args=(), worker_args=(), **kw: Any
) -> tuple[LocalCluster, Path]:
    """A started three-process cluster on `model` split as `split`, its ledger at tmp_path/ledger.db
    and its logs in tmp_path/logs; (cluster, ledger path)."""
    ledger = tmp_path / "ledger.db"
    cluster = start_cluster(
        request,
        model,
        tmp_path / "logs",
        *split,
        coordinator_args=["--ledger", str(ledger), *coordinator_args],
        worker_args=list(worker_args),
        **kw,
    )
    return cluster, ledger


def add_worker(cluster: LocalCluster, name: str, model: Path, log_file: Path, *args: str) -> LocalProcess:
    """Starts one more worker `name` of `cluster` (stopped with it); it binds a port of its own
    choosing and reports it (LocalProcess.wait_port)."""
    p = LocalProcess(
        name,
        [
            "worker",
            "start",
            "--coordinator",
            cluster.address,
            "--model",
            str(model),
            "--node-id",
            name,
            *cluster.trust_args(),
            *args,
        ],
        log_file,
    )
    cluster.processes.append(p)
    p.start(dict(os.environ, PYTHONUNBUFFERED="1"))
    return p


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, what: str | Callable[[], str] = "condition"
) -> T:
    """Polls `predicate` until it returns something true (returned) or `timeout` seconds pass
    (AssertionError naming `what`, called for the message if callable)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}"
            )
        time.sleep(0.1)


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains `text` (e.g. a cluster's log folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def node_info(cluster: LocalCluster, node_id: str) -> pb.NodeInfo:
    """A node as the coordinator's full status shows it (address, public key, TLS certificate)."""
    with Client(cluster.client_config()) as client:
        st = client.stub.GetStatus(pb.ClusterStatusRequest(), timeout=30)
    return next(ns.node for ns in st.nodes if ns.node.node_id == node_id)


def worker_stub(
    cluster: LocalCluster, node_id: str, identity: NodeIdentity | None = None, max_message_bytes: int = 2**22
):
    """(channel, WorkerStub) to worker `node_id` over TLS pinned to its certificate, every call
    signed by `identity` for it: by default the cluster's coordinator (its key from its data
    directory), i.e. the calls the coordinator itself makes."""
    info = node_info(cluster, node_id)
    identity = identity or NodeIdentity.load(cluster.coordinator_dir / "node.key")
    signer = CallSigner(identity, audience=bytes(info.public_key))
    pin = None if cluster.insecure else bytes(info.tls_cert)
    channel = make_channel(info.address, max_message_bytes, pin=pin, interceptors=(signer,))
    return channel, pb_grpc.WorkerStub(channel)


def coordinator_link(
    cluster: LocalCluster, identity: NodeIdentity | None = None, max_message_bytes: int = 2**22
) -> CoordinatorLink:
    """A channel to the cluster's coordinator pinned to its certificate, calls signed by
    `identity` (default: a fresh key, a stranger's) once its key is known (challenged here)."""
    cert = None if cluster.insecure else str(cluster.coordinator_dir / CERT_FILE)
    link = CoordinatorLink(
        cluster.address,
        identity or NodeIdentity.generate(),
        cluster.insecure,
        cert,
        None,
        max_message_bytes,
        30,
    )
    link.challenge()
    return link


def signed_register(link: CoordinatorLink, identity: NodeIdentity, **fields: Any) -> pb.RegisterRequest:
    """A registration of NodeInfo(**fields) answering a fresh challenge, signed by `identity`,
    with a TLS certificate bound to it unless `fields` say otherwise."""
    if "tls_cert" not in fields:
        fields["tls_cert"] = TlsIdentity.generate().cert_der
        fields.setdefault("tls_binding", bind_cert(identity, fields["tls_cert"]))
    return signed_registration(identity, link.challenge(), pb.NodeInfo(**fields))
