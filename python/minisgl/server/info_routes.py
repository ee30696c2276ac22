"""Routes around generation: /v1/models and /v1/models/{id}, vLLM's /tokenize and /detokenize.

/tokenize renders chat messages with the tokenizer workers' code (a TokenizerWorker here, its
tokenizer loaded on a thread at the first call): the ids a chat completion's prompt gets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from minisgl.args import ServerArgs

from .bridge import Bridge
from .generation import ApiError
from .protocol import DetokenizeRequest, TokenizeRequest
from .tokenizer import TokenizerWorker
from .tokenizer import _Reject as Reject


def chat_payload(req: Any) -> str:
    try:
        return req.payload()
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None


def add_info_routes(
    app: FastAPI, args: ServerArgs, bridge: Bridge, parse: Callable, checks: tuple
) -> None:
    require_ready, check_model, check_ids = checks
    name, started = args.model_name, int(time.time())
    local: dict[str, TokenizerWorker] = {}
    lock = asyncio.Lock()
    body = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}

    def card() -> dict[str, Any]:
        c = {"id": name, "object": "model", "created": started, "owned_by": "minisgl"}
        if bridge.max_seq_len:
            c["max_model_len"] = bridge.max_seq_len
        return c

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != name:
            raise ApiError(404, f"model {model_id!r} is not served here; use {name!r}", "model")
        return JSONResponse(card())

    async def worker(request: Request, cls: type) -> tuple[Any, TokenizerWorker]:
        req = parse(cls, await request.body())
        require_ready()
        check_model(req.model)
        async with lock:
            if not local:
                from .detokenizer import load_tokenizer

                local["w"] = TokenizerWorker(await asyncio.to_thread(load_tokenizer, args))
                local["w"].configure(bridge.info)
        if local["w"].tok is None:
            raise ApiError(400, "this model has no tokenizer")
        return req, local["w"]

    @app.post("/tokenize", openapi_extra=body)
    async def tokenize(request: Request) -> JSONResponse:
        req, w = await worker(request, TokenizeRequest)
        chat = req.messages is not None
        text = chat_payload(req) if chat else req.prompt
        try:
            ids = await asyncio.to_thread(w.tokenize, text, chat, req.add_special_tokens)
        except Reject as e:
            raise ApiError(400, str(e)) from None
        out = {"count": len(ids), "max_model_len": bridge.max_seq_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = w.tok.convert_ids_to_tokens(ids)
        return JSONResponse(out)

    @app.post("/detokenize", openapi_extra=body)
    async def detokenize(request: Request) -> JSONResponse:
        req, w = await worker(request, DetokenizeRequest)
        check_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": await asyncio.to_thread(w.tok.decode, req.tokens)})
