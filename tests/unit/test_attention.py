"""Attention backends on CPU: the torch backend against a dense reference for a batched
prefill with cached prefixes and a decode batch of mixed lengths; backend selection errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minisgl.attention import create_backend
from minisgl.attention.base import AttnMeta
from minisgl.attention.flashattn import _import_varlen
from minisgl.kvcache.pool import KVPool
from minisgl.kvcache.slots import SlotTable

H, KV, D = 4, 2, 16


def _setup(lens: list[int]) -> tuple[KVPool, SlotTable, torch.Tensor, torch.Tensor]:
    pool = KVPool(1, 64, 4, KV, D, torch.float32, "cpu")
    table = SlotTable(len(lens), 64, "cpu")
    perm = torch.randperm(256)
    k_all = torch.randn(len(lens), max(lens), KV, D)
    v_all = torch.randn_like(k_all)
    for r, n in enumerate(lens):
        table.host[r, :n] = perm[r * 64 : r * 64 + n]
        table.device[r, :n] = perm[r * 64 : r * 64 + n].int()
    return pool, table, k_all, v_all


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """Dense causal attention of the new queries (positions prefix..) over all keys."""
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(prefix)
    return torch.einsum("hqk,khd->qhd", F.softmax(scores.masked_fill(~mask, float("-inf")), -1), v)


@pytest.mark.parametrize("is_prefill", [True, False])
def test_torch_backend_matches_dense_reference(is_prefill: bool) -> None:
    """The torch backend, for three requests of different lengths whose cached prefixes already sit
    in scattered pool slots, gives the same output as dense causal attention over each whole
    sequence (within 1e-5), both for a prefill of several new tokens per request and for a decode of
    one."""
    torch.manual_seed(0)
    lens = [7, 19, 3]
    extends = [4, 6, 3] if is_prefill else [1, 1, 1]
    prefixes = [n - e for n, e in zip(lens, extends)]
    pool, table, k_all, v_all = _setup(lens)
    for r, p in enumerate(prefixes):  # the cached prefix is already in the pool
        slots = table.host[r, :p]
        pool.k[0][slots], pool.v[0][slots] = k_all[r, :p], v_all[r, :p]
    backend = create_backend("torch", "cpu", pool, table, H, KV, D)
    out_loc = torch.cat(
        [table.host[r, p : p + e] for r, (p, e) in enumerate(zip(prefixes, extends))]
    )
    t = lambda x: torch.tensor(x)  # noqa: E731
    meta = AttnMeta(
        is_prefill,
        t([0, 1, 2]),
        t(prefixes),
        t(extends),
        t(lens),
        out_loc,
        prefixes,
        extends,
        [0, 1, 2],
    )
    backend.prepare(meta)
    q = torch.randn(sum(extends), H, D)
    k_new = torch.cat([k_all[r, p : p + e] for r, (p, e) in enumerate(zip(prefixes, extends))])
    v_new = torch.cat([v_all[r, p : p + e] for r, (p, e) in enumerate(zip(prefixes, extends))])
    out = backend.forward(q, k_new, v_new, 0)
    start = 0
    for r, (p, e) in enumerate(zip(prefixes, extends)):
        ref = _reference(q[start : start + e], k_all[r, : p + e], v_all[r, : p + e], p)
        torch.testing.assert_close(out[start : start + e], ref, atol=1e-5, rtol=1e-5)
        start += e


def test_backend_selection_errors() -> None:
    """An unknown backend name raises a ValueError listing auto, torch, fi and fa; asking for "fi"
    on CPU raises one saying it needs a GPU; "auto" on CPU picks the torch backend."""
    pool, table, _, _ = _setup([4])
    with pytest.raises(ValueError, match="choose auto, torch, fi, fa"):
        create_backend("bogus", "cpu", pool, table, H, KV, D)
    with pytest.raises(ValueError, match="needs a GPU"):
        create_backend("fi", "cpu", pool, table, H, KV, D)
    assert type(create_backend("auto", "cpu", pool, table, H, KV, D)).__name__ == "TorchBackend"


def test_flash_attention_missing_names_the_package() -> None:
    """Where flash-attn is not installed (skipped where it is), loading its varlen kernel raises an
    ImportError that names the flash-attn package."""
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="flash-attn"):
        _import_varlen()
