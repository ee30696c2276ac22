"""`minisgl.LLM`: offline batch generation. It drives a Scheduler in-process (no ZMQ)."""

from __future__ import annotations

import itertools
import logging
import time

import torch
from tqdm import tqdm

from .args import ServerArgs
from .core import SamplingParams
from .engine.engine import Engine
from .messages import TokenOut
from .scheduler.scheduler import Scheduler
from .tokenizer import load_tokenizer

log = logging.getLogger("minisgl")


class LLM:
    def __init__(
        self, model_path: str, device: str = "auto", dtype: str = "auto", **options: object
    ) -> None:
        if device == "auto" and not torch.cuda.is_available():
            print("minisgl: no GPU visible, running on CPU (float32)")
        self.args = ServerArgs(model=model_path, device=device, dtype=dtype, **options)
        if self.args.tp != 1:
            raise ValueError(
                "LLM runs one process; use the server (python -m minisgl --tp N) for tensor parallelism"
            )
        self.engine = Engine(self.args)
        self.tokenizer = load_tokenizer(self.engine.model_path, self.args.chat_template)
        self._outputs: dict[int, list[int]] = {}
        self._done: set[int] = set()
        self.scheduler = Scheduler(self.engine, self.args, self._collect)
        self._uids = itertools.count()

    def _collect(self, msg: TokenOut) -> None:
        for uid, tok, fin in zip(msg.uids, msg.tokens, msg.finished):
            self._outputs[uid].append(tok)
            if fin is not None:
                self._done.add(uid)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this model directory has no tokenizer: pass token-id lists as prompts"
                )
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict[str, object]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        uids = []
        for prompt, p in zip(prompts, params):
            uid = next(self._uids)
            self._outputs[uid] = []
            err = self.scheduler.add(uid, self._encode(prompt), p)
            if err is not None:
                for u in uids:
                    self.scheduler.abort(u)
                raise ValueError(err)
            uids.append(uid)
        bar = tqdm(total=len(uids), desc="Generating", disable=not use_tqdm, unit="req")
        start, finished = time.perf_counter(), 0
        pending = set(uids)
        while pending:
            self.scheduler.step()
            pending -= self._done
            now_done = len(uids) - len(pending)
            if now_done != finished:
                toks = sum(len(self._outputs[u]) for u in uids)
                bar.set_postfix_str(
                    f"{toks / (time.perf_counter() - start):.0f} tok/s", refresh=False
                )
                bar.update(now_done - finished)
                finished = now_done
        while self.scheduler.busy and not self.scheduler.waiting and not self.scheduler.running:
            self.scheduler.step()  # drain the step still in flight under overlap
        bar.close()
        results = []
        for u in uids:
            ids = self._outputs.pop(u)
            self._done.discard(u)
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
            results.append({"text": text, "token_ids": ids})
        return results

    @torch.inference_mode()
    def prefill_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits at every position of one prompt, through the engine's own prefill
        (no prefix cache), for correctness tests."""
        from .core import Batch, Req

        mem = self.scheduler.mem
        req = Req(-1, list(token_ids), SamplingParams(max_tokens=1))
        req.device_len = len(token_ids) + 1  # match nothing: compute every position
        if not mem.free_rows or not mem.ensure_free(-(-len(token_ids) // mem.ps)):
            raise RuntimeError("engine is busy")
        req.table_idx = mem.free_rows.pop()
        try:
            out_loc = mem.extend(req, len(token_ids))
            req.cached_len = len(token_ids)
            batch = Batch([req], True, [len(token_ids)], [0], [False], out_loc, list(token_ids))
            return self.engine.forward(batch, all_logits=True).tokens.float().cpu()
        finally:
            req.cache_hit, req.token_ids = 0, []
            mem.release(req)

    def shutdown(self) -> None:
        """Drop the engine and give its device memory back."""
        import gc

        self.scheduler = None  # type: ignore[assignment]
        self.engine = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
