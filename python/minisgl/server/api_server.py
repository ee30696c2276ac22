"""FastAPI app: OpenAI-compatible routes, native /generate, /tokenize,
/detokenize, /health, /metrics.

Every error, including those of the HTTP layer itself (unknown route or method, unparsable
HTTP, Host / Origin / Content-Type refusals), has the OpenAI shape {"error": {...}}.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from minisgl.args import ServerArgs
from minisgl.core import SamplingParams
from minisgl.messages import STALL_S

from . import router_api
from .bridge import Bridge
from .connection import Gate, Stalled, Stream, until_hangup, wait_disconnect
from .generation import ApiError, Generation
from .info_routes import add_info_routes, chat_payload
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from .responses import Formatter, error_body, native_item, native_stream
from .tokenizer import NO_TEMPLATE
from .tools import ChatParser, grammar_for, tool_mode

logger = logging.getLogger("minisgl.server")

MAX_PROMPTS = 256  # prompts in one /v1/completions request
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/generate",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
    *router_api.ROUTES,
)
KEYED = ("/generate", "/flush_cache")  # besides /v1: need the API key


def error_response(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    headers = {"Retry-After": "1", **(headers or {})} if status == 429 else headers
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errs = e.errors(include_url=False, include_input=False)
        if errs and errs[0]["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {errs[0]['msg']}") from None
        if errs and errs[0]["type"] == "model_type":
            raise ApiError(400, "the request body must be a JSON object") from None
        parts, param = [], None
        for err in errs[:5]:
            loc = ".".join(str(x) for x in err["loc"])
            param = param or loc or None
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        raise ApiError(400, "invalid request: " + "; ".join(parts), param) from None


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
        status_box = [500]
        rid = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        if not re.fullmatch(rb"[\x21-\x7e]{1,128}", rid):  # echoed when sane, else made up
            rid = uuid.uuid4().hex.encode()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", rid)]
                message = {**message, "headers": headers}
            try:
                async with asyncio.timeout(self.args.stall_timeout):
                    await send(message)
            except TimeoutError:
                raise Stalled from None

        try:
            await self._call(scope, receive, send_wrapper, path)
        except Stalled:  # returning unfinished makes uvicorn close the connection
            logger.warning(
                "%s: the client read nothing for %g s: dropped", path, self.args.stall_timeout
            )
        finally:
            self.metrics.http.labels(route, str(status_box[0])).inc()

    async def _call(self, scope: dict, receive: Callable, send: Callable, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        refusal = self.gate.refusal(headers)
        if refusal is not None:
            refusal = error_response(*refusal)
        elif self.key is not None and (path.startswith("/v1") or path in KEYED):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                refusal = error_response(
                    401, "missing or invalid API key (Authorization: Bearer KEY)"
                )
        if refusal is not None:
            return await refusal(scope, receive, send)
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
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(args: ServerArgs, bridge: Bridge | None = None) -> Any:
    metrics = bridge.metrics if bridge is not None else Metrics()
    bridge = bridge or Bridge(args, metrics)
    name = args.model_name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bridge.start()
        yield
        bridge.fail_all("the server is shutting down", 503)
        await bridge.stop()

    app = FastAPI(title="minisgl", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.bridge = bridge
    keys = (name, args.dtype, args.tp, args.seed, args.cache, args.page_size, args.attn)
    fingerprint = "fp_" + hashlib.sha256(repr(keys).encode()).hexdigest()[:10]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {e.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}  # fmt: skip
        return error_response(e.status_code, msg.get(e.status_code, str(e.detail)), None, e.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return error_response(500, "internal server error")

    def require_ready() -> None:
        if bridge.dead is not None:
            raise ApiError(503, f"the server cannot serve: {bridge.dead}")
        if not bridge.is_ready:
            raise ApiError(503, "the server is starting; retry when GET /health answers 200")

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(400, f"model {model!r} is not served here; use {name!r}", "model")

    def check_ids(ids: list[int], what: str) -> None:
        vocab = bridge.vocab_size
        for i in ids:
            if not 0 <= i < vocab:
                raise ApiError(
                    400, f"{what}: token id {i} is outside the vocabulary [0, {vocab})", what
                )

    def sampling(
        req: Any, max_tokens: int | None, logprobs: int | None, n: int, grammar: Any = None
    ) -> list[SamplingParams]:
        if n > args.max_n:
            raise ApiError(400, f"n must be at most {args.max_n}, got {n}", "n")
        check_ids(req.stop_token_ids or [], "stop_token_ids")
        bias = {int(k): float(v) for k, v in (getattr(req, "logit_bias", None) or {}).items()}
        check_ids(list(bias), "logit_bias")
        top_k = req.top_k if req.top_k not in (None, 0) else -1
        if top_k >= bridge.vocab_size:
            top_k = -1
        base = {
            "temperature": 1.0 if req.temperature is None else float(req.temperature),
            "top_k": top_k,
            "top_p": 1.0 if req.top_p is None else float(req.top_p),
            "max_tokens": max_tokens or bridge.max_seq_len,  # unset: gen.add(fill=True)
            "ignore_eos": req.ignore_eos,
            "stop_token_ids": list(req.stop_token_ids or []),
            "seed": None,
            "logprobs": -1 if logprobs is None else logprobs,
            # OpenAI-route fields (the native view has none of them)
            "presence_penalty": getattr(req, "presence_penalty", None) or 0.0,
            "frequency_penalty": getattr(req, "frequency_penalty", None) or 0.0,
            "repetition_penalty": getattr(req, "repetition_penalty", None) or 1.0,
            "min_p": getattr(req, "min_p", None) or 0.0,
            "min_tokens": getattr(req, "min_tokens", 0),
            "logit_bias": bias or None,
            "grammar": grammar,
        }
        out = []
        for i in range(n):  # choice i uses seed + i: different but reproducible
            p = dict(base)
            if req.seed is not None:
                p["seed"] = (req.seed + i) % 2**63
            out.append(p)
        try:
            return [SamplingParams(**p) for p in out]
        except ValueError as e:  # min_tokens > max_tokens
            raise ApiError(400, str(e)) from None

    async def respond(
        gen: Generation, request: Request, stream_body: Any, full_body: Any
    ) -> Response:
        # a client that leaves while queued or in prefill is noticed at once, not at its first
        # token: its requests leave the scheduler's queue before they cost anything
        hangup = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.sleep(0)  # let `hangup` see a client that is gone already
            await until_hangup(gen, gen.start(), hangup)
            if stream_body is not None:
                return Stream(stream_body, gen.abort)
            await until_hangup(gen, gen.collect(), hangup)
        finally:
            hangup.cancel()
        return JSONResponse(full_body())

    @app.get("/health")
    async def health() -> Response:
        stalled = bridge.stalled()
        if bridge.is_ready and not stalled:
            return JSONResponse({"status": "ok"})
        if bridge.dead is not None:
            return error_response(503, f"unhealthy: {bridge.dead}")
        if stalled:
            return error_response(503, f"unhealthy: {', '.join(stalled)} silent for {STALL_S:g} s")
        missing = sorted(bridge.expected - bridge.ready)
        return error_response(503, f"starting: waiting for {', '.join(missing)}")

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    schema = {"application/json": {"schema": {"type": "object"}}}

    add_info_routes(app, args, bridge, parse, (require_ready, check_model, check_ids))

    @app.post(
        "/v1/completions", openapi_extra={"requestBody": {"content": schema, "required": True}}
    )
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse(CompletionRequest, await request.body())
        require_ready()
        check_model(req.model)
        prompts = req.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
        for p in prompts:
            if isinstance(p, list):
                check_ids(p, "prompt")
        params = sampling(req, req.max_tokens, req.logprobs, req.n, grammar_for(req, False))
        gen = Generation(bridge)
        for pi, p in enumerate(prompts):
            for ps in params:
                gen.add(pi, p, ps, req.stop, chat=False, fill=req.max_tokens is None)
        fmt = Formatter("completion", name, req.logprobs is not None, *_usage(req),
                        fingerprint=fingerprint)  # fmt: skip
        stream = fmt.stream(gen) if req.stream else None
        return await respond(gen, request, stream, lambda: fmt.full(gen))

    @app.post(
        "/v1/chat/completions", openapi_extra={"requestBody": {"content": schema, "required": True}}
    )
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await request.body())
        require_ready()
        check_model(req.model)
        info = bridge.tokenizer_info
        if not info.get("has_chat_template", True):
            no_tok = "this model has no tokenizer, so no chat: use /v1/completions with token ids"
            raise ApiError(400, NO_TEMPLATE if info.get("has_tokenizer") else no_tok)
        payload = chat_payload(req)
        top = req.top_logprobs if req.top_logprobs is not None else 0
        max_tokens = req.max_completion_tokens or req.max_tokens
        grammar = grammar_for(req, True)
        params = sampling(req, max_tokens, top if req.logprobs else None, req.n, grammar)
        gen = Generation(bridge)
        for ps in params:
            gen.add(0, payload, ps, req.stop, chat=True, fill=max_tokens is None)
        mode, think = tool_mode(req), args.reasoning_parser == "qwen3"
        fmt = Formatter("chat", name, req.logprobs, *_usage(req), fingerprint=fingerprint,
                        parser=lambda: ChatParser(think, mode, req.parallel_tool_calls))  # fmt: skip
        stream = fmt.stream(gen) if req.stream else None
        return await respond(gen, request, stream, lambda: fmt.full(gen))

    @app.post("/generate", openapi_extra={"requestBody": {"content": schema, "required": True}})
    async def generate(request: Request) -> Response:
        req: GenerateRequest = parse(GenerateRequest, await request.body())
        require_ready()
        check_model(req.model)
        sp = req.sampling_params
        if req.input_ids is not None:
            check_ids(req.input_ids, "input_ids")
        params = sampling(
            _NativeView(sp),
            sp.max_new_tokens,
            req.top_logprobs_num if req.return_logprob else None,
            sp.n,
        )
        gen = Generation(bridge)
        prompt = req.text if req.text is not None else req.input_ids
        for ps in params:
            gen.add(0, prompt, ps, sp.stop, chat=False, fill=sp.max_new_tokens is None)
        rid = "gen-" + Formatter("completion", name, False).id[5:]
        texts = req.return_text_in_logprobs
        stream = native_stream(gen, rid, req.return_logprob, texts) if req.stream else None

        def full() -> Any:
            items = [native_item(c, rid, req.return_logprob, texts) for c in gen.choices]
            return items[0] if len(items) == 1 else items

        return await respond(gen, request, stream, full)

    router_api.add_router_routes(app, args, bridge, require_ready)
    asgi: Any = Guard(app, args, metrics)
    if args.allowed_origins:  # outermost: preflights are answered before the API-key check
        origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
        asgi = CORSMiddleware(asgi, allow_origins=origins, allow_methods=["*"],
                              allow_headers=["*"], expose_headers=["x-request-id"])  # fmt: skip
    return asgi


class _NativeView:
    """Native sampling params seen through the OpenAI field names used by `sampling`."""

    def __init__(self, sp: Any) -> None:
        self.temperature, self.top_p, self.top_k = sp.temperature, sp.top_p, sp.top_k
        if None not in (sp.seed, sp.sampling_seed) and sp.seed != sp.sampling_seed:
            raise ApiError(400, "seed and sampling_seed differ", "sampling_params.seed")
        self.ignore_eos, self.seed = sp.ignore_eos, sp.sampling_seed if sp.seed is None else sp.seed
        self.stop_token_ids = sp.stop_token_ids


def _usage(req: Any) -> tuple[bool, bool]:
    so = req.stream_options
    return bool(so and so.include_usage), bool(so and so.continuous_usage_stats)
