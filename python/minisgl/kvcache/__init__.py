"""The prefix-cache managers behind `base.BaseCacheManager`, made by name."""

from __future__ import annotations

from .base import BaseCacheManager
from .naive import NaiveCacheManager
from .radix import RadixCacheManager


def create_cache_manager(kind: str, page_size: int) -> BaseCacheManager:
    if kind == "radix":
        return RadixCacheManager(page_size)
    if kind == "naive":
        return NaiveCacheManager(page_size)
    raise ValueError(f"unknown cache manager {kind!r}; choose radix or naive")
