"""Cache manager that caches nothing: every request recomputes its whole prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import BaseCacheManager


class NaiveCacheManager(BaseCacheManager):
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[Any, np.ndarray]:
        return None, np.empty(0, dtype=np.int64)

    def lock(self, handle: Any) -> None:
        pass

    def unlock(self, handle: Any) -> None:
        pass

    def insert(self, token_ids: Sequence[int], kv_indices: np.ndarray) -> int:
        # Claim the whole aligned sequence as "already cached": the cache takes ownership of
        # nothing, so the caller frees all of its indices.
        return len(token_ids) // self.page_size * self.page_size

    def evict(self, num_tokens: int) -> np.ndarray:
        return np.empty(0, dtype=np.int64)
