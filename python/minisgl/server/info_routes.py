"""Routes around generation: /health, /metrics, /v1/models and /v1/models/{id}, vLLM's
/tokenize and /detokenize, and sglang-router's.

/tokenize renders chat messages with the tokenizer workers' code (a TokenizerWorker here, its
tokenizer loaded on a thread at the first call): the ids a chat completion's prompt gets.

What sglang-router asks of a worker besides generation and /health, with SGLang's routes and
JSON shapes (read from sglang-router 0.3.2's source and its calls logged against a stub worker):
  GET  /server_info   at registration: `served_model_name` (else `model_path`) becomes the
                      worker's model id; `dp_size` under --dp-aware (old name /get_server_info)
  GET  /model_info    at registration: `model_type`, `architectures` (also /get_model_info,
                      which the router's own /get_model_info proxies)
  GET  /get_load      power_of_two's load monitor and the router's /get_loads: one entry per
                      DP rank; the sum of `num_tokens` is the worker's load
  POST /flush_cache   fanned out to every worker by the router's POST /flush_cache
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from minisgl import __version__
from minisgl.messages import STALL_S

from .generation import ApiError
from .protocol import DetokenizeRequest, TokenizeRequest
from .responses import error_response
from .state import Api, ApiState
from .tokenizer import TokenizerWorker
from .tokenizer import _Reject as Reject

ROUTES = ("/tokenize", "/detokenize", "/health", "/metrics", "/v1/models", "/server_info")
ROUTES += ("/get_server_info", "/model_info", "/get_model_info", "/get_load", "/flush_cache")
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


# ---- sglang-router -------------------------------------------------------------------------
@router.get("/server_info")
@router.get("/get_server_info")
async def _server_info(api: Api) -> dict:
    api.require_ready()
    args, bridge = api.args, api.bridge
    own = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("api_key", "zmq_dir")}
    return {
        **own, "model_path": args.model, "tokenizer_path": args.model,
        "served_model_name": args.model_name, "tp_size": args.tp, "dp_size": 1,
        "context_length": bridge.limits.max_seq_len, "max_total_tokens": bridge.info["kv_tokens"],
        "max_prefill_tokens": args.max_prefill_length, "page_size": bridge.info["page_size"],
        "version": f"minisgl {__version__}",
    }  # fmt: skip


@router.get("/model_info")
@router.get("/get_model_info")
async def _model_info(api: Api) -> dict:
    api.require_ready()
    with open(os.path.join(api.bridge.info["model_path"], "config.json")) as f:
        cfg = json.load(f)
    return {
        "model_path": api.args.model, "tokenizer_path": api.args.model, "is_generation": True,
        "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
    }  # fmt: skip


@router.get("/get_load")
async def _load(api: Api) -> list:
    """From the scheduler's latest Stats (every 0.5 s): its requests, and the KV tokens they
    hold beyond cached prefixes."""
    api.require_ready()
    v = api.bridge.metrics.engine.values
    waiting, running = int(v.get("waiting_reqs", 0)), int(v.get("running_reqs", 0))
    held = int(v.get("pages_used", 0) - v.get("pages_cached", 0)) * api.bridge.info["page_size"]
    return [{"dp_rank": 0, "num_reqs": running + waiting, "num_waiting_reqs": waiting,
             "num_tokens": held}]  # fmt: skip


@router.post("/flush_cache")
async def _flush(api: Api) -> dict:
    """Empty the prefix cache; refused while requests run, as in SGLang."""
    api.require_ready()
    busy = ApiError(400, "cache not flushed: requests are running; retry when idle")
    if api.bridge.reqs:
        raise busy
    try:
        out = await api.bridge.flush_cache()
    except asyncio.TimeoutError:
        raise ApiError(503, "the scheduler did not answer the flush within 10 s") from None
    if not out.ok:
        raise busy
    return {"message": "Cache flushed.", "freed_tokens": out.freed_tokens}
