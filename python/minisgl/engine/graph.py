"""CUDA graphs for decode: one graph per batch-size bucket, captured at start-up; a batch is
padded up to the next bucket with dummy requests that read and write a scratch KV page."""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch
from torch import nn

from ..attention.base import AttentionBackend, AttnMeta
from ..core import Batch
from ..kernel import triton_ops
from ..kvcache.slots import SlotTable
from .sampler import SamplingInfo

log = logging.getLogger("minisgl.engine")


class GraphRunner:
    """A graph holds the whole decode step: from one small pinned copy of per-row metadata
    (rows, positions, KV slots, sampling seeds and temperatures) it gathers the input ids,
    records the new slots, runs the model and the LM head, samples and stores the tokens for
    the next step. Per step the host issues that copy, FlashInfer's plan and one replay.

    The copies (ours and the plan's) go to a side stream, and each bucket is captured twice,
    over two sets of metadata buffers used by alternate steps: step N+1's copies then run
    while step N's graph runs, instead of between the graphs, where each host-to-device copy
    left the GPU idle for 15-45 us (measured).

    Every graph shares one memory pool, so a graph's intermediates may sit where a graph
    captured after it keeps its outputs (PyTorch only keeps a capture's *live* tensors out of
    later captures). The sampled tokens are read back on a side stream while the next graph
    already runs: kept in the pool, they were overwritten by that graph's activations (bf16
    words read as int64 ids, issue 15). They therefore live in `token_out`, outside the pool,
    one row per buffer set, and a replay waits until the copy of its row's last tokens is done.
    The logits stay in the pool: everything that reads them is queued on the compute stream
    before the next replay.

    Everything it uses is passed in (padding uses row `scratch_row` and pool slot `scratch_slot`);
    the caller writes stale slot-table entries before `run`."""

    META_ROWS = 5  # rows, positions, out_loc, seeds, temperatures (float32 bits), as int32

    def __init__(
        self, model: nn.Module, attn: AttentionBackend, slots: SlotTable, next_tokens: torch.Tensor,
        max_bs: int, scratch_row: int, scratch_slot: int, seed: int, poison: bool,
    ) -> None:  # fmt: skip
        self.model, self.attn, self.slots, self.next_tokens = model, attn, slots, next_tokens
        self.buckets = sorted(
            {b for b in (1, 2, 4, 8, *range(16, max_bs + 1, 16)) if b <= max_bs} | {max_bs}
        )
        self.max_bs = max_bs
        dev = next_tokens.device
        self.scratch_row, self.scratch_slot = scratch_row, scratch_slot
        slots.device[scratch_row, 0] = scratch_slot
        slots.np[scratch_row, 0] = scratch_slot
        self.meta_buf = torch.zeros(2, self.META_ROWS, max_bs, dtype=torch.int32, device=dev)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.out_loc = torch.full((max_bs,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.rows = torch.full((max_bs,), self.scratch_row, dtype=torch.int64, device=dev)
        self.ones = torch.ones(max_bs, dtype=torch.int64, device=dev)
        self.token_out = torch.zeros(2, max_bs, dtype=torch.int64, device=dev)
        # padding entries read and write the scratch slot of the scratch row, greedily
        self.pad = np.array([self.scratch_row, 0, self.scratch_slot, 0, 0], dtype=np.int32)
        self.triton = triton_ops.available(self.meta_buf)  # prologue and sampling kernels
        self.rng = np.random.default_rng(seed)
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.copy_stream = torch.cuda.Stream()  # metadata in
        self.out_stream = torch.cuda.Stream()  # sampled tokens out
        self.buf, self.last_buf = 0, 1  # the buffer sets of the next and the last replay
        self.released: list[torch.cuda.Event | None] = [None, None]  # set free once its graph ran
        self.copied_out: list[torch.cuda.Event | None] = [None, None]  # its tokens read back
        attn.init_graph(max_bs)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            for buf in (0, 1):
                self._capture(bs, buf, pool)
        log.info("captured %d CUDA graphs (batch sizes up to %d) in %.1f s", len(self.buckets), max_bs,
                 time.perf_counter() - start)  # fmt: skip
        if poison:  # what a replay reads must be what it or its copies wrote
            self._poison()

    @torch.inference_mode()
    def _poison(self) -> None:
        for t in (self.input_ids, self.positions, self.out_loc, self.rows, self.meta_buf):
            t.fill_(-(1 << 30))
        self.token_out.fill_(-1)
        for logits in self.logits.values():
            logits.fill_(float("nan"))

    def _attn_meta(self, bs: int, rows_host: list[int], prefix_host: list[int]) -> AttnMeta:
        # device fields are the graph's buffers; FlashInfer plans from the host lists. No
        # graph-capable backend reads `seq_lens`: it is handed the positions buffer, not +1
        return AttnMeta(
            False, self.rows[:bs], self.positions[:bs], self.ones[:bs], self.positions[:bs],
            self.out_loc[:bs], prefix_host, [1] * bs, rows_host,
        )  # fmt: skip

    def _step(self, bs: int, buf: int) -> None:
        """The captured work of one decode step of (padded) size `bs`."""
        m, table = self.meta_buf[buf, :, :bs], self.slots.device
        if self.triton:  # Triton: one kernel for the five steps below
            triton_ops.decode_prologue(m, self.next_tokens, table, self.input_ids[:bs],
                                       self.rows[:bs], self.positions[:bs], self.out_loc[:bs])  # fmt: skip
        else:
            self.rows[:bs].copy_(m[0])
            self.positions[:bs].copy_(m[1])
            self.out_loc[:bs].copy_(m[2])
            torch.index_select(self.next_tokens, 0, self.rows[:bs], out=self.input_ids[:bs])
            table[self.rows[:bs], self.positions[:bs]] = m[2]
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.attn)
        logits = self.model.logits(hidden)
        self.logits[bs, buf] = logits
        if self.triton:
            temps = m[4].view(torch.float32)
            out = self.token_out[buf, :bs]
            triton_ops.gumbel_sample(logits, temps, m[3], self.rows[:bs], self.next_tokens, out)

    @torch.inference_mode()
    def _capture(self, bs: int, buf: int, pool: object) -> None:
        self.meta_buf[buf, :, :bs] = torch.from_numpy(self.pad[:, None]).to(self.meta_buf.device)
        meta = self._attn_meta(bs, [self.scratch_row] * bs, [0] * bs)
        self.attn.prepare_graph_capture(bs, meta, buf)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph (lazy inits, autotuning)
                self._step(bs, buf)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._step(bs, buf)
        self.graphs[bs, buf] = graph

    def can_run(self, batch: Batch) -> bool:
        return not batch.is_prefill and batch.size <= self.max_bs

    def run(self, batch: Batch, info: SamplingInfo) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the step for `batch`; returns (logits [B, V], sampled tokens [B] or None when
        the caller must sample: rows with top-k/top-p, or no Triton)."""
        b = batch.size
        bs = self.buckets[bisect.bisect_left(self.buckets, b)]
        host = np.empty((self.META_ROWS, self.max_bs), dtype=np.int32)
        host[:, b:] = self.pad[:, None]
        rows_host = [r.table_idx for r in batch.reqs]
        host[0, :b] = rows_host
        host[1, :b] = batch.prefix_lens
        host[2, :b] = batch.out_loc
        host[3, :b] = self.rng.integers(0, 2**31 - 1, b, dtype=np.int32)
        for row, seed in info.seeded:  # reproducible whatever else is in the batch
            host[3, row] = seed % 2**31
        host[4, :b] = np.asarray(info.temps_host, dtype=np.float32).view(np.int32)
        pad = bs - b
        padded = self._attn_meta(
            bs, rows_host + [self.scratch_row] * pad, batch.prefix_lens + [0] * pad
        )
        buf, compute = self.buf, torch.cuda.current_stream()
        self.buf, self.last_buf = buf ^ 1, buf
        if self.released[buf] is not None:  # the graph that last read this set has run
            self.copy_stream.wait_event(self.released[buf])
        with torch.cuda.stream(self.copy_stream):
            self.meta_buf[buf].copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
            self.attn.prepare_graph_replay(bs, padded, buf)
        compute.wait_stream(self.copy_stream)
        if self.copied_out[buf] is not None:  # the tokens this graph overwrites were read
            compute.wait_event(self.copied_out[buf])
        # the C++ replay directly: the Python wrapper's pool-liveness check costs ~1 ms a step
        torch._C._CUDAGraph.replay(self.graphs[bs, buf])
        self.released[buf] = torch.cuda.Event()
        self.released[buf].record(compute)
        sampled = self.triton and not info.needs_filter
        return self.logits[bs, buf][:b], self.token_out[buf, :b] if sampled else None

    def copy_out(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start copying the last replay's sampled tokens to the host on a side stream (so the
        next graph does not queue behind the copy); the event marks the copy's end."""
        self.out_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.out_stream):
            host = tokens.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.copied_out[self.last_buf] = event
        return host, event
