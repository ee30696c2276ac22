"""The paged KV pool (device memory) and its page allocator (host bookkeeping)."""

from __future__ import annotations

import torch


class KVPool:
    """K and V for every layer: `[num_layers, num_pages * page_size, kv_heads, head_dim]`.

    Viewed as `[num_pages, page_size, kv_heads, head_dim]` per layer, this is FlashInfer's
    NHD paged layout; slot `s` lives in page `s // page_size`.
    """

    def __init__(
        self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: str,
    ) -> None:  # fmt: skip
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_layers, num_pages * page_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """KV of slots `src` into slots `dst`, every layer (one gather and one scatter each)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def paged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_pages, self.page_size, *self.k.shape[2:])
        return self.k[layer].view(shape), self.v[layer].view(shape)


class PageAllocator:
    """Free list of page ids. Lowest ids first, which keeps a fresh pool's pages contiguous."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        out = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return out

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
