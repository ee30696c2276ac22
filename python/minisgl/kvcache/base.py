"""Interface of the prefix-cache managers (`radix`, `naive`).

Everything is in token units: `kv_indices` are int64 numpy arrays of KV-pool slot indices, one
per token, and every length handed in or out is a multiple of `page_size` (a page is
`page_size` consecutive slots starting at a multiple of `page_size`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class BaseCacheManager(ABC):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    @abstractmethod
    def match_prefix(self, token_ids: list[int]) -> tuple[Any, np.ndarray]:
        """Longest cached page-aligned prefix of `token_ids`: (handle, its kv indices).

        The handle must be locked (`lock`) before the scheduler relies on the indices.
        """

    def match_partial(self, handle: Any, token_ids: list[int]) -> tuple[Any, np.ndarray]:
        """(handle to lock, kv indices) of cached tokens that start `token_ids` but fill less
        than a page past `handle`'s prefix; the default: none."""
        return handle, np.empty(0, dtype=np.int64)

    @abstractmethod
    def lock(self, handle: Any) -> None:
        """Protect the path from the root to `handle` against eviction (reference counted)."""

    @abstractmethod
    def unlock(self, handle: Any) -> None: ...

    @abstractmethod
    def insert(self, token_ids: list[int], kv_indices: np.ndarray) -> int:
        """Insert a page-aligned sequence; return how many leading tokens were already cached.

        The cache takes ownership of `kv_indices[returned:]`; the caller keeps ownership of
        (and must free) its own indices for tokens below the returned length that it did not
        get from the cache.
        """

    @abstractmethod
    def evict(self, num_tokens: int) -> np.ndarray:
        """Evict unlocked leaves, least recently used first, until at least `num_tokens` are
        freed or nothing evictable is left; return the freed kv indices."""

    evictable_tokens = 0  # cached tokens no lock protects, which `evict` may free
    protected_tokens = 0  # cached tokens on the path of a locked handle

    def check(self) -> None:  # noqa: B027 (optional hook, default: nothing to check)
        """Raise AssertionError if internal invariants are broken (used by tests)."""
