"""FastAPI app: OpenAI-compatible routes, native /generate, /tokenize,
/detokenize, /health, /metrics.

Every error, including those of the HTTP layer itself (unknown route or method, unparsable
HTTP, Host / Origin / Content-Type refusals), has the OpenAI shape {"error": {...}}.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from minisgl.args import ServerArgs

from . import info_routes
from .bridge import Bridge
from .connection import Gate, Stalled, Stream, until_hangup, wait_disconnect
from .generation import ApiError, Generation
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from .responses import Formatter, NativeFormatter, error_response
from .state import Api, ApiState
from .tokenizer import NO_TEMPLATE
from .tools import ChatParser, tool_mode

logger = logging.getLogger("minisgl.server")

MAX_PROMPTS = 256  # prompts in one /v1/completions request
ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate", *info_routes.ROUTES)
KEYED = ("/generate", "/flush_cache")  # besides /v1: need the API key


class Guard:
    """ASGI middleware: Host and Origin checks (DNS rebinding and cross-site requests against a
    loopback server), API key on /v1 and /generate, JSON-only bodies (a browser sends text/plain
    cross-site without asking), body size cap, a send timeout for clients that stop reading,
    HTTP metrics."""

    def __init__(self, app: Any, args: ServerArgs, metrics: Metrics) -> None:
        self.app, self.args, self.metrics = app, args, metrics
        self.key = args.api_key.encode() if args.api_key else None
        self.gate = Gate(args)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status_box, stall = [500], self.args.stall_timeout
        rid = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        if not re.fullmatch(rb"[\x21-\x7e]{1,128}", rid):  # echoed when sane, else made up
            rid = uuid.uuid4().hex.encode()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", rid)]
                message = {**message, "headers": headers}
            try:
                async with asyncio.timeout(stall):
                    await send(message)
            except TimeoutError:
                raise Stalled from None

        try:
            await self._call(scope, receive, send_wrapper, path)
        except Stalled:  # returning unfinished makes uvicorn close the connection
            logger.warning("%s: the client read nothing for %g s: dropped", path, stall)
        finally:
            self.metrics.http.labels(route, str(status_box[0])).inc()

    async def _call(self, scope: dict, receive: Callable, send: Callable, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        refusal = self.gate.refusal(headers)
        if refusal is None and self.key is not None and (path.startswith("/v1") or path in KEYED):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                refusal = 401, "missing or invalid API key (Authorization: Bearer KEY)"
        if refusal is not None:
            return await error_response(*refusal)(scope, receive, send)
        limit = self.args.max_request_bytes
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        too_big = error_response(413, f"request body larger than {limit} bytes")
        if declared > limit:
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        has_body = declared or b"transfer-encoding" in headers  # a bare POST (/flush_cache) is fine
        if has_body and ctype != b"application/json" and not ctype.endswith(b"+json"):
            resp = error_response(415, "Content-Type must be application/json")
            return await resp(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_big(scope, receive, send)
            if not msg.get("more_body", False):
                break
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:  # the body once, then the client's own messages
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)


router = APIRouter()
BODY = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}},
                        "required": True}}  # fmt: skip


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.param)


async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(400, f"invalid request: {e.errors()}")


async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    msg = {404: f"no route {request.url.path}",
           405: f"method {request.method} is not allowed on {request.url.path}"}  # fmt: skip
    return error_response(e.status_code, msg.get(e.status_code, str(e.detail)), None, e.headers)


async def _crash(request: Request, e: Exception) -> JSONResponse:
    logger.exception("internal error on %s", request.url.path)
    return error_response(500, "internal server error")


HANDLERS: dict[Any, Callable] = {ApiError: _api_error, RequestValidationError: _validation,
                                 StarletteHTTPException: _http, Exception: _crash}  # fmt: skip


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    bridge = app.state.api.bridge
    await bridge.start()
    yield
    bridge.fail_all("the server is shutting down", 503)
    await bridge.stop()


def create_app(args: ServerArgs, bridge: Bridge) -> Any:
    """The ASGI app: the routes inside Guard, inside CORS when --allowed-origins is set."""
    app = FastAPI(title="minisgl", lifespan=_lifespan, docs_url=None, redoc_url=None,
                  exception_handlers=HANDLERS)  # fmt: skip
    app.state.api = ApiState(args, bridge)
    app.include_router(router)
    app.include_router(info_routes.router)
    asgi: Any = Guard(app, args, bridge.metrics)
    if args.allowed_origins:  # outermost: preflights are answered before the API-key check
        origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
        asgi = CORSMiddleware(asgi, allow_origins=origins, allow_methods=["*"],
                              allow_headers=["*"], expose_headers=["x-request-id"])  # fmt: skip
    return asgi


def _generation(api: ApiState, req: Any, prompts: list, stops: list[str], chat: bool) -> Generation:
    """Every choice of every prompt (choice-major), submitted by Generation.start."""
    params = req.to_sampling_params(api.bridge.limits.vocab_size, api.args.max_n)
    fill = req.token_limit is None  # no max_tokens: the tokenizer worker fits it to the context
    gen = Generation(api.bridge)
    for pi, prompt in enumerate(prompts):
        for ps in params:
            gen.add(pi, prompt, ps, stops, chat=chat, fill=fill)
    return gen


async def _respond(
    gen: Generation, request: Request, stream: bool, fmt: Formatter | NativeFormatter
) -> Response:
    # a client that leaves while queued or in prefill is noticed at once, not at its first
    # token: its requests leave the scheduler's queue before they cost anything
    hangup = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.sleep(0)  # let `hangup` see a client that is gone already
        await until_hangup(gen, gen.start(), hangup)
        if stream:
            return Stream(fmt.stream(gen), gen.abort)
        await until_hangup(gen, gen.collect(), hangup)
    finally:
        hangup.cancel()
    return JSONResponse(fmt.full(gen))


@router.post("/v1/completions", openapi_extra=BODY)
async def completions(request: Request, api: Api) -> Response:
    req: CompletionRequest = await api.accept(CompletionRequest, request)
    prompts = req.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
    api.check_ids([t for p in prompts if isinstance(p, list) for t in p], "prompt")
    gen = _generation(api, req, prompts, req.stop, chat=False)
    fmt = Formatter("completion", api.name, api.fingerprint, req.logprobs is not None,
                    req.stream_options)  # fmt: skip
    return await _respond(gen, request, req.stream, fmt)


@router.post("/v1/chat/completions", openapi_extra=BODY)
async def chat_completions(request: Request, api: Api) -> Response:
    req: ChatCompletionRequest = await api.accept(ChatCompletionRequest, request)
    info = api.bridge.tokenizer_info
    if not info.get("has_chat_template", True):
        no_tok = "this model has no tokenizer, so no chat: use /v1/completions with token ids"
        raise ApiError(400, NO_TEMPLATE if info.get("has_tokenizer") else no_tok)
    gen = _generation(api, req, [req.payload()], req.stop, chat=True)
    mode, think = tool_mode(req), api.args.reasoning_parser == "qwen3"
    fmt = Formatter("chat", api.name, api.fingerprint, req.logprobs, req.stream_options,
                    parser=lambda: ChatParser(think, mode, req.parallel_tool_calls))  # fmt: skip
    return await _respond(gen, request, req.stream, fmt)


@router.post("/generate", openapi_extra=BODY)
async def generate(request: Request, api: Api) -> Response:
    req: GenerateRequest = await api.accept(GenerateRequest, request)
    api.check_ids(req.input_ids or [], "input_ids")
    prompt = req.text if req.text is not None else req.input_ids
    gen = _generation(api, req, [prompt], req.sampling_params.stop, chat=False)
    fmt = NativeFormatter(req.return_logprob, req.return_text_in_logprobs)
    return await _respond(gen, request, req.stream, fmt)
