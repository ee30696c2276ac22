"""CUDA graphs for decode: one graph per batch-size bucket, captured at start-up; a batch is
padded up to the next bucket with dummy requests that read and write a scratch KV page."""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from ..attention.base import AttnMeta
from ..core import Batch
from ..utils import h2d

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("minisgl.engine")


def maybe_create_graph_runner(engine: Engine) -> GraphRunner | None:
    max_bs = engine.args.cuda_graph_max_bs
    if max_bs == -1:
        max_bs = min(256, engine.max_reqs)
    if max_bs == 0 or not engine.attn.supports_graph:
        return None
    return GraphRunner(engine, min(max_bs, engine.max_reqs))


class GraphRunner:
    def __init__(self, engine: Engine, max_bs: int) -> None:
        self.engine = engine
        self.buckets = sorted(
            {b for b in (1, 2, 4, 8, *range(16, max_bs + 1, 16)) if b <= max_bs} | {max_bs}
        )
        self.max_bs = max_bs
        dev = engine.device
        self.scratch_row = engine.max_reqs
        self.scratch_slot = engine.scratch_page * engine.page_size
        engine.slot_table[self.scratch_row, 0] = self.scratch_slot
        engine.slots.np[self.scratch_row, 0] = self.scratch_slot
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.out_loc = torch.full((max_bs,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.rows = torch.full((max_bs,), self.scratch_row, dtype=torch.int64, device=dev)
        self.ones = torch.ones(max_bs, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(max_bs, engine.cfg.hidden_size, dtype=engine.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        engine.attn.init_graph(max_bs)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            self._capture(bs, pool)
        log.info("captured %d CUDA graphs (batch sizes up to %d) in %.1f s", len(self.buckets), max_bs,
                 time.perf_counter() - start)  # fmt: skip

    def _meta(
        self, bs: int, rows: torch.Tensor, rows_host: list[int], seq_host: list[int]
    ) -> AttnMeta:
        seq = h2d(torch.tensor(seq_host, dtype=torch.int64), self.engine.device)
        return AttnMeta(
            False,
            rows,
            seq - 1,
            self.ones[:bs],
            seq,
            self.out_loc[:bs],
            [s - 1 for s in seq_host],
            [1] * bs,
            rows_host,
        )

    @torch.inference_mode()
    def _capture(self, bs: int, pool: object) -> None:
        eng = self.engine
        meta = self._meta(bs, self.rows[:bs], [self.scratch_row] * bs, [1] * bs)
        eng.attn.prepare_graph_capture(bs, meta)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph (lazy inits, autotuning)
                self.hidden[:bs] = eng.model(self.input_ids[:bs], self.positions[:bs], eng.attn)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.hidden[:bs] = eng.model(self.input_ids[:bs], self.positions[:bs], eng.attn)
        self.graphs[bs] = graph

    def can_run(self, batch: Batch) -> bool:
        return not batch.is_prefill and batch.size <= self.max_bs

    def run(
        self, batch: Batch, meta: AttnMeta, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        b = batch.size
        bs = self.buckets[bisect.bisect_left(self.buckets, b)]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.out_loc[:b].copy_(meta.out_loc)
        if bs > b:
            self.input_ids[b:bs].zero_()
            self.positions[b:bs].zero_()
            self.out_loc[b:bs].fill_(self.scratch_slot)
        rows = (
            meta.rows
            if bs == b
            else torch.cat([meta.rows, self.rows[b:bs].fill_(self.scratch_row)])
        )
        padded = self._meta(
            bs,
            rows,
            meta.rows_host + [self.scratch_row] * (bs - b),
            meta.seq_lens_host + [1] * (bs - b),
        )
        self.engine.attn.prepare_graph_replay(bs, padded)
        # the C++ replay directly: the Python wrapper's pool-liveness check costs ~1 ms a step
        torch._C._CUDAGraph.replay(self.graphs[bs])
        return self.hidden[:b]
