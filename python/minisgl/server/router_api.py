"""What sglang-router asks of a worker besides generation and /health, with SGLang's routes and
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

from fastapi import APIRouter

from minisgl import __version__

from .generation import ApiError
from .state import Api

ROUTES = ("/server_info", "/get_server_info", "/model_info", "/get_model_info", "/get_load")
ROUTES += ("/flush_cache",)
router = APIRouter()


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
