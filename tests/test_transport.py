"""Wire tensors: lossless round trips, every validation error, and stubs in sync with the proto."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import grpc
import pytest
import torch

from consortium.errors import CacheError, ConsortiumError, InvalidRequestError
from consortium.model.kv_pool import UnknownSessionError
from consortium.transport import codegen
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import (
    SERVER_ERROR_KEY,
    NotFoundError,
    OutOfRangeError,
    PreconditionError,
    RemoteError,
    abort_for,
    bind,
    check_address,
    free_port,
    make_channel,
    make_server,
    maps_errors,
    status_for,
)
from consortium.transport.tensors import (
    TensorError,
    WireTensor,
    check_hidden,
    check_logits,
    decode_hidden,
    decode_logits,
    decode_tokens,
    grpc_message_options,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_round_trip_is_bit_exact(dtype):
    x = (torch.randn(5, 64) * 100).to(dtype)
    w = WireTensor.from_torch(x)
    assert w.nbytes == 5 * 64 * x.element_size() and w.shape == (5, 64)
    msg = pb.Tensor.FromString(w.to_proto().SerializeToString())
    back, t = decode_hidden(msg, dim=64)
    assert back == w and t.dtype == dtype
    assert torch.equal(
        t.view(torch.int16 if x.element_size() == 2 else torch.int32),
        x.view(torch.int16 if x.element_size() == 2 else torch.int32),
    )


def test_tokens_round_trip_and_digest():
    w = WireTensor.from_tokens([1, 2, 300])
    _, t = decode_tokens(w.to_proto(), vocab_size=301)
    assert t.tolist() == [1, 2, 300]
    assert (
        w.digest()
        == WireTensor.from_tokens([1, 2, 300]).digest()
        != WireTensor.from_tokens([1, 2, 3]).digest()
    )


def _tensor(dtype=pb.DTYPE_FP32, shape=(2, 8), data=None) -> pb.Tensor:
    n = 1
    for s in shape:
        n *= max(s, 0)
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(4 * n) if data is None else data)


@pytest.mark.parametrize(
    "msg, match",
    [
        (_tensor(dtype=pb.DTYPE_UNSPECIFIED), "unsupported tensor dtype 0"),
        (_tensor(dtype=17), "unsupported tensor dtype 17"),
        (_tensor(data=bytes(63)), r"63 bytes; shape \[2, 8\] of fp32 needs 64"),
        (_tensor(shape=(2, 8, 1)), "rank 3"),
        (_tensor(shape=()), "rank 0"),
        (_tensor(shape=(-2, -8), data=b""), "negative dimension"),
    ],
)
def test_malformed_tensors_are_rejected(msg, match):
    with pytest.raises(TensorError, match=match):
        WireTensor.from_proto(msg)


def test_hidden_checks():
    with pytest.raises(TensorError, match="hidden size 8 does not match the model's 16"):
        decode_hidden(_tensor(), dim=16)
    with pytest.raises(TensorError, match="must be a float"):
        decode_hidden(WireTensor.from_tokens([1, 2]).to_proto(), dim=2)
    with pytest.raises(TensorError, match="no positions"):
        decode_hidden(_tensor(shape=(0, 8), data=b""), dim=8)
    with pytest.raises(TensorError, match="at most 1 fit"):
        decode_hidden(_tensor(), dim=8, max_rows=1)
    bad = torch.zeros(2, 8)
    bad[1, 3] = float("nan")
    with pytest.raises(TensorError, match="NaN or Inf"):
        decode_hidden(WireTensor.from_torch(bad).to_proto(), dim=8)


def test_token_and_logit_checks():
    with pytest.raises(TensorError, match="token id 50 outside the vocabulary"):
        decode_tokens(WireTensor.from_tokens([1, 50]).to_proto(), vocab_size=50)
    with pytest.raises(TensorError, match="token id -1"):
        decode_tokens(WireTensor.from_tokens([-1]).to_proto(), vocab_size=50)
    with pytest.raises(TensorError, match="int64"):
        decode_tokens(_tensor(), vocab_size=50)
    with pytest.raises(TensorError, match=r"expected fp32 logits \[1, 8\]"):
        decode_logits(_tensor(), vocab_size=8, rows=1)
    assert isinstance(TensorError("x"), InvalidRequestError)


def test_the_coordinators_own_logits_are_checked_as_a_workers_are():
    """Its last stage's logits skip the wire (no encoding, no copy) but not the checks."""
    good = torch.randn(1, 8)
    assert check_logits(good, vocab_size=8, rows=1) is good
    _, wired = decode_logits(WireTensor.from_torch(good).to_proto(), vocab_size=8, rows=1)
    assert torch.equal(wired, good)
    for bad, match in [
        (torch.randn(2, 8), r"expected fp32 logits \[1, 8\]"),
        (torch.randn(1, 9), r"expected fp32 logits \[1, 8\]"),
        (torch.randn(1, 8, dtype=torch.float64), "torch.float64"),
        (torch.tensor([[0.0] * 7 + [float("inf")]]), "NaN or Inf"),
    ]:
        with pytest.raises(TensorError, match=match):
            check_logits(bad, vocab_size=8, rows=1)
    hidden = torch.randn(3, 8)
    assert check_hidden(hidden, dim=8) == WireTensor.from_torch(hidden)  # encoded once, for the next stage
    for bad, match in [
        (torch.randn(3, 9), "hidden size 9"),
        (torch.randn(8), r"float \[S, 8\]"),
        (torch.tensor([[0.0] * 7 + [float("nan")]]), "NaN or Inf"),
    ]:
        with pytest.raises(TensorError, match=match):
            check_hidden(bad, dim=8)


def test_message_size_is_bounded_both_ways():
    opts = dict(grpc_message_options(1234))
    assert opts == {"grpc.max_send_message_length": 1234, "grpc.max_receive_message_length": 1234}


def test_status_codes_of_library_errors():
    assert status_for(UnknownSessionError("x")) == grpc.StatusCode.NOT_FOUND
    assert status_for(NotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert status_for(PreconditionError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(OutOfRangeError("x")) == grpc.StatusCode.OUT_OF_RANGE
    assert status_for(TensorError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(CacheError("over budget")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(ConsortiumError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(KeyError("bug")) == grpc.StatusCode.INTERNAL


def test_addresses_are_checked():
    assert check_address("10.0.0.1:50051") == "10.0.0.1:50051"
    for bad in ("localhost", ":50051", "host:0", "host:port", "host:70000"):
        with pytest.raises(ConsortiumError, match="expected host:port"):
            check_address(bad)
    assert "cannot reach" in str(RemoteError("cannot reach x"))


def test_committed_stubs_match_the_proto():
    """Regenerating from proto/consortium.proto with grpc_tools changes nothing."""
    assert codegen.stale_files() == [], "stubs are stale: run python -m consortium.transport.codegen"


def test_stubs_pass_the_runtime_version_checks():
    """The generated code imports without protobuf/grpc version warnings or errors."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import consortium.transport.proto.consortium_pb2_grpc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_an_error_the_peer_sends_is_not_mistaken_for_an_unreachable_peer():
    """The coordinator relays a dead worker as UNAVAILABLE; the client must say what the
    coordinator said, not that it cannot reach the coordinator."""

    def fail(request, context):
        abort_for(
            context,
            RemoteError(
                "cannot reach node w1 at 127.0.0.1:9 (connection refused)", grpc.StatusCode.UNAVAILABLE
            ),
        )

    with _serve({"Fail": grpc.unary_unary_rpc_method_handler(fail)}) as channel:
        call = channel.unary_unary("/t.T/Fail")
        with pytest.raises(grpc.RpcError) as e:
            call(b"", timeout=5)
        err = RemoteError.from_rpc(e.value, "coordinator at here")
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert str(err) == (
            "coordinator at here: cannot reach node w1 at 127.0.0.1:9 (connection refused) [UNAVAILABLE]"
        )
    dead = make_channel(f"127.0.0.1:{free_port()}").unary_unary("/t.T/Fail")
    with pytest.raises(grpc.RpcError) as e:
        dead(b"", timeout=5)
    assert str(RemoteError.from_rpc(e.value, "coordinator at there")).startswith(
        "cannot reach coordinator at there"
    )


@contextlib.contextmanager
def _serve(handlers: dict):
    """A real server with `handlers` under service t.T; yields a channel to it."""
    server = make_server(2)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = bind(server, "127.0.0.1", 0)
    server.start()
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(0)


class _Servicer:
    def __init__(self, error: Exception):
        self.error = error

    @maps_errors
    def Unary(self, request, context):
        if request == b"fail":
            raise self.error
        return b"ok:" + request

    @maps_errors
    def Stream(self, request, context):
        yield b"a"
        yield b"b"
        if request == b"fail":
            raise self.error

    @maps_errors
    def Nested(self, request, context):  # an inner mapping already ended the call: its status stands
        return self.Unary(b"fail", context)


@pytest.mark.parametrize(
    "error, code, details",
    [
        (NotFoundError("unknown session 'x'"), grpc.StatusCode.NOT_FOUND, "unknown session 'x'"),
        (OutOfRangeError("positions  9..12\nexceed"), grpc.StatusCode.OUT_OF_RANGE, "positions 9..12 exceed"),
        (KeyError("bug"), grpc.StatusCode.INTERNAL, "internal error: KeyError: 'bug'"),
    ],
)
def test_maps_errors_ends_unary_and_streaming_calls_with_the_mapped_status(error, code, details):
    s = _Servicer(error)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(s.Unary),
        "Stream": grpc.unary_stream_rpc_method_handler(s.Stream),
        "Nested": grpc.unary_unary_rpc_method_handler(s.Nested),
    }
    with _serve(handlers) as channel:
        unary, stream = channel.unary_unary("/t.T/Unary"), channel.unary_stream("/t.T/Stream")
        assert unary(b"x", timeout=5) == b"ok:x" and list(stream(b"x", timeout=5)) == [b"a", b"b"]
        got = []
        for call in (
            lambda: unary(b"fail", timeout=5),
            lambda: got.extend(stream(b"fail", timeout=5)),
            lambda: channel.unary_unary("/t.T/Nested")(b"", timeout=5),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert (e.value.code(), e.value.details()) == (code, details)
            assert dict(e.value.trailing_metadata())[SERVER_ERROR_KEY] == "1"  # marked as the server's own
        assert got == [b"a", b"b"]  # the stream's events before the error arrived


def test_token_ids_travel_as_a_tensor_of_them_would():
    for ids in ([], [7], [0, 49151, 2**40, 3]):
        assert WireTensor.from_tokens(ids) == WireTensor.from_torch(torch.tensor(ids, dtype=torch.int64))
        assert WireTensor.from_tokens(ids).to_torch().tolist() == ids
