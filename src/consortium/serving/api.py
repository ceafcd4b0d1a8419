"""The OpenAI-compatible HTTP API, /health, /metrics and the status page, on Starlette.

Handlers call the Coordinator in-process (no gRPC hop): `new_session` in a worker thread,
then the session's events through a Generation (generation.py). Starlette rather than
FastAPI: the API is seven routes whose bodies pydantic validates directly, and OpenAI's error
shape (400, never FastAPI's 422) is easier to keep without FastAPI's validation layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from consortium.serving.config import VERIFIED, ServeConfig
from consortium.serving.generation import Generation, api_error
from consortium.serving.metrics import ClusterCollector, LedgerTally, RequestMetrics
from consortium.serving.release import Retracted
from consortium.serving.schemas import ApiError, ChatRequest, Common, CompletionRequest, parse
from consortium.serving.status_page import status
from consortium.transport.proto import consortium_pb2 as pb

OBJECTS = {"chat": "chat.completion", "completion": "text_completion"}


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class SSEResponse:
    """A text/event-stream response; the client's disconnect cancels the generation's session."""

    def __init__(self, chunks: AsyncIterator[bytes], gen: Generation):
        self.chunks, self.gen = chunks, gen

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        watcher = asyncio.ensure_future(self.gen.cancel_on_disconnect(receive))
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.gen.cancel()
        finally:
            watcher.cancel()
            await self.chunks.aclose()


class Api:
    def __init__(self, coordinator, serve: ServeConfig):
        self.c, self.serve = coordinator, serve
        self.model_id = coordinator.gguf.path.stem
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry)
        self.tally = LedgerTally(coordinator.ledger.path, coordinator.cfg.node_id)
        self.registry.register(ClusterCollector(coordinator, self.tally))

    def app(self) -> Starlette:
        static = StaticFiles(packages=[("consortium.serving", "static")])
        routes = [
            Route("/", self.index),
            Mount("/static", static, name="static"),
            Route("/health", self.health),
            Route("/metrics", self.prometheus),
            Route("/api/status", self.status),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {HTTPException: self._http_error, ApiError: lambda r, e: error_response(e)}
        return Starlette(routes=routes, exception_handlers=handlers)

    async def _http_error(self, request: Request, e: HTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    def _auth(self, request: Request) -> None:
        if not self.serve.auth:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.strip().encode()
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(given, k.encode()) for k in self.serve.api_keys
        ):
            raise ApiError(
                401, "missing or unknown API key (send Authorization: Bearer KEY)", None, "invalid_api_key"
            )

    def _client(self, request: Request) -> str:
        """Who the coordinator's per-client limits count: the API key (a digest of it), else the address."""
        key = request.headers.get("authorization", "").partition(" ")[2].strip()
        if self.serve.auth and key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return request.client.host if request.client else ""

    async def _body(self, request: Request) -> object:
        limit = self.serve.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"request body over {limit} bytes", None, "request_too_large")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes", None, "request_too_large")
        try:
            return json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None

    # --- read-only routes ------------------------------------------------------------------

    async def index(self, request: Request) -> HTMLResponse:
        page = resources.files("consortium.serving").joinpath("static/index.html").read_text()
        return HTMLResponse(page)

    async def health(self, request: Request) -> JSONResponse:
        st = await run_in_threadpool(self.c.status)
        if not st.route:
            why = st.placement_error or "no pipeline"
            return error_response(ApiError(503, f"not every layer is covered: {why}", None, "no_pipeline"))
        return JSONResponse({"status": "ok", "stages": len(st.route), "n_layers": st.n_layers})

    async def prometheus(self, request: Request) -> Response:
        self._auth(request)
        body = await run_in_threadpool(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def status(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse(await run_in_threadpool(status, self.c, self.serve, self.tally))

    async def models(self, request: Request) -> JSONResponse:
        self._auth(request)
        created = int(self.c.gguf.path.stat().st_mtime)
        model = {"id": self.model_id, "object": "model", "created": created, "owned_by": "consortium"}
        model["consortium"] = {"sha256": self.c.digest, "n_layers": self.c.args.n_layers}
        return JSONResponse({"object": "list", "data": [model]})

    # --- generation ------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", ChatRequest)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion", CompletionRequest)

    async def _generate(self, request: Request, kind: str, cls: type[Common]) -> Response:
        t0 = time.perf_counter()
        try:
            self._auth(request)
            req = parse(cls, await self._body(request))
            if req.model not in (self.model_id, self.c.gguf.path.name):
                raise ApiError(
                    404,
                    f"model {req.model!r} does not exist (this server has {self.model_id!r})",
                    "model",
                    "model_not_found",
                )
            session = await run_in_threadpool(self.c.new_session, self._message(req), self._client(request))
        except Exception as e:  # noqa: BLE001  (every failure answers as an OpenAI error)
            err = api_error(e)
            self.metrics.request(kind, "rejected")
            return error_response(err)
        # a full response is sent at the end, when every audit has settled: never optimistic
        verified = not req.stream or (req.release or self.serve.release) == VERIFIED
        gen = Generation(session, self.c.run(session), verified, req.stops, self.metrics.token)
        head = {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{session.session_id}",
            "created": int(time.time()),
        }
        head["model"] = self.model_id
        if req.stream:
            return SSEResponse(self._stream(gen, req, kind, head, t0), gen)
        return await self._complete(request, gen, kind, head, t0)

    def _message(self, req: Common) -> pb.GenerateRequest:
        """The coordinator's request: the chat template rendered here (every message), the
        prompt sent as is; OpenAI's sampling fields, the CLI's defaults where absent."""
        chat = isinstance(req, ChatRequest)
        prompt = self.c.tokenizer.render_chat(req.chat()) if chat else req.text()
        max_tokens = req.max_completion_tokens or req.max_tokens or self.serve.default_max_tokens
        sampling = pb.Sampling(
            temperature=req.temperature or 0.0, top_k=req.top_k or 0, top_p=req.top_p or 1.0
        )
        sampling.seed = req.seed or 0
        return pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, no_chat=True, sampling=sampling)

    def _choice(self, kind: str, text: str | None, finish: str | None, first: bool = False) -> dict:
        if kind == "completion":
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def _done(self, kind: str, gen: Generation, t0: float, outcome: str) -> None:
        outcome = "cancelled" if gen.disconnected else outcome
        self.metrics.request(kind, outcome, gen.prompt_tokens, time.perf_counter() - t0)

    async def _complete(
        self, request: Request, gen: Generation, kind: str, head: dict, t0: float
    ) -> Response:
        watcher = asyncio.ensure_future(gen.cancel_on_disconnect(request.receive))
        try:
            text = await gen.text()
        except Exception as e:  # noqa: BLE001
            self._done(kind, gen, t0, "error")
            return error_response(api_error(e))
        finally:
            watcher.cancel()
        self._done(kind, gen, t0, gen.finish_reason)
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": gen.finish_reason,
            }
            choice["logprobs"] = None
        else:
            choice = self._choice(kind, text, gen.finish_reason)
        body = {
            **head,
            "object": OBJECTS[kind],
            "choices": [choice],
            "usage": gen.usage(),
            "consortium": gen.consortium(),
        }
        return JSONResponse(body)

    async def _stream(
        self, gen: Generation, req: Common, kind: str, head: dict, t0: float
    ) -> AsyncIterator[bytes]:
        head = {**head, "object": OBJECTS[kind] + ("" if kind == "completion" else ".chunk")}
        usage = {"usage": None} if req.include_usage else {}
        outcome = "cancelled"
        try:
            if kind == "chat":
                yield sse({**head, "choices": [self._choice(kind, "", None, first=True)], **usage})
            async for text in gen.deltas():
                yield sse({**head, "choices": [self._choice(kind, text, None)], **usage})
            last = {**head, "choices": [self._choice(kind, None, gen.finish_reason)], **usage}
            yield sse(last | {"consortium": gen.consortium()})
            if req.include_usage:
                yield sse({**head, "choices": [], "usage": gen.usage(), "consortium": gen.consortium()})
            outcome = gen.finish_reason
        except Retracted as e:
            outcome = "retracted"
            error = ApiError(409, str(e), None, "rollback").body()
            error["error"]["type"] = "rollback"
            yield sse(error | {"consortium": gen.consortium()})
        except Exception as e:  # noqa: BLE001  (the stream has begun: the error goes in it)
            outcome = "error"
            yield sse(api_error(e).body())
        finally:
            self._done(kind, gen, t0, outcome)
        yield sse("[DONE]")


def create_app(coordinator, serve: ServeConfig) -> Starlette:
    return Api(coordinator, serve).app()
