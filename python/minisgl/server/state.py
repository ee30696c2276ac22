"""What every route shares: `parse` for request bodies, and one ApiState on `app.state.api`,
which routes take as a FastAPI dependency (`api: Api`): routes are module-level functions on
APIRouters, not closures."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from minisgl.args import ServerArgs

from .bridge import Bridge
from .generation import ApiError
from .sampling import check_ids
from .tokenizer import TokenizerWorker


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The body as `model`, or a 400 naming the first bad fields."""
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


@dataclass(eq=False)
class ApiState:
    args: ServerArgs
    bridge: Bridge
    started: int = field(default_factory=lambda: int(time.time()))
    tokenizer: TokenizerWorker | None = None  # /tokenize's own, loaded at its first call
    tokenizer_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.args.model_name

    @property
    def fingerprint(self) -> str:
        """`system_fingerprint`: changes with what changes outputs for a seed."""
        a = self.args
        keys = (a.model_name, a.dtype, a.tp, a.seed, a.cache, a.page_size, a.attn)
        return "fp_" + hashlib.sha256(repr(keys).encode()).hexdigest()[:10]

    def require_ready(self) -> None:
        if self.bridge.dead is not None:
            raise ApiError(503, f"the server cannot serve: {self.bridge.dead}")
        if not self.bridge.is_ready:
            raise ApiError(503, "the server is starting; retry when GET /health answers 200")

    def check_ids(self, ids: list[int], what: str) -> None:
        check_ids(ids, what, self.bridge.limits.vocab_size)

    async def accept(self, model: type[BaseModel], request: Request) -> Any:
        """A POST route's body, parsed, once the server is ready and the model its own."""
        req = parse(model, await request.body())
        self.require_ready()
        if req.model is not None and req.model != self.name:
            msg = f"model {req.model!r} is not served here; use {self.name!r}"
            raise ApiError(400, msg, "model")
        return req


def _api(request: Request) -> ApiState:
    return request.app.state.api


Api = Annotated[ApiState, Depends(_api)]
