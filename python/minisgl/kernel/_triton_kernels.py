"""The Triton kernels behind `triton_ops` (imported only where triton is installed)."""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def qk_rope_store_kernel(
    qkv, q_out, k_cache, v_cache, loc, pos, cos_sin, q_w, k_w, eps,
    qkv_stride, cs_stride,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    # one token, G heads of one kind: q heads, then k heads, then v heads (G divides HQ and
    # HKV); rows are heads, columns the two rotary halves
    t = tl.program_id(0)
    h0 = tl.program_id(1) * G
    half: tl.constexpr = D // 2
    offs = tl.arange(0, half)[None, :]
    heads = tl.arange(0, G)[:, None]
    src = qkv + t * qkv_stride + (h0 + heads) * D
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + half + offs).to(tl.float32)
    slot = tl.load(loc + t)
    if h0 >= HQ + HKV:  # V: stored as is
        dst = v_cache + slot * (HKV * D) + (h0 - HQ - HKV + heads) * D
        tl.store(dst + offs, x1.to(v_cache.dtype.element_ty))
        tl.store(dst + half + offs, x2.to(v_cache.dtype.element_ty))
    else:
        if NORM:  # round like the torch path: normalise, to 16 bits, times the weight
            r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
            if h0 < HQ:
                w1, w2 = tl.load(q_w + offs), tl.load(q_w + half + offs)
            else:
                w1, w2 = tl.load(k_w + offs), tl.load(k_w + half + offs)
            x1 = (w1 * (x1 * r).to(w1.dtype)).to(tl.float32)
            x2 = (w2 * (x2 * r).to(w2.dtype)).to(tl.float32)
        p = tl.load(pos + t)
        cos = tl.load(cos_sin + p * cs_stride + offs)
        sin = tl.load(cos_sin + p * cs_stride + half + offs)
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if h0 < HQ:
            dst = q_out + t * (HQ * D) + (h0 + heads) * D
        else:
            dst = k_cache + slot * (HKV * D) + (h0 - HQ + heads) * D
        tl.store(dst + offs, y1.to(q_out.dtype.element_ty))
        tl.store(dst + half + offs, y2.to(q_out.dtype.element_ty))


@triton.jit
def _gumbel_step(best, best_i, src, cols, r, V, scale, noise, FAST: tl.constexpr):
    x = tl.load(src + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    # 23 random bits: (k + 0.5) / 2^23 stays inside (0, 1) in float32 (with 24 bits the top
    # value rounds to 1.0, whose Gumbel noise is +inf)
    u = ((r >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    if FAST:
        g = -libdevice.fast_log2f(-libdevice.fast_log2f(u))
    else:
        g = -tl.log2(-tl.log2(u))
    score = x * scale + g * noise
    better = score > best  # strict: earlier columns win ties
    return tl.where(better, score, best), tl.where(better, cols, best_i)


@triton.jit
def gumbel_argmax_kernel(
    logits, temps, seeds, out_val, out_idx, V, stride, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr, SPLITS: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # Gumbel-max: argmax(logits / T + G) with G = -ln(-ln U) is a draw from
    # softmax(logits / T); compared in base 2 (the same argmax), with one Philox call
    # giving the uniforms of four columns
    row = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.load(temps + row)
    scale = tl.where(t > 0, 1.4426950408889634 / t, 1.0)  # log2(e) / T
    noise = tl.where(t > 0, 1.0, 0.0)  # greedy rows: plain argmax
    seed = tl.load(seeds + row)
    Q: tl.constexpr = BLOCK // 4
    best = tl.full([Q], float("-inf"), tl.float32)
    best_i = tl.zeros([Q], tl.int32)
    start = split * CHUNK
    for off in range(start, start + CHUNK, BLOCK):
        lane = off + tl.arange(0, Q)
        r0, r1, r2, r3 = tl.randint4x(seed, lane)
        src = logits + row * stride
        best, best_i = _gumbel_step(best, best_i, src, lane, r0, V, scale, noise, FAST)
        best, best_i = _gumbel_step(best, best_i, src, lane + Q, r1, V, scale, noise, FAST)
        best, best_i = _gumbel_step(best, best_i, src, lane + 2 * Q, r2, V, scale, noise, FAST)
        best, best_i = _gumbel_step(best, best_i, src, lane + 3 * Q, r3, V, scale, noise, FAST)
    m = tl.max(best, axis=0)
    i = tl.min(tl.where(best == m, best_i, 2147483647), axis=0)
    tl.store(out_val + row * SPLITS + split, m)
    tl.store(out_idx + row * SPLITS + split, i)


@triton.jit
def gumbel_finish_kernel(vals, idx, tokens, rows, next_tokens, SPLITS: tl.constexpr, SCATTER: tl.constexpr):  # fmt: skip
    # the row's winner across its splits: the first split holding the maximum (the lowest
    # column among equal scores, as within a split); also stored at next_tokens[rows[row]]
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    v = tl.load(vals + row * SPLITS + s)
    first = tl.min(tl.where(v == tl.max(v, axis=0), s, SPLITS), axis=0)
    tok = tl.sum(tl.where(s == first, tl.load(idx + row * SPLITS + s), 0), axis=0).to(tl.int64)
    tl.store(tokens + row, tok)
    if SCATTER:
        tl.store(next_tokens + tl.load(rows + row), tok)


@triton.jit
def decode_prologue_kernel(
    meta, meta_stride, next_tokens, slot_table, st_stride, input_ids, rows, positions, out_loc,
    bs, BLOCK: tl.constexpr,
):  # fmt: skip
    # a graph step's inputs from its int32 metadata rows (request row, position, new KV slot):
    # int64 copies for the model, the input ids gathered from the last step's tokens, and the
    # new slots recorded in the slot table
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < bs
    r = tl.load(meta + i, mask=mask, other=0).to(tl.int64)
    p = tl.load(meta + meta_stride + i, mask=mask, other=0).to(tl.int64)
    o = tl.load(meta + 2 * meta_stride + i, mask=mask, other=0)
    tl.store(rows + i, r, mask=mask)
    tl.store(positions + i, p, mask=mask)
    tl.store(out_loc + i, o.to(tl.int64), mask=mask)
    tl.store(input_ids + i, tl.load(next_tokens + r, mask=mask, other=0), mask=mask)
    tl.store(slot_table + r * st_stride + p, o.to(slot_table.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ MoE (see kernel/moe.py)


@triton.jit
def moe_count_kernel(topk_ids, counts, n, E: tl.constexpr, EP: tl.constexpr, BLOCK: tl.constexpr):
    # pairs per expert: one compare matrix per block of pairs, one vector atomic per program
    # (BLOCK x EP values: kept small enough for registers)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(topk_ids + i, mask=i < n, other=-1)
    e = tl.arange(0, EP)
    c = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.atomic_add(counts + e, c, mask=e < E)


@triton.jit
def moe_offsets_kernel(
    slots, expert_ids, padded_len, tiles,
    E: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    # one program: each expert's run padded to BLOCK_M, its start (the scatter's first slot)
    # and the owner of every tile
    e = tl.arange(0, EP)
    counts = tl.load(slots + e, mask=e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(slots + e, ends - padded, mask=e < E)
    tl.store(padded_len, tl.sum(padded, axis=0))
    for start in range(0, tiles, CHUNK):
        b = start + tl.arange(0, CHUNK)
        owner = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids + b, tl.minimum(owner, E - 1), mask=b < tiles)


@triton.jit
def moe_scatter_kernel(topk_ids, slots, sorted_ids, n, BLOCK: tl.constexpr):
    # each pair takes the next free slot of its expert; the order within an expert varies
    # between runs, but every row is computed and written on its own
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    e = tl.load(topk_ids + i, mask=mask, other=0)
    pos = tl.atomic_add(slots + e, 1, mask=mask)
    tl.store(sorted_ids + pos, i, mask=mask)


@triton.jit
def _mma(x, w, acc, F32: tl.constexpr):
    # F32: float32 products (no TF32), for float32 models and for the interpreter, whose
    # 16-bit tl.dot is wrong; 16-bit products are exact in float32, so the sums agree
    if F32:
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def moe_gemm_kernel(
    a, w, out, topk_w, sorted_ids, expert_ids, padded_len, n_pairs, N, K,
    stride_am, stride_we, stride_wn, stride_om,
    A_DIV: tl.constexpr, SILU_MUL: tl.constexpr, WEIGHTED: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    # out[pair, :N] = a[pair // A_DIV] @ w[expert]^T for one BLOCK_M tile of sorted pairs.
    # SILU_MUL: w holds gate rows [0, N) and up rows [N, 2N); silu(gate) * up is stored.
    # WEIGHTED: rows scaled by the pair's router weight. Tiles are grouped GROUP_M at a time
    # along M so neighbouring programs share weight tiles in L2
    pid = tl.program_id(0)
    tiles_m = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    if pid_m * BLOCK_M >= tl.load(padded_len):
        return
    rows = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < n_pairs
    expert = tl.load(expert_ids + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptr = a + (rows // A_DIV).to(tl.int64)[:, None] * stride_am + ks[None, :]
    w_ptr = w + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # no mask along K, the contiguous dimension: 16-byte vector loads
            xmask, wmask = valid[:, None], cols[None, :] < N
        else:
            xmask, wmask = valid[:, None] & (ks[None, :] < K - k0), (ks[:, None] < K - k0) & (cols[None, :] < N)  # fmt: skip
        x = tl.load(a_ptr, mask=xmask, other=0.0)
        wt = tl.load(w_ptr, mask=wmask, other=0.0)
        acc = _mma(x, wt, acc, F32)
        if SILU_MUL:
            acc_up = _mma(x, tl.load(w_ptr + N * stride_wn, mask=wmask, other=0.0), acc_up, F32)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    if SILU_MUL:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(topk_w + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    dst = out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))
