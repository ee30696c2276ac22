"""The engine: model + KV pool + attention backend + sampler. One call runs one forward of a
prefill or decode batch (KV writes included) and samples; it knows nothing of scheduling."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..args import ServerArgs
from ..attention import create_backend
from ..attention.base import AttnMeta
from ..core import Batch
from ..distributed import get_tp_info, init_distributed
from ..kvcache.pool import KVPool
from ..models import ModelConfig, check_architecture, create_model
from ..models.weights import init_dummy_weights, load_weights, resolve_model_path
from .sampler import Sampler, SamplingInfo, gather_logprobs

log = logging.getLogger("minisgl.engine")
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
        check_architecture(self.cfg)
        self.dtype = self._resolve_dtype()
        self.max_seq_len = args.max_seq_len or self.cfg.max_position_embeddings
        self.page_size = args.page_size or (1 if self.device == "cpu" else 16)
        self.max_reqs = args.max_running_requests

        with torch.device(self.device):
            self.model = create_model(self.cfg, self.max_seq_len).to(self.dtype)
        if args.dummy_weight:
            init_dummy_weights(self.model, args.seed)
        else:
            load_weights(self.model, self.model_path, show_progress=self.tp.is_primary)
        self.model.eval()

        kv_heads = max(1, self.cfg.num_kv_heads // self.tp.size)
        self.num_pages = self._num_pages(kv_heads)
        # one extra page past the allocator's range: scratch space for padded graph entries
        self.scratch_page = self.num_pages
        self.pool = KVPool(
            self.cfg.num_layers,
            self.num_pages + 1,
            self.page_size,
            kv_heads,
            self.cfg.head_dim,
            self.dtype,
            self.device,
        )
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens, %.2f GiB (%s, %s)",
            self.num_pages, self.page_size, self.num_pages * self.page_size,
            2 * self.pool.k.numel() * self.pool.k.element_size() / 2**30, self.device, self.dtype,
        )  # fmt: skip
        # row `max_reqs` is a scratch row that padded CUDA-graph entries point at
        self.slot_table = torch.zeros(
            self.max_reqs + 1, self.max_seq_len, dtype=torch.int32, device=self.device
        )
        self.next_tokens = torch.zeros(self.max_reqs + 1, dtype=torch.int64, device=self.device)
        self.attn = create_backend(
            args.attn, self.device, self.pool, self.slot_table,
            self.cfg.num_heads // self.tp.size, kv_heads, self.cfg.head_dim,
        )  # fmt: skip
        self.sampler = Sampler(self.device, args.seed + 1)
        self.graphs = None
        if self.device == "cuda":
            from .graph import maybe_create_graph_runner

            self.graphs = maybe_create_graph_runner(self)

    def _resolve_dtype(self) -> torch.dtype:
        if self.args.dtype != "auto":
            return _DTYPES[self.args.dtype]
        if self.device == "cpu":
            return torch.float32
        return _DTYPES.get(self.cfg.torch_dtype, torch.bfloat16)

    def _num_pages(self, kv_heads: int) -> int:
        per_token = KVPool.bytes_per_token(
            self.cfg.num_layers, kv_heads, self.cfg.head_dim, self.dtype
        )
        if self.args.num_pages:
            return self.args.num_pages
        if self.device == "cpu":
            tokens = min(32768, (2 << 30) // per_token)
        else:
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

    def write_slots(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Point positions [start, start + len) of a request's row at existing KV slots."""
        self.slot_table[row, start : start + len(slots)].copy_(
            slots.to(torch.int32), non_blocking=True
        )

    def _meta(self, batch: Batch) -> tuple[AttnMeta, torch.Tensor, torch.Tensor]:
        rows = [r.table_idx for r in batch.reqs]
        positions = torch.cat(
            [torch.arange(p, p + e) for p, e in zip(batch.prefix_lens, batch.extend_lens)]
        )
        row_of_token = torch.repeat_interleave(torch.tensor(rows), torch.tensor(batch.extend_lens))
        dev = self.device

        def put(x: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
            return (t.pin_memory() if dev == "cuda" else t).to(dev, dtype=dtype, non_blocking=True)

        seq = [p + e for p, e in zip(batch.prefix_lens, batch.extend_lens)]
        meta = AttnMeta(
            is_prefill=batch.is_prefill,
            rows=put(rows, torch.int64),
            prefix_lens=put(batch.prefix_lens, torch.int32),
            extend_lens=put(batch.extend_lens, torch.int32),
            seq_lens=put(seq, torch.int32),
            out_loc=put(batch.out_loc, torch.int64),
            prefix_lens_host=list(batch.prefix_lens),
            extend_lens_host=list(batch.extend_lens),
            rows_host=rows,
        )
        positions_d, row_of_token_d = put(positions, torch.int64), put(row_of_token, torch.int64)
        # record the new slots in the table so attention (and later steps) can find them
        self.slot_table[row_of_token_d, positions_d] = meta.out_loc.to(torch.int32)
        return meta, positions_d, row_of_token_d

    @torch.inference_mode()
    def forward(self, batch: Batch, all_logits: bool = False) -> StepOutput:
        meta, positions, row_of_token = self._meta(batch)
        if batch.is_prefill:
            input_ids = torch.tensor(batch.input_ids, dtype=torch.int64)
            input_ids = (input_ids.pin_memory() if self.device == "cuda" else input_ids).to(
                self.device, non_blocking=True
            )
        else:
            input_ids = self.next_tokens[meta.rows]
        if self.graphs is not None and self.graphs.can_run(batch):
            h = self.graphs.run(batch, meta, input_ids, positions)
        else:
            self.attn.prepare(meta)
            h = self.model(input_ids, positions, self.attn)
        if all_logits:
            return StepOutput(batch, self.model.logits(h), None, None)
        if batch.is_prefill:
            last = torch.tensor(batch.extend_lens).cumsum(0) - 1
            h = h[last.to(self.device, non_blocking=True)]
        return self._sample(batch, meta, self.model.logits(h))

    def _sample(self, batch: Batch, meta: AttnMeta, logits: torch.Tensor) -> StepOutput:
        rows = [i for i, s in enumerate(batch.sample_mask) if s]
        if not rows:
            return StepOutput(batch, None, None, None)
        reqs = [batch.reqs[i] for i in rows]
        if len(rows) < batch.size:
            logits = logits[torch.tensor(rows, device=self.device)]
        info = SamplingInfo.build(reqs, batch.sample_positions, self.device)
        tokens = self.sampler(logits, info)
        table_rows = (
            meta.rows
            if len(rows) == batch.size
            else meta.rows[torch.tensor(rows, device=self.device)]
        )
        self.next_tokens[table_rows] = tokens
        logprobs = gather_logprobs(logits, tokens, info.logprob_rows) if info.logprob_rows else None
        if self.device == "cpu":
            return StepOutput(batch, tokens, logprobs, None)
        tokens = tokens.to("cpu", non_blocking=True)
        if logprobs is not None:
            logprobs = tuple(x.to("cpu", non_blocking=True) for x in logprobs)
        event = torch.cuda.Event()
        event.record()
        return StepOutput(batch, tokens, logprobs, event)
