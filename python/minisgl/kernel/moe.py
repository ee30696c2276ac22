"""The experts of a MoE layer as grouped GEMMs (the design of vLLM's and SGLang's fused_moe).

The T x k (token, expert) pairs are sorted by expert and each expert's run is padded to a
multiple of BLOCK_M, so every BLOCK_M-row tile of the sorted list belongs to one expert; a
GEMM program then multiplies one tile by that expert's weights. Three Triton kernels build the
sorted list on the device (count per expert, padded prefix sums and each tile's expert, then
scatter by atomic slot), one GEMM does gate_up with SiLU-and-mul in its epilogue and one does
down times the router weight; each (token, expert) row is written to its own slot, and the k
rows of a token are summed afterwards, so results do not depend on the atomics' order. Every
buffer is sized for the worst case (T k + min(E, T k)(BLOCK_M - 1) rows) and tiles past the
real length exit at once: no host sync, no data-dependent shape, so it runs inside CUDA graphs.

CPU tensors take `fused_moe_torch` (a loop over the experts hit, as transformers computes
them), which is also the reference the GPU tests compare the kernels against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_ops


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H], w13 [E, 2I, H]
    (gate rows, then up rows), w2 [E, H, I]; returns [T, H] in x's dtype."""
    if triton_ops.available(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "MoE layers inside CUDA graphs need the Triton kernels (is MINISGL_DISABLE_KERNELS "
            "set?); or pass --cuda-graph-max-bs 0"
        )
    return fused_moe_torch(x, w13, w2, topk_weights, topk_ids)


def fused_moe_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # host sync: eager only
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tokens = pairs // k
        gate, up = F.linear(x[tokens], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * topk_weights.flatten()[pairs, None]
        out.index_add_(0, tokens, y)
    return out


def _config(pairs: int, num_experts: int) -> dict[str, int]:
    # row tiles of 16 (tl.dot's minimum) to 64 rows, about twice what one expert gets: at
    # decode most experts then take one tile, so their weights are read once; the same K
    # step for every tile size, so a row's sums do not change with the batch's size
    m = min(64, max(16, 1 << (max(1, 2 * pairs // num_experts) - 1).bit_length()))
    return dict(BLOCK_M=m, BLOCK_N=64, BLOCK_K=64, GROUP_M=m // 8, num_warps=4)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids, padded with T k; each tile's expert; the padded length [1]), on the
    device, with shapes that depend only on T, k, E and block_m."""
    pairs, dev = topk_ids.numel(), topk_ids.device
    pad_len = pairs + min(num_experts, pairs) * (block_m - 1)
    tiles = -(-pad_len // block_m)
    sorted_ids = torch.full((pad_len,), pairs, dtype=torch.int32, device=dev)  # T k: padding
    expert_ids = torch.empty(tiles, dtype=torch.int32, device=dev)
    # counts per expert, then (after the prefix sums) each expert's next free slot
    slots = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    padded_len = torch.empty(1, dtype=torch.int32, device=dev)
    k, ep, block = triton_ops._kernels(), 1 << (num_experts - 1).bit_length(), 256
    grid = (-(-pairs // block),)
    # counting: 128 pairs x EP experts compared per program (64 values a thread at 8 warps)
    k.moe_count_kernel[(-(-pairs // 128),)](
        topk_ids, slots, pairs, E=num_experts, EP=ep, BLOCK=128, num_warps=8
    )
    k.moe_offsets_kernel[(1,)](
        slots, expert_ids, padded_len, tiles, E=num_experts, EP=ep, BLOCK_M=block_m, CHUNK=64
    )
    k.moe_scatter_kernel[grid](topk_ids, slots, sorted_ids, pairs, BLOCK=block)
    return sorted_ids, expert_ids, padded_len


def fused_moe_triton(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, config: dict[str, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """`fused_moe` through the kernels; `config` (tile sizes, warps) overrides `_config`'s
    choice, for benchmark/micro/moe_micro.py's sweeps."""
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, inter = w13.shape[0], w2.shape[2]
    pairs = t * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    cfg = config or _config(pairs, num_experts)
    sorted_ids, expert_ids, padded_len = moe_align(topk_ids, num_experts, cfg["BLOCK_M"])
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    kern = triton_ops._kernels().moe_gemm_kernel
    f32 = x.dtype == torch.float32 or not x.is_cuda  # not x.is_cuda: triton's interpreter
    for a, w, out, n, kdim, first in ((x, w13, h, inter, hidden, True), (h, w2, y, hidden, inter, False)):  # fmt: skip
        grid = (expert_ids.shape[0] * -(-n // cfg["BLOCK_N"]),)
        kern[grid](
            a, w, out, topk_weights, sorted_ids, expert_ids, padded_len, pairs, n, kdim,
            a.stride(0), w.stride(0), w.stride(1), out.stride(0),
            A_DIV=top_k if first else 1, SILU_MUL=first, WEIGHTED=not first, F32=f32,
            EVEN_K=kdim % cfg["BLOCK_K"] == 0, **cfg,
        )  # fmt: skip
    return y.view(t, top_k, hidden).sum(dim=1)
