"""Radix-tree prefix cache at page granularity.

Each page of `page_size` token ids is one symbol of the tree: every key length and every split
point is a multiple of `page_size`, so a node's kv slots always cover whole pages and can be
freed page by page.

Handles returned by `match_prefix` are tree nodes. A split keeps the original node object as the
*suffix* half, so a handle keeps naming the same root-to-node path after later splits.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import numpy as np

from .base import BaseCacheManager


def _empty() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


class RadixNode:
    __slots__ = ("children", "key", "value", "parent", "ref_count", "last_access")

    def __init__(
        self, key: tuple[int, ...], value: np.ndarray, parent: RadixNode | None = None,
        last_access: int = 0,
    ) -> None:  # fmt: skip
        self.children: dict[tuple[int, ...], RadixNode] = {}
        # token ids on the edge from `parent` to this node: a tuple of ints, which the garbage
        # collector stops tracking, where a list would be traversed by every collection
        self.key = key
        self.value = value  # kv slot index of each token in `key`
        self.parent = parent
        self.ref_count = 0  # number of live locks whose path goes through this node
        self.last_access = last_access  # value of the manager's tick counter, not wall time

    def __repr__(self) -> str:
        return f"RadixNode(len={len(self.key)}, ref={self.ref_count}, t={self.last_access})"


class RadixCacheManager(BaseCacheManager):
    def __init__(self, page_size: int) -> None:
        super().__init__(page_size)
        assert page_size >= 1
        self.root = RadixNode((), _empty())
        self.root.ref_count = 1  # the root is never evicted nor counted
        self._tick = 0

    # ---- queries -------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[RadixNode, np.ndarray]:
        node, _, values = self._walk(self._aligned(token_ids))
        return node, np.concatenate(values) if values else _empty()

    def match_partial(
        self, handle: RadixNode, token_ids: Sequence[int]
    ) -> tuple[RadixNode, np.ndarray]:
        """The longest head, shorter than a page, of `token_ids` that a child of `handle` starts
        with: (that child, the head's kv slots). Pages are shared whole, so the caller copies
        these slots into a page of its own instead of recomputing them. A node's first 64
        children are compared, which bounds the cost at a node with thousands of them."""
        best, head = (handle, _empty()), tuple(token_ids[: self.page_size - 1])
        for child in itertools.islice(handle.children.values(), 64) if head else ():
            n = next((i for i, (a, b) in enumerate(zip(head, child.key)) if a != b), len(head))
            if n > len(best[1]):
                best = child, child.value[:n]
        return best

    # ---- locking -------------------------------------------------------------------------
    def lock(self, handle: RadixNode) -> None:
        self._add_ref(handle, 1)

    def unlock(self, handle: RadixNode) -> None:
        self._add_ref(handle, -1)

    def _add_ref(self, node: RadixNode, delta: int) -> None:
        """One lock more (+1) or fewer (-1) on the path from `node` to the root."""
        while node is not self.root:
            assert node.ref_count + delta >= 0, "unlock without matching lock"
            if node.ref_count == 0 or node.ref_count + delta == 0:  # its tokens change sides
                moved = len(node.key) * delta  # > 0: evictable -> protected
                self.evictable_tokens -= moved
                self.protected_tokens += moved
            node.ref_count += delta
            assert node.parent is not None
            node = node.parent

    # ---- insert / evict ------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], kv_indices: np.ndarray) -> int:
        tokens = self._aligned(token_ids)
        assert len(kv_indices) >= len(tokens), "need one kv index per token"
        node, matched, _ = self._walk(tokens)
        if matched < len(tokens):
            # Copy: the caller's array may be a view of a buffer it reuses (e.g. a page table).
            value = np.array(kv_indices[matched : len(tokens)], dtype=np.int64)
            leaf = RadixNode(tokens[matched:], value, node, self._tick)
            node.children[self._page(leaf.key)] = leaf
            self.evictable_tokens += len(leaf.key)  # a new leaf is unlocked
        return matched

    def evict(self, num_tokens: int) -> np.ndarray:
        if num_tokens <= 0:
            return _empty()
        # Heap of unlocked leaves by LRU; the counter breaks ties without comparing nodes.
        tie = itertools.count()
        heap = [(n.last_access, next(tie), n) for n in self._nodes() if self._evictable_leaf(n)]
        heapq.heapify(heap)
        freed: list[np.ndarray] = []
        num_freed = 0
        while heap and num_freed < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._page(leaf.key)]
            leaf.parent = None
            freed.append(leaf.value)
            num_freed += len(leaf.key)
            self.evictable_tokens -= len(leaf.key)
            if self._evictable_leaf(parent):  # removing the last child exposes the parent
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        return np.concatenate(freed) if freed else _empty()

    # ---- invariants ----------------------------------------------------------------------
    def check(self) -> None:
        p = self.page_size
        evictable = protected = 0
        seen: list[np.ndarray] = []
        for node in self._nodes():
            assert len(node.key) > 0 and len(node.key) % p == 0, f"bad key length {node}"
            assert len(node.key) == len(node.value), f"key/value length mismatch {node}"
            assert isinstance(node.key, tuple) and node.value.dtype == np.int64
            assert node.ref_count >= 0, f"negative ref count {node}"
            parent = node.parent
            assert parent is not None and parent.children.get(self._page(node.key)) is node
            if parent is not self.root:
                assert parent.ref_count >= node.ref_count, f"parent ref < child ref {node}"
                assert parent.last_access >= node.last_access, f"parent older than child {node}"
            if node.ref_count > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            seen.append(node.value)
        assert self.root.parent is None and len(self.root.key) == 0 and self.root.ref_count == 1
        assert (evictable, protected) == (self.evictable_tokens, self.protected_tokens), (
            "counter drift"
        )
        if seen:
            all_idx = np.concatenate(seen)
            assert len(np.unique(all_idx)) == len(all_idx), "kv index cached twice"

    # ---- helpers -------------------------------------------------------------------------
    def _aligned(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        n = len(token_ids) // self.page_size * self.page_size
        return tuple(token_ids[:n])

    def _page(self, key: tuple[int, ...]) -> tuple[int, ...]:
        return key[: self.page_size]

    def _evictable_leaf(self, node: RadixNode) -> bool:
        return node is not self.root and not node.children and node.ref_count == 0

    def _nodes(self) -> list[RadixNode]:
        """All nodes except the root (iterative DFS: deep trees must not hit the recursion limit)."""
        out: list[RadixNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _walk(self, tokens: tuple[int, ...]) -> tuple[RadixNode, int, list[np.ndarray]]:
        """Follow page-aligned `tokens` from the root, splitting the node where the match ends
        mid-node and touching every node on the path. Returns (deepest node, matched, values)."""
        self._tick += 1
        p = self.page_size
        node, matched, values = self.root, 0, []
        while matched < len(tokens):
            child = node.children.get(tokens[matched : matched + p])
            if child is None:
                break
            n = p  # the first page matched via the dict key; compare the rest page by page
            limit = min(len(child.key), len(tokens) - matched)
            while n < limit and child.key[n : n + p] == tokens[matched + n : matched + n + p]:
                n += p
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = self._tick
            values.append(child.value)
            matched += n
            node = child
        return node, matched, values

    def _split(self, node: RadixNode, n: int) -> RadixNode:
        """Split `node` after `n` tokens; return the new prefix node (the new parent of `node`)."""
        parent = node.parent
        assert parent is not None and 0 < n < len(node.key) and n % self.page_size == 0
        # The prefix inherits the lock count: every lock through `node` also goes through it.
        # Token counters are unchanged since both halves keep the same lock state.
        prefix = RadixNode(node.key[:n], node.value[:n], parent, node.last_access)
        prefix.ref_count = node.ref_count
        parent.children[self._page(prefix.key)] = prefix
        node.key, node.value, node.parent = node.key[n:], node.value[n:], prefix
        prefix.children[self._page(node.key)] = node
        return prefix
