"""gRPC plumbing shared by coordinator, workers and clients: channels, servers, status codes.

Servers map library errors to status codes in one table (`abort_for`, applied to a servicer
method by `@maps_errors`); clients turn a failed call back into a one-line ConsortiumError
(`RemoteError.from_rpc`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from consortium.errors import CacheError, ConsortiumError, InvalidRequestError
from consortium.identity.tls import SERVER_NAME, TlsIdentity, TrustError, der_to_pem
from consortium.model.kv_pool import UnknownSessionError
from consortium.transport.tensors import DEFAULT_MAX_MESSAGE_BYTES, grpc_message_options

log = logging.getLogger(__name__)


SERVER_ERROR_KEY = "consortium-error"  # trailing metadata of every status our servers send


class NotFoundError(ConsortiumError):
    """Unknown session or node (NOT_FOUND)."""


class PreconditionError(ConsortiumError):
    """The request is well formed but the state does not allow it (FAILED_PRECONDITION)."""


class PermissionDeniedError(ConsortiumError):
    """A node whose key is not admitted, or a banned node (PERMISSION_DENIED)."""


class UnauthenticatedError(ConsortiumError):
    """A call without a valid, fresh, unreplayed signature or registration proof (UNAUTHENTICATED)."""


class OutOfRangeError(ConsortiumError):
    """Positions beyond what the session reserved (OUT_OF_RANGE)."""


class RemoteError(ConsortiumError):
    """A call to another process failed; `code` is the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, peer: str) -> RemoteError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else str(e)) or ""
        metadata = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
        if metadata.get(SERVER_ERROR_KEY):  # the peer answered with an error (e.g. a worker it relays)
            text = f"{peer}: {one_line(details)} [{code.name}]"
        elif code == grpc.StatusCode.UNAVAILABLE:
            reason = "connection refused" if "onnection refused" in details else one_line(details, 200)
            text = f"cannot reach {peer} ({reason or 'unavailable'})"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            text = f"{peer} did not answer in time"
        else:
            text = f"{peer}: {one_line(details)} [{code.name}]"
        return cls(text, code)


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Order matters: the first matching class wins (subclasses before their bases).
_STATUS_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (UnknownSessionError, grpc.StatusCode.NOT_FOUND),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CacheError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RemoteError, grpc.StatusCode.UNAVAILABLE),
    (ConsortiumError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def abort_for(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status for `exc` (raises, as context.abort does)."""
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error")
        message = f"internal error: {type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    # Marks the status as ours: the client then tells "the peer said UNAVAILABLE" (a node behind
    # it is down) from "the peer cannot be reached".
    context.set_trailing_metadata(((SERVER_ERROR_KEY, "1"),))
    context.abort(code, one_line(message, 2000))


def maps_errors(method: Callable) -> Callable:
    """Decorates a servicer method `(self, request, context)`: an exception it raises ends the
    call through `abort_for`. For a streaming (generator) method, an exception raised while the
    response is iterated is mapped too, after the events already yielded."""

    def _abort(context: grpc.ServicerContext, e: Exception) -> None:
        if context.code() is not None:  # already aborted (e.g. by an inner mapping): keep that status
            raise e
        abort_for(context, e)

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:
                _abort(context, e)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort(context, e)

    return unary


def make_server(max_workers: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=grpc_message_options(max_message_bytes) + [("grpc.so_reuseport", 0)],
    )


def bind(server: grpc.Server, host: str, port: int, tls: TlsIdentity | None = None) -> int:
    """Binds host:port (0 = any free port), with TLS unless `tls` is None (--insecure); a clear
    error if the port is taken."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(target)
        else:
            bound = server.add_secure_port(target, grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)]))
    except RuntimeError as e:
        raise ConsortiumError(f"cannot listen on {target}: {e}") from e
    if bound == 0:
        raise ConsortiumError(f"cannot listen on {target} (port in use?)")
    return bound


def make_channel(
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    pin: bytes | None = None,
    interceptors: Sequence[grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor] = (),
) -> grpc.Channel:
    """A channel to `address`: TLS whose only trusted root is `pin` (the DER certificate the peer
    must present), or plain text when `pin` is None."""
    options = grpc_message_options(max_message_bytes)
    if pin is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=der_to_pem(pin))
        channel = grpc.secure_channel(
            address, creds, options=[*options, ("grpc.ssl_target_name_override", SERVER_NAME)]
        )
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def fetch_cert(address: str, peer: str, timeout_s: float) -> bytes:
    """The DER certificate the TLS server at `address` presents, NOT verified (the caller compares
    it with a pin); retries while the server is not up, for `timeout_s`."""
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with (
                socket.create_connection(
                    (host.strip("[]"), int(port)), timeout=max(0.2, deadline - time.monotonic())
                ) as raw,
                ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s,
            ):
                return s.getpeercert(binary_form=True)
        except ssl.SSLError as e:
            raise TrustError(
                f"{peer} does not speak TLS ({e.reason or e}): one started with --insecure needs --insecure here too"
            ) from None
        except OSError as e:
            if time.monotonic() >= deadline:
                reason = (
                    "connection refused" if isinstance(e, ConnectionRefusedError) else (e.strerror or str(e))
                )
                raise RemoteError(f"cannot reach {peer} ({reason})", grpc.StatusCode.UNAVAILABLE) from None
            time.sleep(0.2)


def check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConsortiumError(f"bad address {address!r}: expected host:port")
    return address


def wait_ready(channel: grpc.Channel, address: str, timeout_s: float) -> None:
    """Waits until a gRPC server answers at `address`.

    Probes with a call to a method nobody serves, waiting for the connection: UNIMPLEMENTED
    means a server is there. (grpc.channel_ready_future leaves a polling thread that fails
    noisily when the channel closes soon after.)"""
    probe = channel.unary_unary(
        "/consortium.v1.Probe/Ping", request_serializer=bytes, response_deserializer=bytes
    )
    try:
        probe(b"", timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            return
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise RemoteError(
                f"cannot reach {address} (no answer within {timeout_s:g} s)", grpc.StatusCode.UNAVAILABLE
            ) from e
        raise RemoteError.from_rpc(e, address) from e


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for launching local processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_address_towards(address: str) -> str:
    """This machine's IP on the route to `address` (what a peer there can dial back)."""
    host = address.rpartition(":")[0].strip("[]")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
