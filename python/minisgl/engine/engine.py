"""The engine: model + KV pool + attention backend + sampler. One call runs one forward of a
prefill or decode batch (KV writes included) and samples; it knows nothing of scheduling."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import numpy as np
import torch

from .. import env
from ..args import ServerArgs
from ..attention import create_backend
from ..attention.base import AttnMeta
from ..core import Batch
from ..distributed import get_tp_info, init_distributed
from ..kvcache.pool import KVPool
from ..kvcache.slots import SlotTable, token_coords
from ..models import ModelConfig, create_model
from ..models.config import resolve_model_path
from ..models.weights import init_dummy_weights, load_weights
from ..utils import h2d
from .graph import GraphRunner
from .sampler import Sampler, SamplingInfo, gather_logprobs

log = logging.getLogger("minisgl.engine")
POISON_ID = 1 << 40  # added to the vocabulary size: an id no embedding row has
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StepOutput:
    """A launched step. `tokens` (host) is valid once `event` has completed."""

    batch: Batch
    tokens: torch.Tensor | None
    logprobs: tuple | None
    event: torch.cuda.Event | None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Engine:
    def __init__(self, args: ServerArgs, rank: int = 0) -> None:
        self.args = args
        self.device = args.resolved_device
        if self.device == "cuda":
            torch.cuda.set_device(rank)
        init_distributed(rank, args.tp, self.device, args.dist_port)
        self.tp = get_tp_info()
        self.model_path = resolve_model_path(args.model)
        self.cfg = ModelConfig.from_dir(self.model_path)
        self.dtype = self._resolve_dtype()
        self.max_seq_len = self.cfg.context_len(args.max_seq_len)
        self.page_size = args.page_size or (1 if self.device == "cpu" else 64)
        self.max_reqs = args.max_running_requests

        # parameters are created in their final dtype: made in float32 and cast, the freed
        # float32 copies stayed in torch's cache and were counted as used by the KV sizing
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = create_model(self.cfg, self.max_seq_len)
        finally:
            torch.set_default_dtype(default_dtype)
        # 16-bit models see 16-bit-rounded rotary tables, as in the reference implementation
        rope = self.model.model.layers[0].self_attn.rope
        rope.cos_sin = rope.cos_sin.to(self.dtype).float()
        if args.dummy_weight:
            init_dummy_weights(self.model, args.seed)
        else:
            load_weights(self.model, self.model_path, show_progress=self.tp.rank == 0)
        self.model.eval()

        kv_heads = max(1, self.cfg.num_kv_heads // self.tp.size)
        self.num_pages = self._num_pages(kv_heads)
        # one extra page past the allocator's range (page `num_pages`): scratch space for
        # padded graph entries
        self.pool = KVPool(
            self.cfg.num_layers, self.num_pages + 1, self.page_size, kv_heads, self.cfg.head_dim,
            self.dtype, self.device,
        )  # fmt: skip
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens, %.2f GiB (%s, %s)",
            self.num_pages, self.page_size, self.num_pages * self.page_size,
            2 * self.pool.k.numel() * self.pool.k.element_size() / 2**30, self.device, self.dtype,
        )  # fmt: skip
        # row `max_reqs` is a scratch row that padded CUDA-graph entries point at
        self.slots = SlotTable(self.max_reqs + 1, self.max_seq_len, self.device)
        self.next_tokens = torch.zeros(self.max_reqs + 1, dtype=torch.int64, device=self.device)
        # debug mode: memory that must be written before it is read starts as NaN / out-of-range
        # ids, and every sampled-from logit row is checked for non-finite values (issue 15)
        self.poison = env.debug_poison()
        self.nonfinite_logits = torch.zeros((), dtype=torch.int64, device=self.device)
        if self.poison:
            self.pool.k.fill_(float("nan"))
            self.pool.v.fill_(float("nan"))
            self.next_tokens[: self.max_reqs] = self.cfg.vocab_size + POISON_ID
        self.attn = create_backend(
            args.attn, self.device, self.pool, self.slots,
            self.cfg.num_heads // self.tp.size, kv_heads, self.cfg.head_dim,
        )  # fmt: skip
        self.sampler = Sampler(self.device, args.seed + 1, self.cfg.eos_token_ids)
        self._sinfo: SamplingInfo | None = None
        self._sinfo_key: tuple = ()
        self.graphs: GraphRunner | None = None
        graph_bs = args.cuda_graph_max_bs
        max_bs = min(256 if graph_bs is None else graph_bs, self.max_reqs)
        if self.device == "cuda":
            if max_bs and self.attn.supports_graph:
                self.graphs = GraphRunner(
                    self.model, self.attn, self.slots, self.next_tokens, max_bs,
                    scratch_row=self.max_reqs, scratch_slot=self.num_pages * self.page_size,
                    seed=args.seed + 1, poison=self.poison,
                )  # fmt: skip
            # what exists now lives as long as the process: keep it out of the collector's
            # full passes, which otherwise walk every imported module's objects mid-decode
            gc.collect()
            gc.freeze()

    def _resolve_dtype(self) -> torch.dtype:
        if self.args.dtype != "auto":
            return _DTYPES[self.args.dtype]
        if self.device == "cpu":
            return torch.float32
        return _DTYPES.get(self.cfg.torch_dtype, torch.bfloat16)

    def _num_pages(self, kv_heads: int) -> int:
        if self.args.num_pages:
            return self.args.num_pages
        cfg = self.cfg
        per_token = KVPool.bytes_per_token(cfg.num_layers, kv_heads, cfg.head_dim, self.dtype)
        if self.device == "cpu":
            tokens = min(32768, (2 << 30) // per_token)
        else:
            torch.cuda.empty_cache()  # what torch caches but no tensor holds is free for the KV
            free, total = torch.cuda.mem_get_info()
            # keep (1 - memory_ratio) of the card free, plus room for activations and graphs
            budget = free - total * (1 - self.args.memory_ratio) - (3 << 30)
            if budget <= 0:
                raise RuntimeError(
                    "not enough GPU memory left for the KV cache; raise --memory-ratio"
                )
            tokens = int(budget // per_token)
        return max(2, tokens // self.page_size)

    @property
    def max_tokens_in_pool(self) -> int:
        return self.num_pages * self.page_size

    def _meta(self, batch: Batch) -> tuple[AttnMeta, torch.Tensor]:
        """All per-step host metadata goes to the device in one pinned copy, together with the
        slot-table entries the scheduler changed since the last step and this step's new ones."""
        rows = np.array([r.table_idx for r in batch.reqs], dtype=np.int64)
        prefix = np.array(batch.prefix_lens, dtype=np.int64)
        ext = np.array(batch.extend_lens, dtype=np.int64)
        seq = prefix + ext
        if batch.is_prefill:
            row_of_token, positions = token_coords(rows, prefix, seq)
        else:
            positions, row_of_token = prefix, rows
        out_loc = np.asarray(batch.out_loc, dtype=np.int64)
        stale_rows, stale_pos, stale_val = self.slots.take_stale()
        b, t, w = len(rows), len(positions), len(positions) + len(stale_rows)
        # then the slot-table writes: (rows, positions, slots) of the new tokens and stale entries
        packed = np.concatenate([rows, prefix, ext, seq, out_loc, positions, row_of_token, stale_rows,
                                 positions, stale_pos, out_loc, stale_val])  # fmt: skip
        packed = h2d(torch.from_numpy(packed), self.device)
        d_rows, d_prefix, d_ext, d_seq, d_loc, d_pos, d_wrow, d_wpos, d_wval = packed.split(
            [b, b, b, b, t, t, w, w, w]
        )
        meta = AttnMeta(
            batch.is_prefill, d_rows, d_prefix, d_ext, d_seq, d_loc,
            list(batch.prefix_lens), list(batch.extend_lens), rows.tolist(),
        )  # fmt: skip
        # record the new slots in the table so attention (and later steps) can find them
        self.slots.device[d_wrow, d_wpos] = d_wval.to(torch.int32)
        return meta, d_pos

    def _flush_stale_slots(self) -> None:
        """Write slot-table entries the scheduler changed on the host (for steps that do not
        go through `_meta`, i.e. CUDA-graph decode steps)."""
        stale = self.slots.take_stale()
        if stale[0].size:
            r, p, v = h2d(torch.from_numpy(np.concatenate(stale)), self.device).split(len(stale[0]))
            self.slots.device[r, p] = v.to(torch.int32)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> StepOutput:
        """Launch one step: its KV writes and the sampled tokens (copied to the host)."""
        if batch.kv_copy is not None:
            self.pool.copy(
                *h2d(torch.from_numpy(np.concatenate(batch.kv_copy)), self.device).chunk(2)
            )
        if self.graphs is not None and self.graphs.can_run(batch):
            return self._forward_graph(batch)
        meta, h = self._run_model(batch)
        if batch.is_prefill:
            h = h[h2d(torch.tensor(batch.extend_lens).cumsum(0) - 1, self.device)]
        return self._sample(batch, meta.rows, self.model.logits(h))

    @torch.inference_mode()
    def prefill_logits(self, batch: Batch) -> torch.Tensor:
        """The logits at every position of a prefill batch, eager, nothing sampled (tests)."""
        assert batch.is_prefill
        return self.model.logits(self._run_model(batch)[1])

    def _run_model(self, batch: Batch) -> tuple[AttnMeta, torch.Tensor]:
        """The eager forward: metadata, KV writes and the hidden states of every new token."""
        meta, positions = self._meta(batch)
        if batch.is_prefill:
            input_ids = h2d(torch.tensor(batch.input_ids, dtype=torch.int64), self.device)
        else:
            input_ids = self.next_tokens[meta.rows]
        self.attn.prepare(meta)
        return meta, self.model(input_ids, positions, self.attn)

    def _forward_graph(self, batch: Batch) -> StepOutput:
        info = self._sampling_info(batch.reqs, batch.sample_positions)
        self._flush_stale_slots()
        logits, tokens = self.graphs.run(batch, info)
        # sampled outside the graph: top-k/top-p rows, logits processing (logits.py), no Triton
        if tokens is None or info.needs_processing:
            return self._sample(batch, self.graphs.rows[: batch.size], logits)
        self._watch(logits)
        if info.logprob_rows:
            return self._launch_copy(batch, tokens, logits, info)
        host, event = self.graphs.copy_out(tokens)
        return StepOutput(batch, host, None, event)

    def _sample(self, batch: Batch, rows: torch.Tensor, logits: torch.Tensor) -> StepOutput:
        picked = [i for i, s in enumerate(batch.sample_mask) if s]
        if not picked:
            return StepOutput(batch, None, None, None)
        reqs = [batch.reqs[i] for i in picked]
        if len(picked) < batch.size:
            idx = h2d(torch.tensor(picked), self.device)
            logits, rows = logits[idx], rows[idx]
        info = self._sampling_info(reqs, batch.sample_positions)
        self._watch(logits)
        tokens = self.sampler(logits, info)
        self.next_tokens[rows] = tokens
        return self._launch_copy(batch, tokens, logits, info)

    def _watch(self, logits: torch.Tensor) -> None:
        if self.poison:  # counted on the device: no sync; read by tests and the benchmark
            self.nonfinite_logits += (~torch.isfinite(logits)).sum()

    def _launch_copy(
        self, batch: Batch, tokens: torch.Tensor, logits: torch.Tensor, info: SamplingInfo
    ) -> StepOutput:
        """Start the tokens' (and logprobs') copy to the host; the step's event marks its end."""
        logprobs = gather_logprobs(logits, tokens, info.logprob_rows) if info.logprob_rows else None
        if self.device == "cpu":
            return StepOutput(batch, tokens, logprobs, None)
        tokens = tokens.to("cpu", non_blocking=True)
        if logprobs is not None:
            logprobs = tuple(x.to("cpu", non_blocking=True) for x in logprobs)
        event = torch.cuda.Event()
        event.record()
        return StepOutput(batch, tokens, logprobs, event)

    def _sampling_info(self, reqs: list, positions: list[int]) -> SamplingInfo:
        # decode batches repeat the same requests step after step: reuse their tensors
        key = tuple(r.uid for r in reqs)
        if self._sinfo_key != key or self._sinfo.seeded:
            self._sinfo, self._sinfo_key = SamplingInfo.build(reqs, positions, self.device), key
        return self._sinfo
