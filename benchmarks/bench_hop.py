"""What one pipeline hop costs apart from compute, on localhost.

For one decode step's hidden-state row of SmolLM2-135M (fp32 [1, 576] by default) it times,
per call, each piece a hop adds on top of the stage's forward:

- the sender: WireTensor.from_torch, to_proto, the WorkOrder's serialisation;
- the signed call: CallSigner.header (SHA-256 of the request, Ed25519 sign) and Gate.verify
  (re-serialisation, SHA-256, Ed25519 verify);
- the worker: decode_hidden (from_proto, to_torch, finiteness), the output's from_torch and
  to_proto, make_receipt (two commitment digests and an Ed25519 signature), the WorkResult's
  serialisation;
- the coordinator: parsing the result, decode_hidden, check_work_receipt (signature verify, the
  output digest);
- and whole round trips through real gRPC servers on 127.0.0.1 that run the same Worker.Execute
  path without a model (the result is the input row, signed): plain text, TLS, TLS with signed
  calls, TLS with calls under a channel MAC (the real setup). Compute is excluded by
  construction. The server runs in a process of its own, as a worker does ("round_trip_us"),
  and also in the client's process, where both ends share one interpreter lock
  ("round_trip_same_process_us", the figure of sessions 4-7), and with --idle-ms of sleep on
  both ends before each call ("round_trip_after_idle_us": what a hop meets in a pipeline, where
  each stage idles while the others compute).

    .venv/bin/python benchmarks/bench_hop.py --out results/bench_hop.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path
from typing import Any

import torch

from consortium.identity.keys import NodeIdentity
from consortium.identity.tls import TlsIdentity
from consortium.transport.auth import (
    AUTH_HEADER,
    MAC_HEADER,
    CallSigner,
    ChannelKey,
    Gate,
    service_name,
    signed,
)
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc
from consortium.transport.rpc import bind, make_channel, make_server, maps_errors
from consortium.transport.tensors import WireTensor, decode_hidden
from consortium.verification.receipts import check_work_receipt, input_digest, make_receipt
from consortium.verification.receipts import to_proto as receipt_proto

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYERS_DIGEST = "ab" * 32


def per_call_us(fn, min_s: float = 0.3, repeats: int = 5) -> float:
    """Best of `repeats` batches (each ~min_s long) of calls, in µs per call."""
    fn()
    n, t = 1, 0.0
    while t < min_s / 10:  # size the batch
        n *= 2
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
    n = max(1, int(n * min_s / 10 / t * 10 / repeats))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def order_for(x: torch.Tensor, step: int = 1) -> pb.WorkOrder:
    return pb.WorkOrder(
        session_id="bench-session-0001",
        step=step,
        stage_index=1,
        layers=pb.LayerRange(start=10, end=20),
        start_position=42,
        input=WireTensor.from_torch(x).to_proto(),
    )


class EchoWorker(pb_grpc.WorkerServicer):
    """Worker.Execute without a model: the worker's own wire path (decode, encode, sign)
    around an identity 'stage', so a round trip measures everything but compute."""

    SERVICE = service_name("Worker")

    def __init__(self, identity: NodeIdentity, dim: int):
        self.identity, self.dim, self.gate = identity, dim, Gate(identity.public_key)

    def authorize(self, name: str, request, key: bytes | None) -> None:
        pass

    @maps_errors
    def Execute(self, request, context):
        return self.run(request)

    def run(self, order: pb.WorkOrder) -> pb.WorkResult:
        inp, x = decode_hidden(order.input, self.dim)
        out = WireTensor.from_torch(x)
        result = pb.WorkResult(
            session_id=order.session_id,
            step=order.step,
            start_position=order.start_position,
            output=out.to_proto(),
        )
        receipt = make_receipt(self.identity, self.identity.node_id, order, LAYERS_DIGEST, inp, out)
        result.receipt.CopyFrom(receipt_proto(receipt))
        return result


class SignedEchoWorker(EchoWorker):
    """The same behind the signed-call gate (verify, authorize, consume), which also opens
    channel keys (the real setup: calls carry a MAC under one)."""

    @maps_errors
    @signed
    def Execute(self, request, context):
        return self.run(request)

    @maps_errors
    @signed
    def OpenChannel(self, request, context, signer):
        key = self.gate.open_channel(signer)
        return pb.OpenChannelResponse(key_id=key.key_id, secret=key.secret)


def _serve(key: bytes, ident: TlsIdentity | None, dim: int, sign: bool, ports) -> None:
    """An echo worker (in a child process: `key` is its raw Ed25519 private key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    torch.set_num_threads(1)
    worker = (SignedEchoWorker if sign else EchoWorker)(
        NodeIdentity(Ed25519PrivateKey.from_private_bytes(key)), dim
    )
    server = make_server(4)
    pb_grpc.add_WorkerServicer_to_server(worker, server)
    ports.put(bind(server, "127.0.0.1", 0, ident))
    server.start()
    server.wait_for_termination()


def round_trip(
    x: torch.Tensor, dim: int, tls: bool, sign: str, seconds: float, apart: bool, idle_s: float = 0.0
) -> dict[str, float]:
    """Median and 10th percentile µs of Execute round trips against an echo worker (its own
    thread pool, as a worker's) in a child process (`apart`) or in this one, with the
    coordinator's checks on each result. sign: '' (unsigned calls), 'interceptor' (CallSigner
    on the channel, Ed25519 signatures), 'metadata' (the same header passed as call metadata: no
    interceptor) or 'mac' (CallSigner under a channel key the worker opened: the coordinator's
    way). idle_s: both ends sleep this long before each call, as a pipeline stage waits for the
    others' compute (untimed)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    worker_id, coord_id = NodeIdentity(key), NodeIdentity.generate()
    ident = TlsIdentity.generate() if tls else None
    ctx = mp.get_context("spawn")  # no fork of a process that runs gRPC
    ports = ctx.Queue()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    child, server = None, None
    if apart:
        child = ctx.Process(target=_serve, args=(raw, ident, dim, bool(sign), ports), daemon=True)
        child.start()
        port = ports.get(timeout=60)
    else:
        server = make_server(4)
        pb_grpc.add_WorkerServicer_to_server(
            (SignedEchoWorker if sign else EchoWorker)(worker_id, dim), server
        )
        port = bind(server, "127.0.0.1", 0, ident)
        server.start()
    try:
        signer = CallSigner(coord_id, worker_id.public_key)
        channel = make_channel(
            f"127.0.0.1:{port}",
            pin=ident.cert_der if ident else None,
            interceptors=(signer,) if sign in ("interceptor", "mac") else (),
        )
        method = f"/{service_name('Worker')}/Execute"
        stub = pb_grpc.WorkerStub(channel)
        if sign == "mac":
            key = stub.OpenChannel(pb.OpenChannelRequest(), timeout=10)
            signer.channel_key = ChannelKey(key.key_id, key.secret)
        times: list[float] = []
        step = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 50:
            step += 1
            order = order_for(x, step)
            want_in = input_digest(
                order.session_id, order.stage_index, order.start_position, WireTensor.from_torch(x)
            )
            if idle_s:
                time.sleep(idle_s)
            t0 = time.perf_counter()
            if sign == "metadata":
                res = stub.Execute(order, timeout=10, metadata=[(AUTH_HEADER, signer.header(method, order))])
            else:
                res = stub.Execute(order, timeout=10)
            out, _ = decode_hidden(res.output, dim)
            check_work_receipt(res.receipt, order, worker_id.public_key, LAYERS_DIGEST, want_in, out)
            times.append((time.perf_counter() - t0) * 1e6)
        channel.close()
    finally:
        if server is not None:
            server.stop(None)
        if child is not None:
            child.kill()
            child.join()
    times = times[10:]  # connection set-up and warm-up
    times.sort()
    return {"median_us": times[len(times) // 2], "p10_us": times[len(times) // 10], "calls": len(times)}


def components(x: torch.Tensor, dim: int) -> dict[str, float]:
    worker_id, coord_id = NodeIdentity.generate(), NodeIdentity.generate()
    signer = CallSigner(coord_id, worker_id.public_key)
    gate = Gate(worker_id.public_key)
    method = f"/{service_name('Worker')}/Execute"
    order = order_for(x)
    wire = WireTensor.from_torch(x)
    order_bytes = order.SerializeToString()
    inp, y = decode_hidden(order.input, dim)
    out = WireTensor.from_torch(y)
    receipt = make_receipt(worker_id, worker_id.node_id, order, LAYERS_DIGEST, inp, out)
    result = pb.WorkResult(session_id=order.session_id, step=1, start_position=42, output=out.to_proto())
    result.receipt.CopyFrom(receipt_proto(receipt))
    result_bytes = result.SerializeToString()
    want_in = input_digest(order.session_id, order.stage_index, order.start_position, wire)
    header = signer.header(method, order)  # verify only: the gate consumes nothing here

    r: dict[str, float] = {}
    r["wire_from_torch"] = per_call_us(lambda: WireTensor.from_torch(x))
    r["wire_to_proto"] = per_call_us(lambda: wire.to_proto())
    r["order_serialize"] = per_call_us(lambda: order.SerializeToString())
    r["order_parse"] = per_call_us(lambda: pb.WorkOrder.FromString(order_bytes))
    r["call_sign_header"] = per_call_us(lambda: signer.header(method, order))
    r["call_gate_verify"] = per_call_us(lambda: gate.verify(method, order, [(AUTH_HEADER, header)]))
    keyed = CallSigner(coord_id, worker_id.public_key)
    keyed.channel_key = gate.open_channel(coord_id.public_key)
    mac = keyed.mac_header(keyed.channel_key, method, order)
    r["call_mac_header"] = per_call_us(lambda: keyed.mac_header(keyed.channel_key, method, order))
    r["call_gate_verify_mac"] = per_call_us(lambda: gate.verify(method, order, [(MAC_HEADER, mac)]))
    r["worker_decode_hidden"] = per_call_us(lambda: decode_hidden(order.input, dim))
    r["worker_output_from_torch_to_proto"] = per_call_us(lambda: WireTensor.from_torch(y).to_proto())
    r["worker_make_receipt"] = per_call_us(
        lambda: make_receipt(worker_id, worker_id.node_id, order, LAYERS_DIGEST, inp, out)
    )
    r["result_serialize"] = per_call_us(lambda: result.SerializeToString())
    r["result_parse"] = per_call_us(lambda: pb.WorkResult.FromString(result_bytes))
    r["coord_decode_hidden"] = per_call_us(lambda: decode_hidden(result.output, dim))
    r["coord_check_receipt"] = per_call_us(
        lambda: check_work_receipt(result.receipt, order, worker_id.public_key, LAYERS_DIGEST, want_in, out)
    )
    # what a hop costs: the coordinator's way (channel MACs), not the signed calls as well
    r["total_components"] = sum(v for k, v in r.items() if k not in ("call_sign_header", "call_gate_verify"))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    ap.add_argument("--rows", type=int, default=1, help="positions per hop (1: a decode step)")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--seconds", type=float, default=3.0, help="per round-trip configuration")
    ap.add_argument("--idle-ms", type=float, default=7.0, help="sleep before each call (after-idle runs)")
    ap.add_argument("--out", default="results/bench_hop.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    x = (torch.randn(a.rows, a.dim, generator=torch.Generator().manual_seed(0)) * 10).to(DTYPES[a.dtype])
    report: dict[str, Any] = {
        "settings": {
            "dim": a.dim,
            "rows": a.rows,
            "dtype": a.dtype,
            "payload_bytes": x.numel() * x.element_size(),
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "components_us": components(x, a.dim),
        "round_trip_us": {},
        "round_trip_same_process_us": {},
        "round_trip_after_idle_us": {},
    }
    print(json.dumps(report["components_us"], indent=1), flush=True)
    configs = [("plaintext", False, ""), ("tls", True, ""), ("tls+signed", True, "interceptor")]
    configs += [("tls+signed_no_interceptor", True, "metadata"), ("tls+mac", True, "mac")]
    for apart, field in ((True, "round_trip_us"), (False, "round_trip_same_process_us")):
        for name, tls, sign in configs:
            report[field][name] = round_trip(x, a.dim, tls, sign, a.seconds, apart)
            print(field, name, json.dumps(report[field][name]), flush=True)
    # the same hop between processes that idle in between, as stages of one session do: caches,
    # threads and (on a VM) the virtual CPU go cold, and the same work takes longer
    for name, tls, sign in (("plaintext", False, ""), ("tls+mac", True, "mac")):
        field = "round_trip_after_idle_us"
        report[field][name] = round_trip(x, a.dim, tls, sign, a.seconds, True, a.idle_ms / 1000)
        print(field, name, json.dumps(report[field][name]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
