"""FlashInfer paged attention: prefill (with a cached prefix; FA3 on Hopper) and decode,
planned once per batch on host metadata, with fixed-size decode wrappers for CUDA graphs (the
large buckets replay the eager plan, which skips the graph plan's split-KV merge)."""

from __future__ import annotations

import builtins

import numpy as np
import torch

from .. import env
from ..kvcache.pool import KVPool
from ..kvcache.slots import SlotTable, token_coords
from .base import AttentionBackend, AttnMeta


def _tensor_max(*args: object, **kw: object) -> object:
    if len(args) == 1 and not kw and isinstance(args[0], torch.Tensor):
        return args[0].max()
    return builtins.max(*args, **kw)


def _import_flashinfer():  # noqa: ANN202
    try:
        import flashinfer
        import flashinfer.prefill
    except ImportError as e:
        raise ImportError(
            "--attn fi needs FlashInfer: pip install 'minisgl[cuda]' (flashinfer-python)"
        ) from e
    # the prefill plan takes Python's max() over host tensors, which iterates them element by
    # element: ~3 ms per plan at 128 requests, with the GPU idle (measured on the H100). A
    # module-level `max` that reduces tensors in one call shadows the builtin there.
    flashinfer.prefill.max = _tensor_max
    import flashinfer.decode  # its tensor-core plan takes the same max()

    flashinfer.decode.max = _tensor_max
    return flashinfer


class FlashInferBackend(AttentionBackend):
    supports_graph = True

    def __init__(
        self, pool: KVPool, slots: SlotTable, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        super().__init__(pool, slots, num_heads, num_kv_heads, head_dim)
        if head_dim not in (64, 128, 256) or pool.k.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"--attn fi supports head_dim 64/128/256 in float16/bfloat16, not {head_dim} in {pool.k.dtype}; "
                "use --attn torch"
            )
        self.fi = fi = _import_flashinfer()
        self.ps = pool.page_size
        dev = pool.k.device
        self.workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
        self.prefill = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="auto")
        # decode on the H200 (benchmark/micro/attn_micro.py, bs 170, ctx ~1K, page 256): tensor cores
        # through FA2 3.3-3.4 TB/s at GQA group 2 and 4; CUDA cores 2.9 / 2.0 TB/s; tensor cores
        # through FA3 (what FlashInfer's "auto" picks on Hopper) 1.6 / 0.9 TB/s
        group = num_heads // num_kv_heads
        self.tensor_cores = env.fi_tensor_cores(group >= 2)
        self.decode_backend = env.fi_decode_backend()
        self.decode = self._decode_wrapper()
        self.graph_wrappers: dict[tuple[int, int], object] = {}
        self.active = self.decode

    def _decode_wrapper(self, **graph_buffers: torch.Tensor) -> object:
        return self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=bool(graph_buffers),
            use_tensor_cores=self.tensor_cores, backend=self.decode_backend, **graph_buffers,
        )  # fmt: skip

    # -- metadata ---------------------------------------------------------------------------
    def _page_indices(self, meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr on host, page ids on device, last page lengths on host), read from the host
        copy of the slot table: one pinned copy, no gather kernels."""
        seq = np.asarray(meta.seq_lens_host, dtype=np.int64)
        pages = (seq + self.ps - 1) // self.ps
        indptr = np.zeros(len(seq) + 1, dtype=np.int32)
        np.cumsum(pages, out=indptr[1:])
        rows = np.asarray(meta.rows_host, dtype=np.int64)
        row_of_page, page = token_coords(rows, np.zeros_like(pages), pages)
        indices = (self.host_slots[row_of_page, page * self.ps] // self.ps).astype(np.int32)
        dev = self.pool.k.device
        # pinned: plan() copies indptr and last without a sync
        return (
            torch.from_numpy(indptr).pin_memory(),
            torch.from_numpy(indices).pin_memory().to(dev, non_blocking=True),
            torch.from_numpy((seq - (pages - 1) * self.ps).astype(np.int32)).pin_memory(),
        )

    def prepare(self, meta: AttnMeta) -> None:
        self.meta = meta
        dtype = self.pool.k.dtype
        if meta.is_prefill:
            indptr, indices, last = self._page_indices(meta)
            qo = torch.zeros(len(meta.extend_lens_host) + 1, dtype=torch.int32)
            torch.cumsum(torch.tensor(meta.extend_lens_host, dtype=torch.int32), 0, out=qo[1:])
            self.prefill.plan(
                qo, indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, self.ps,
                causal=True, sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype,
            )  # fmt: skip
            self.active = self.prefill
        else:
            self._plan_decode(self.decode, meta)

    def _plan_decode(self, wrapper: object, meta: AttnMeta) -> None:
        """Plan `wrapper` for the decode batch `meta` and make it the one `forward` runs."""
        indptr, indices, last = self._page_indices(meta)
        dtype = self.pool.k.dtype
        wrapper.plan(
            indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, self.ps,
            sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype,
        )  # fmt: skip
        self.active = wrapper

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: int
    ) -> torch.Tensor:
        self.store_kv(layer, k, v)
        return self.active.run(q, self.pool.paged(layer))

    # -- CUDA graphs ------------------------------------------------------------------------
    def init_graph(self, max_bs: int) -> None:
        self.max_graph_pages = self.pool.num_pages + max_bs
        # FlashInfer's FA2 plan gives 2 CTAs per SM to a split: past this many requests its own
        # eager plan never splits (one CTA per request and KV head), while its graph-mode plan
        # always runs the split path and its merge kernel (9 us of 178 per 8B layer at batch 256,
        # the engine's lengths: benchmark/micro/attn_graph.py). Those buckets replay an eager plan.
        props = torch.cuda.get_device_properties(self.pool.k.device)
        self.eager_plan_bs = 2 * props.multi_processor_count // self.num_kv_heads

    def prepare_graph_capture(self, bs: int, meta: AttnMeta, buf: int = 0) -> None:
        dev = self.pool.k.device
        if bs > self.eager_plan_bs:
            wrapper = _EagerPlanInGraph(self._decode_wrapper(), bs, self.max_graph_pages)
        else:
            wrapper = self._decode_wrapper(
                paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(self.max_graph_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(bs, dtype=torch.int32, device=dev),
            )  # fmt: skip
        self.graph_wrappers[bs, buf] = wrapper
        self.meta = meta
        self._plan_decode(wrapper, meta)

    def prepare_graph_replay(self, bs: int, meta: AttnMeta, buf: int = 0) -> None:
        self._plan_decode(self.graph_wrappers[bs, buf], meta)


class _EagerPlanInGraph:
    """A decode wrapper planned as in eager mode and replayed in a CUDA graph. The captured
    kernel reads the buffers it was captured with, so each plan's fresh index tensors are copied
    into fixed ones; and its grid is the plan's batch, so a plan that differs from the captured
    one (a split, other offsets) is refused rather than run on the wrong grid."""

    BUFFERS = ("_qo_indptr_buf", "_paged_kv_indptr_buf", "_paged_kv_indices_buf",
               "_paged_kv_last_page_len_buf")  # fmt: skip

    def __init__(self, wrapper: object, bs: int, max_pages: int) -> None:
        self.wrapper, self.captured = wrapper, None
        dev = wrapper._int_workspace_buffer.device
        sizes = (bs + 1, bs + 1, max_pages, bs)
        self.fixed = {
            n: torch.zeros(k, dtype=torch.int32, device=dev) for n, k in zip(self.BUFFERS, sizes)
        }

    def plan(self, *args: object, **kw: object) -> None:
        w = self.wrapper
        w.plan(*args, **kw)
        if self.captured is None:
            self.captured = list(w._plan_info)
        elif list(w._plan_info) != self.captured:
            raise RuntimeError(
                f"decode plan {w._plan_info} differs from the captured {self.captured}"
            )
        for name, buf in self.fixed.items():
            fresh = getattr(w, name)
            buf[: len(fresh)].copy_(fresh, non_blocking=True)
            setattr(w, name, buf)

    def run(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.wrapper.run(q, kv)
