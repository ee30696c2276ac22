"""Routes around generation: /health, /metrics, /v1/models and /v1/models/{id}, vLLM's
/tokenize and /detokenize.

/tokenize renders chat messages with the tokenizer workers' code (a TokenizerWorker here, its
tokenizer loaded on a thread at the first call): the ids a chat completion's prompt gets.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from minisgl.messages import STALL_S

from .generation import ApiError
from .protocol import DetokenizeRequest, TokenizeRequest
from .responses import error_response
from .state import Api, ApiState
from .tokenizer import TokenizerWorker
from .tokenizer import _Reject as Reject

router = APIRouter()
BODY = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}


@router.get("/health")
async def health(api: Api) -> Response:
    bridge = api.bridge
    stalled = bridge.stalled()
    if bridge.is_ready and not stalled:
        return JSONResponse({"status": "ok"})
    if bridge.dead is not None:
        return error_response(503, f"unhealthy: {bridge.dead}")
    if stalled:
        return error_response(503, f"unhealthy: {', '.join(stalled)} silent for {STALL_S:g} s")
    missing = sorted(bridge.expected - bridge.ready)
    return error_response(503, f"starting: waiting for {', '.join(missing)}")


@router.get("/metrics")
async def metrics_route(api: Api) -> Response:
    text = api.bridge.metrics.render()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _card(api: ApiState) -> dict[str, Any]:
    c = {"id": api.name, "object": "model", "created": api.started, "owned_by": "minisgl"}
    return {**c, "max_model_len": api.bridge.limits.max_seq_len}


@router.get("/v1/models")
async def models(api: Api) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_card(api)]})


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, api: Api) -> JSONResponse:
    if model_id != api.name:
        raise ApiError(404, f"model {model_id!r} is not served here; use {api.name!r}", "model")
    return JSONResponse(_card(api))


async def _worker(request: Request, api: ApiState, cls: type) -> tuple[Any, TokenizerWorker]:
    req = await api.accept(cls, request)
    async with api.tokenizer_lock:
        if api.tokenizer is None:
            from .detokenizer import load_tokenizer

            tok = await asyncio.to_thread(load_tokenizer, api.args)
            api.tokenizer = TokenizerWorker(tok, api.bridge.limits)
    if api.tokenizer.tok is None:
        raise ApiError(400, "this model has no tokenizer")
    return req, api.tokenizer


@router.post("/tokenize", openapi_extra=BODY)
async def tokenize(request: Request, api: Api) -> JSONResponse:
    req, w = await _worker(request, api, TokenizeRequest)
    chat = req.messages is not None
    text = req.payload() if chat else req.prompt
    try:
        ids = await asyncio.to_thread(w.tokenize, text, chat, req.add_special_tokens)
    except Reject as e:
        raise ApiError(400, str(e)) from None
    out = {"count": len(ids), "max_model_len": api.bridge.limits.max_seq_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = w.tok.convert_ids_to_tokens(ids)
    return JSONResponse(out)


@router.post("/detokenize", openapi_extra=BODY)
async def detokenize(request: Request, api: Api) -> JSONResponse:
    req, w = await _worker(request, api, DetokenizeRequest)
    api.check_ids(req.tokens, "tokens")
    return JSONResponse({"prompt": await asyncio.to_thread(w.tok.decode, req.tokens)})
