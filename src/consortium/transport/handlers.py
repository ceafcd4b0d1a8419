"""Registers a servicer with request parsing under our control.

grpc's generated `add_*Servicer_to_server` parse requests inside grpc: an unparseable
message becomes INTERNAL with a traceback in the log, so a stranger can flood the logs.
Here a message that does not parse is answered INVALID_ARGUMENT and logged in one line,
at most once per LOG_EVERY_S per method.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError, Message

from consortium.transport.proto import consortium_pb2 as pb

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0


class _Unparseable:
    def __init__(self, error: str):
        self.error = error


def _parser(message: type[Message]) -> Callable[[bytes], Message | _Unparseable]:
    def parse(data: bytes) -> Message | _Unparseable:
        try:
            return message.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as e:  # never raise inside grpc
            return _Unparseable(str(e) or type(e).__name__)

    return parse


class _Throttle:
    """One log line per key per period, with the count of those it swallowed."""

    def __init__(self, period_s: float):
        self.period_s, self._last, self._count = period_s, {}, {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> int | None:
        now = time.monotonic()
        with self._lock:
            self._count[key] = self._count.get(key, 0) + 1
            if now - self._last.get(key, -self.period_s) < self.period_s:
                return None
            self._last[key] = now
            return self._count.pop(key)


def _guarded(name: str, method: Callable, throttle: _Throttle, streaming: bool) -> Callable:
    def refuse(request: _Unparseable, context: grpc.ServicerContext) -> None:
        n = throttle(name)
        if n is not None:
            log.warning(
                "unparseable %s request from %s (%d since the last report): %s",
                name,
                context.peer(),
                n,
                request.error,
            )
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unparseable {name} request")

    if streaming:

        def stream(request, context):
            if isinstance(request, _Unparseable):
                refuse(request, context)
            yield from method(request, context)

        return stream

    def unary(request, context):
        if isinstance(request, _Unparseable):
            refuse(request, context)
        return method(request, context)

    return unary


def add_servicer(server: grpc.Server, servicer: object, service: str) -> None:
    """Registers `servicer`'s methods for the proto service named `service` (e.g. "Worker")."""
    desc = pb.DESCRIPTOR.services_by_name[service]
    throttle = _Throttle(LOG_EVERY_S)
    handlers = {}
    for m in desc.methods:
        request, response = (pb.__dict__[t.name] for t in (m.input_type, m.output_type))
        kind = (
            grpc.unary_stream_rpc_method_handler
            if m.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[m.name] = kind(
            _guarded(m.name, getattr(servicer, m.name), throttle, m.server_streaming),
            request_deserializer=_parser(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
