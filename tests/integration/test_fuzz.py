"""A bounded property-based fuzz of every RPC of a real coordinator and worker (issue 10).

Messages are built from the proto descriptors: every field, extreme integers, NaN/Inf floats,
odd strings, random tensors. Worker calls are signed as the coordinator signs them (so they
reach the handlers, not just the signature check); coordinator calls come from a stranger.
Whatever arrives, the answer is a status that names the problem, never INTERNAL or UNKNOWN;
both processes stay alive, and a normal session afterwards equals the single-node tokens.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message_factory import GetMessageClass
from helpers.cluster import coordinator_link, start_cluster, worker_stub
from helpers.inprocess import single_node_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consortium.core.config import LayerRange, SessionRequest
from consortium.model.sampling import SamplingParams
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.proto import consortium_pb2_grpc as pb_grpc

BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
DIM = 256  # the tiny model's hidden size
INTS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_ENUM: (-3, 8),
}
FUZZ = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


def _scalar(fd, depth: int) -> st.SearchStrategy:
    if fd.type in INTS:
        lo, hi = INTS[fd.type]
        return st.one_of(st.sampled_from([lo, hi, 0, 1, max(lo, -1)]), st.integers(lo, hi))
    if fd.type == F.TYPE_BOOL:
        return st.booleans()
    if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(width=32 if fd.type == F.TYPE_FLOAT else 64)  # NaN and Inf included
    if fd.type == F.TYPE_STRING:
        return st.text(max_size=200)
    if fd.type == F.TYPE_BYTES:
        return st.binary(max_size=4096)
    return messages(fd.message_type, depth + 1)


def messages(desc, depth: int = 0) -> st.SearchStrategy:
    """Any message of type `desc`: each field absent or set to an arbitrary value."""
    fields = {}
    for fd in desc.fields:
        if fd.type == F.TYPE_MESSAGE and depth >= 2:
            continue
        value = _scalar(fd, depth)
        fields[fd.name] = st.none() | (st.lists(value, max_size=3) if fd.is_repeated else value)
    cls = GetMessageClass(desc)

    def build(values: dict):
        m = cls()
        for name, v in values.items():
            if v is None:
                continue
            if isinstance(v, list):
                target = getattr(m, name)
                for item in v:
                    target.append(item) if not hasattr(item, "DESCRIPTOR") else target.add().CopyFrom(item)
            elif hasattr(v, "DESCRIPTOR"):
                getattr(m, name).CopyFrom(v)
            else:
                setattr(m, name, v)
        return m

    return st.fixed_dictionaries(fields).map(build)


def _call(method, request, streaming: bool) -> grpc.StatusCode:
    try:
        if streaming:
            stream = method(request, timeout=30)
            try:
                next(stream)  # the first event or the refusal; then leave
            finally:
                stream.cancel()
        else:
            method(request, timeout=30)
        return grpc.StatusCode.OK
    except StopIteration:
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@pytest.fixture(scope="module")
def fuzz_cluster(request, tiny_gguf, tmp_path_factory):
    return start_cluster(
        request,
        tiny_gguf,
        tmp_path_factory.mktemp("fuzz"),
        LayerRange(2, 4),
        [LayerRange(0, 1), LayerRange(1, 2)],
    )


def _methods(service: str):
    return [
        (m.name, m.input_type, m.server_streaming) for m in pb.DESCRIPTOR.services_by_name[service].methods
    ]


@pytest.mark.parametrize(
    ("name", "desc", "streaming"), _methods("Worker"), ids=lambda x: getattr(x, "name", x)
)
def test_fuzzed_worker_calls_get_a_status_never_internal(fuzz_cluster, name, desc, streaming):
    channel, stub = worker_stub(fuzz_cluster, "worker-1", max_message_bytes=8 * 2**20)
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(messages(desc))
    def fuzz(msg):
        code = _call(getattr(stub, name), msg, streaming)
        assert code not in BAD, (name, code, msg)
        seen.add(code)

    try:
        fuzz()
    finally:
        channel.close()
    assert seen  # the calls got answers


def test_fuzzed_work_on_an_open_session_gets_a_status_never_internal(fuzz_cluster):
    """Orders for a session the worker holds, its layers, near its cache: the tensor, positions,
    step and flags are what varies, so the checks past the session lookup are fuzzed too."""
    channel, stub = worker_stub(fuzz_cluster, "worker-1", max_message_bytes=8 * 2**20)
    layers = pb.LayerRange(start=1, end=2)
    stub.OpenSession(pb.OpenSessionRequest(session_id="fuzz", capacity=64, layers=layers), timeout=30)
    junk = st.builds(
        pb.Tensor,
        dtype=st.integers(-1, 6),
        shape=st.lists(st.integers(-2, 300), max_size=3),
        data=st.binary(max_size=4096),
    )
    hidden = st.integers(1, 3).map(  # well-formed hidden states: the order reaches the forward pass
        lambda n: pb.Tensor(dtype=pb.DTYPE_FP32, shape=[n, DIM], data=b"\x00" * (n * DIM * 4))
    )
    tensors = junk | hidden
    orders = st.builds(
        pb.WorkOrder,
        session_id=st.just("fuzz"),
        step=st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
        layers=st.just(layers),
        start_position=st.just(0) | st.integers(-1, 3),
        input=tensors,
        all_logits=st.booleans(),
    )
    seen: set[grpc.StatusCode] = set()

    @settings(FUZZ, max_examples=60)
    @given(orders, st.just(0) | st.integers(-(2**63), 2**63 - 1))
    def fuzz(order, back_to):
        seen.add(_call(stub.Execute, order, False))
        seen.add(_call(stub.Rollback, pb.RollbackRequest(session_id="fuzz", position=back_to), False))
        assert not seen & BAD, (seen, order)

    @settings(FUZZ, max_examples=30)
    @given(st.lists(orders, min_size=1, max_size=3))
    def fuzz_batch(batch):
        """The same orders in one ExecuteBatch: the call and every order in it get a status."""
        try:
            reply = stub.ExecuteBatch(pb.WorkBatch(orders=batch), timeout=30)
        except grpc.RpcError as e:
            seen.add(e.code())
            return
        assert len(reply.items) == len(batch)
        codes = {next(c for c in grpc.StatusCode if c.value[0] == it.code) for it in reply.items}
        assert not codes & BAD, (codes, batch)
        seen.update(codes)

    try:
        fuzz()
        fuzz_batch()
    finally:
        channel.close()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen


@pytest.mark.parametrize(
    ("name", "desc", "streaming"), _methods("Coordinator"), ids=lambda x: getattr(x, "name", x)
)
def test_fuzzed_coordinator_calls_get_a_status_never_internal(fuzz_cluster, name, desc, streaming):
    link = coordinator_link(fuzz_cluster)  # a stranger with a key of its own
    stub = pb_grpc.CoordinatorStub(link.channel)

    @FUZZ
    @given(messages(desc))
    def fuzz(msg):
        code = _call(getattr(stub, name), msg, streaming)
        assert code not in BAD, (name, code, msg)

    try:
        fuzz()
    finally:
        link.channel.close()


def test_after_the_fuzz_both_stay_alive_and_a_session_equals_single_node(fuzz_cluster, client_for, tiny_gguf):
    for p in fuzz_cluster.processes:
        p.check_running()
    client = client_for(fuzz_cluster)
    st_ = client.cluster_status()
    assert all(n["alive"] for n in st_["nodes"]) and st_["route"]
    greedy = SamplingParams()
    r = client.run(SessionRequest("The fuzz is over.", 12, greedy, audit_probability=1.0))
    assert r.tokens == single_node_tokens(tiny_gguf, "The fuzz is over.", 12, greedy)
    assert r.audits.failed == 0 and r.banned_nodes == []
