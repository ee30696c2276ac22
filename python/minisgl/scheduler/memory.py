"""Per-request memory: table rows, KV pages, the host copy of the slot table and the prefix
cache. Every page is, at all times, free, owned by exactly one request, or in the cache."""

from __future__ import annotations

import numpy as np

from ..core import Req
from ..engine.engine import Engine
from ..kvcache import create_cache_manager
from ..kvcache.pool import PageAllocator


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ReqMemory:
    def __init__(self, engine: Engine, cache: str) -> None:
        self.engine = engine
        self.ps = engine.page_size
        self.pages = PageAllocator(engine.num_pages)
        self.cache = create_cache_manager(cache, self.ps)
        self.sharing = cache != "naive"
        self.free_rows = list(range(engine.max_reqs - 1, -1, -1))
        self.copies: list[tuple[object, np.ndarray, np.ndarray]] = []  # (handle, src, dst) slots
        # the slot table's host copy (`slots.np`) is the truth; the device copy follows per step
        self.slots = engine.slots

    # -- pages ------------------------------------------------------------------------------
    def ensure_free(self, num_pages: int) -> bool:
        """Make `num_pages` free, evicting unlocked cache leaves if needed."""
        short = num_pages - self.pages.num_free
        if short > 0:
            self._free_slots(self.cache.evict(short * self.ps))
        return self.pages.num_free >= num_pages

    def _free_slots(self, slots: np.ndarray) -> None:
        if len(slots):
            self.pages.free((slots[:: self.ps] // self.ps).tolist())

    def pages_to_extend(self, req: Req, n: int) -> int:
        return _cdiv(req.cached_len + n, self.ps) - _cdiv(req.cached_len, self.ps)

    # -- admission / release ----------------------------------------------------------------
    def admit(self, req: Req, extend: int, reserve: int) -> bool:
        """Give `req` a row, its cached prefix and pages for its first `extend` new tokens
        (plus `reserve` spare pages for the running batch); False leaves everything as it was."""
        ids = req.token_ids[: req.device_len - 1]
        handle, prefix = self.cache.match_prefix(ids)
        hit = len(prefix)
        # the head of the next page, where a cached page starts with it, is copied (all
        # layers, one gather per batch: `take_copies`) into a page of the request's own
        part_handle, part = self.cache.match_partial(handle, ids[hit:])
        # the source stays locked until its copy is queued, so no admission reuses its page
        locks = [handle, part_handle] if len(part) else [handle]
        for h in locks:
            self.cache.lock(h)
        extend = min(extend, req.device_len - hit - len(part))
        if not self.free_rows or not self.ensure_free(_cdiv(len(part) + extend, self.ps) + reserve):
            for h in locks:
                self.cache.unlock(h)
            return False
        row = req.table_idx = self.free_rows.pop()
        req.cache_handle, req.cache_hit, req.cached_len = handle, hit, hit + len(part)
        self.slots.np[row, :hit] = prefix
        if len(part):
            dst = self.pages.alloc(1)[0] * self.ps + np.arange(len(part))
            self.slots.np[row, hit : hit + len(part)] = dst
            self.copies.append((part_handle, part, dst))
        self.slots.mark_stale(row, 0, req.cached_len)
        return True

    def take_copies(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(source, destination) KV slots of the partial pages admitted since the last call; the
        caller queues the copy before anything can reuse a source page."""
        if not self.copies:
            return None
        handles, src, dst = zip(*self.copies)
        self.copies.clear()
        for h in handles:
            self.cache.unlock(h)
        return np.concatenate(src), np.concatenate(dst)

    def extend(self, req: Req, n: int) -> list[int]:
        """Allocate KV slots for positions [cached_len, cached_len + n) of `req`."""
        start, ps, row = req.cached_len, self.ps, req.table_idx
        pos = np.arange(start, start + n)
        pages = self.pages.alloc(self.pages_to_extend(req, n))
        if start % ps:  # the tail of a partly filled last page comes first
            pages.insert(0, self.slots.np[row, start - 1] // ps)
        slots = np.asarray(pages, dtype=np.int64)[pos // ps - start // ps] * ps + pos % ps
        self.slots.np[row, start : start + n] = slots
        return slots.tolist()

    def extend_decode(self, reqs: list[Req]) -> np.ndarray:
        """One new slot per request (its position `cached_len`), for the whole batch at once."""
        rows = np.array([r.table_idx for r in reqs], dtype=np.int64)
        pos = np.array([r.cached_len for r in reqs], dtype=np.int64)
        fresh = pos % self.ps == 0
        slots = self.slots.np[rows, np.maximum(pos - 1, 0)] + 1
        n_new = int(fresh.sum())
        if n_new:
            slots[fresh] = np.asarray(self.pages.alloc(n_new), dtype=np.int64) * self.ps
        self.slots.np[rows, pos] = slots
        return slots

    def cache_prefix(self, req: Req, upto: int) -> None:
        """Share the full pages of a partly prefilled request's first `upto` tokens through the
        cache (chunked prefill). Where another request cached the same tokens first, switch
        to its copy and free ours. Called once the chunk's step is launched and processed, so
        the slot-table rewrite is queued after every step that still uses the old slots."""
        n = min(upto, req.cached_len) // self.ps * self.ps
        if not self.sharing or req.table_idx < 0 or n <= req.cache_hit:
            return
        row, ids = req.table_idx, req.token_ids[:n]
        already = self.cache.insert(ids, self.slots.np[row, :n])
        handle, slots = self.cache.match_prefix(ids)
        self.cache.lock(handle)
        if req.cache_handle is not None:
            self.cache.unlock(req.cache_handle)
        if already > req.cache_hit:
            self._free_slots(self.slots.np[row, req.cache_hit : already])
            self.slots.np[row, :n] = slots
            self.slots.mark_stale(row, 0, n)
        req.cache_handle, req.cache_hit = handle, n

    def release(self, req: Req) -> None:
        """Hand the request's KV to the prefix cache (what it can hold) and free the rest."""
        row, ps = req.table_idx, self.ps
        if row < 0:
            return
        known = min(len(req.token_ids), req.cached_len) // ps * ps
        slots = self.slots.np[row, : _cdiv(req.cached_len, ps) * ps]
        already = self.cache.insert(req.token_ids[:known], slots[:known])
        self._free_slots(slots[req.cache_hit : already])  # duplicates of what the cache had
        self._free_slots(slots[known:])
        if req.cache_handle is not None:
            self.cache.unlock(req.cache_handle)
        self.free_rows.append(row)
        req.table_idx, req.cache_handle, req.cache_hit, req.cached_len = -1, None, 0, 0

    # -- accounting -------------------------------------------------------------------------
    def check(self, reqs: list[Req]) -> None:
        """Every page is free, cached or owned by exactly one live request."""
        self.cache.check()
        ps = self.ps
        cached = (self.cache.evictable_tokens + self.cache.protected_tokens) // ps
        owned = sum(_cdiv(r.cached_len, ps) - r.cache_hit // ps for r in reqs if r.table_idx >= 0)
        assert self.pages.num_free + cached + owned == self.pages.num_pages, (
            f"page leak: free {self.pages.num_free} + cached {cached} + owned {owned} != {self.pages.num_pages}"
        )
        live = sum(r.table_idx >= 0 for r in reqs)
        assert len(self.free_rows) + live == self.engine.max_reqs, "table row leak"
