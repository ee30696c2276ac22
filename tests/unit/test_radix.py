"""Tests of the prefix-cache managers (radix tree and naive)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minisgl.kvcache import create_cache_manager
from minisgl.kvcache.naive import NaiveCacheManager
from minisgl.kvcache.radix import RadixCacheManager


def idx(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def arange(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def total_cached(cm: RadixCacheManager) -> int:
    return cm.evictable_tokens + cm.protected_tokens


# ---- unit tests -------------------------------------------------------------------------------


def test_factory() -> None:
    """create_cache_manager builds a radix manager for "radix", a naive one for "naive", and raises
    a ValueError for any other name."""
    assert isinstance(create_cache_manager("radix", 2), RadixCacheManager)
    assert isinstance(create_cache_manager("naive", 2), NaiveCacheManager)
    with pytest.raises(ValueError):
        create_cache_manager("lru", 2)


def test_empty_tree() -> None:
    """An empty tree matches nothing (the root as handle, an empty int64 array), locking and
    unlocking the root is a no-op, eviction frees nothing and both token counts stay 0."""
    cm = RadixCacheManager(4)
    handle, got = cm.match_prefix([1, 2, 3, 4, 5])
    assert handle is cm.root and got.dtype == np.int64 and len(got) == 0
    cm.lock(handle)  # locking the root is a no-op
    cm.unlock(handle)
    assert cm.evict(100).size == 0
    assert (cm.evictable_tokens, cm.protected_tokens) == (0, 0)
    cm.check()


def test_insert_and_match_page_size_1() -> None:
    """With pages of one token, an inserted sequence is matched up to the first token that differs
    (its own kv indices returned), an unrelated prompt matches nothing, and its tokens count as
    evictable."""
    cm = RadixCacheManager(1)
    assert cm.insert([1, 2, 3], idx(10, 11, 12)) == 0
    _, got = cm.match_prefix([1, 2, 3, 4])
    assert got.tolist() == [10, 11, 12]
    _, got = cm.match_prefix([1, 2, 9])
    assert got.tolist() == [10, 11]
    _, got = cm.match_prefix([7])
    assert got.tolist() == []
    assert cm.evictable_tokens == 3
    cm.check()


def test_page_size_4_ignores_partial_pages() -> None:
    """With pages of four tokens only whole pages are cached (8 of 10 tokens), a mismatch inside a
    page drops that whole page from the match, and a prompt shorter than a page matches nothing."""
    cm = RadixCacheManager(4)
    # Only the first 8 tokens (two pages) are inserted; the tail of 2 is dropped.
    assert cm.insert(list(range(10)), arange(100, 10)) == 0
    assert cm.evictable_tokens == 8
    _, got = cm.match_prefix(list(range(10)))
    assert got.tolist() == list(range(100, 108))
    # A mismatch inside the second page means only the first page matches.
    _, got = cm.match_prefix([0, 1, 2, 3, 4, 5, 6, 99])
    assert got.tolist() == [100, 101, 102, 103]
    # Shorter than a page: nothing.
    handle, got = cm.match_prefix([0, 1, 2])
    assert handle is cm.root and len(got) == 0
    cm.check()


def test_match_partial_finds_the_head_of_a_cached_page() -> None:
    """Past a page-aligned match, `match_partial` returns the longest head (under a page) of the
    rest that a child page starts with, from the longer of two children, and its slots; nothing
    where no child shares the first token; the tree is left unchanged (no split, no lock)."""
    cm = RadixCacheManager(4)
    cm.insert([0, 1, 2, 3, 4, 5, 6, 7], arange(100, 8))
    cm.insert([0, 1, 2, 3, 4, 9, 9, 9], arange(200, 8))
    handle, got = cm.match_prefix([0, 1, 2, 3, 4, 5, 6, 99])
    assert got.tolist() == [100, 101, 102, 103]
    node, part = cm.match_partial(handle, [4, 5, 6, 99])
    assert part.tolist() == [104, 105, 106] and node.key == (4, 5, 6, 7)
    assert cm.match_partial(handle, [4, 9])[1].tolist() == [204, 205]
    assert len(cm.match_partial(handle, [8, 5, 6])[1]) == 0
    assert len(cm.match_partial(handle, [])[1]) == 0
    assert cm.protected_tokens == 0
    cm.check()


def test_split_in_middle_preserves_indices() -> None:
    """A match that ends inside a node splits it at the page boundary: the handle is the prefix half
    under the root, the suffix half keeps its own kv indices, and the full sequence still matches
    all of them."""
    cm = RadixCacheManager(2)
    cm.insert([1, 2, 3, 4, 5, 6], idx(10, 11, 12, 13, 14, 15))
    assert len(cm.root.children) == 1
    handle, got = cm.match_prefix([1, 2, 3, 4, 9, 9])
    assert got.tolist() == [10, 11, 12, 13]
    # The single node was split into [1,2,3,4] -> [5,6]; the handle is the prefix half.
    assert handle.key == (1, 2, 3, 4) and handle.parent is cm.root
    (suffix,) = handle.children.values()
    assert suffix.key == (5, 6) and suffix.value.tolist() == [14, 15]
    _, got = cm.match_prefix([1, 2, 3, 4, 5, 6])
    assert got.tolist() == [10, 11, 12, 13, 14, 15]
    cm.check()


def test_split_keeps_existing_handle_valid() -> None:
    """Splitting a locked node keeps the lock on the whole path: its 4 tokens stay protected until
    the old handle is unlocked, after which all 4 are evictable."""
    cm = RadixCacheManager(1)
    cm.insert([1, 2, 3, 4], idx(0, 1, 2, 3))
    handle, _ = cm.match_prefix([1, 2, 3, 4])
    cm.lock(handle)
    cm.match_prefix([1, 2])  # splits the locked node
    cm.check()
    assert cm.protected_tokens == 4 and cm.evictable_tokens == 0
    cm.unlock(handle)
    assert cm.protected_tokens == 0 and cm.evictable_tokens == 4
    cm.check()


def test_insert_existing_prefix_returns_its_length() -> None:
    """insert returns how many leading tokens were already cached: a repeat keeps the original
    indices, a partly shared sequence adds only the indices past the shared prefix, and a strict
    prefix of a cached sequence adds nothing."""
    cm = RadixCacheManager(2)
    assert cm.insert([1, 2, 3, 4], idx(10, 11, 12, 13)) == 0
    # Fully cached: returns the whole length and keeps the original indices.
    assert cm.insert([1, 2, 3, 4], idx(20, 21, 22, 23)) == 4
    # Partially cached: the tree takes ownership of the new indices beyond the shared prefix.
    assert cm.insert([1, 2, 7, 8, 9, 9], idx(30, 31, 32, 33, 34, 35)) == 2
    _, got = cm.match_prefix([1, 2, 7, 8, 9, 9])
    assert got.tolist() == [10, 11, 32, 33, 34, 35]
    # Insert of a strict prefix of a cached sequence.
    assert cm.insert([1, 2], idx(40, 41)) == 2
    assert total_cached(cm) == 8
    cm.check()


def test_insert_copies_indices() -> None:
    """The tree keeps a copy of the inserted indices: the caller overwriting its buffer afterwards
    does not change what a match returns."""
    cm = RadixCacheManager(1)
    buf = idx(5, 6, 7)
    cm.insert([1, 2, 3], buf)
    buf.fill(-1)  # the caller reuses its buffer
    assert cm.match_prefix([1, 2, 3])[1].tolist() == [5, 6, 7]


def test_evict_lru_order() -> None:
    """Eviction frees least recently used leaves first (a match counts as a use) and frees a whole
    leaf even when fewer tokens were asked for."""
    cm = RadixCacheManager(1)
    cm.insert([1, 1], idx(0, 1))
    cm.insert([2, 2], idx(2, 3))
    cm.insert([3, 3], idx(4, 5))
    cm.match_prefix([1, 1])  # now [2,2] is the oldest, then [3,3]
    assert cm.evict(1).tolist() == [2, 3]  # whole leaf freed even though 1 token was asked
    assert cm.evict(2).tolist() == [4, 5]
    assert cm.evict(2).tolist() == [0, 1]
    assert total_cached(cm) == 0
    cm.check()


def test_evict_parent_after_children() -> None:
    """Once its children are evicted, an inner node becomes a leaf and is evicted by its own age
    (before a more recently inserted node), so a 4-token eviction frees the whole older branch."""
    cm = RadixCacheManager(1)
    cm.insert([1, 2, 3], idx(0, 1, 2))
    cm.insert([1, 2, 4], idx(9, 9, 3))  # splits into [1,2] -> {[3], [4]}
    cm.insert([5], idx(4))  # most recent
    freed = cm.evict(4)
    # Leaves [3] and [4] go first, which exposes [1,2] (older than [5]).
    assert sorted(freed.tolist()) == [0, 1, 2, 3]
    assert cm.match_prefix([5])[1].tolist() == [4]
    cm.check()


def test_locked_nodes_never_evicted() -> None:
    """A locked path is never evicted, and stays matched, while it holds any lock (locks are
    counted); once fully unlocked its tokens are evictable again, leaf first, the split nodes not
    merged back."""
    cm = RadixCacheManager(2)
    cm.insert([1, 2, 3, 4], idx(0, 1, 2, 3))
    cm.insert([1, 2, 5, 6], idx(9, 9, 4, 5))
    handle, got = cm.match_prefix([1, 2, 3, 4])
    cm.lock(handle)
    assert cm.protected_tokens == 4 and cm.evictable_tokens == 2
    assert cm.evict(100).tolist() == [4, 5]
    assert cm.evict(100).size == 0
    assert cm.match_prefix([1, 2, 3, 4])[1].tolist() == got.tolist()
    cm.check()
    cm.lock(handle)  # locks are counted
    cm.unlock(handle)
    assert cm.evict(100).size == 0
    cm.unlock(handle)
    assert cm.evictable_tokens == 4 and cm.protected_tokens == 0
    # Nodes are not merged back: [1,2] -> [3,4] goes leaf first.
    assert cm.evict(1).tolist() == [2, 3]
    assert cm.evict(1).tolist() == [0, 1]
    cm.check()


def test_lock_inner_node_protects_only_path() -> None:
    """Locking an inner node protects only the path from the root to it: the leaf below it is still
    evicted."""
    cm = RadixCacheManager(1)
    cm.insert([1, 2, 3], idx(0, 1, 2))
    handle, _ = cm.match_prefix([1, 2])
    cm.lock(handle)
    assert (cm.protected_tokens, cm.evictable_tokens) == (2, 1)
    assert cm.evict(10).tolist() == [2]
    cm.unlock(handle)
    cm.check()


def test_check_detects_corruption() -> None:
    """check() raises an AssertionError when the evictable-token count disagrees with the tree."""
    cm = RadixCacheManager(2)
    cm.insert([1, 2, 3, 4], idx(0, 1, 2, 3))
    cm.evictable_tokens += 1
    with pytest.raises(AssertionError):
        cm.check()


def test_naive_cache_manager() -> None:
    """The naive manager caches nothing: no match, locks are no-ops, insert reports the whole paged
    length (8 of 10) as already held so the caller frees every index, and nothing is evictable."""
    cm = NaiveCacheManager(4)
    handle, got = cm.match_prefix([1, 2, 3, 4, 5])
    assert handle is None and got.dtype == np.int64 and len(got) == 0
    cm.lock(handle)
    cm.unlock(handle)
    assert cm.insert(list(range(10)), arange(0, 10)) == 8  # caller frees everything
    assert cm.match_prefix(list(range(10)))[1].size == 0
    assert cm.evict(10).size == 0
    assert (cm.evictable_tokens, cm.protected_tokens) == (0, 0)
    cm.check()


# ---- property-based test against a brute-force model -------------------------------------------

tokens_st = st.lists(st.integers(0, 2), max_size=12)


class RadixMachine(RuleBasedStateMachine):
    """The model maps every cached page-aligned prefix (tuple of tokens) to the kv indices of its
    last page, plus that page's last access tick. The cached set is always prefix-closed."""

    @initialize(page_size=st.sampled_from([1, 2, 4]))
    def setup(self, page_size: int) -> None:
        self.p = page_size
        self.cm = RadixCacheManager(page_size)
        self.pages: dict[tuple[int, ...], list[int]] = {}
        self.tick: dict[tuple[int, ...], int] = {}
        self.now = 0
        self.locks: list[tuple[object, tuple[int, ...]]] = []
        self.next_idx = 0

    # -- model helpers --

    def aligned(self, tokens: list[int]) -> tuple[int, ...]:
        return tuple(tokens[: len(tokens) // self.p * self.p])

    def longest(self, key: tuple[int, ...]) -> int:
        n = 0
        while n < len(key) and key[: n + self.p] in self.pages:
            n += self.p
        return n

    def indices(self, key: tuple[int, ...]) -> list[int]:
        return [i for n in range(self.p, len(key) + 1, self.p) for i in self.pages[key[:n]]]

    def touch(self, key: tuple[int, ...]) -> None:
        self.now += 1
        for n in range(self.p, len(key) + 1, self.p):
            self.tick[key[:n]] = self.now

    def locked_pages(self) -> set[tuple[int, ...]]:
        return {k[:n] for _, k in self.locks for n in range(self.p, len(k) + 1, self.p)}

    # -- rules --

    @rule(tokens=tokens_st)
    def insert(self, tokens: list[int]) -> None:
        key = self.aligned(tokens)
        expected = self.longest(key)
        kv = np.arange(self.next_idx, self.next_idx + len(tokens), dtype=np.int64)
        self.next_idx += len(tokens)
        assert self.cm.insert(tokens, kv) == expected
        for n in range(expected + self.p, len(key) + 1, self.p):
            self.pages[key[:n]] = kv[n - self.p : n].tolist()
        self.touch(key)

    @rule(tokens=tokens_st, lock=st.booleans())
    def match(self, tokens: list[int], lock: bool) -> None:
        key = self.aligned(tokens)
        n = self.longest(key)
        handle, got = self.cm.match_prefix(tokens)
        assert got.dtype == np.int64
        assert got.tolist() == self.indices(key[:n])
        self.touch(key[:n])
        if lock:
            self.cm.lock(handle)
            self.locks.append((handle, key[:n]))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1))
        handle, _ = self.locks.pop(i)
        self.cm.unlock(handle)

    @rule(num=st.integers(0, 16))
    def evict(self, num: int) -> None:
        locked = self.locked_pages()
        evictable_before = self.cm.evictable_tokens
        leaves = [k for k in self.pages if k not in locked and not self.has_child(k)]
        oldest = min((self.tick[k] for k in leaves), default=None)
        freed = self.cm.evict(num).tolist()
        assert len(freed) == len(set(freed))
        # Freed indices are exactly the pages that disappeared from the tree.
        gone = {k for k in self.pages if self.pages[k][0] in set(freed)}
        assert sorted(freed) == sorted(i for k in gone for i in self.pages[k])
        assert not (gone & locked), "evicted a locked page"
        for k in gone:
            del self.pages[k]
            del self.tick[k]
        assert all(k[:n] in self.pages for k in self.pages for n in range(self.p, len(k), self.p))
        if num > 0 and evictable_before > 0:
            # Enough was freed, or everything evictable went; and the LRU leaf went first.
            assert len(freed) >= min(num, evictable_before)
            assert not any(self.tick[k] == oldest for k in leaves if k in self.pages)
        else:
            assert freed == []
        assert self.cm.evictable_tokens == evictable_before - len(freed)

    def has_child(self, key: tuple[int, ...]) -> bool:
        return any(len(k) == len(key) + self.p and k[: len(key)] == key for k in self.pages)

    # -- invariants after every step --

    @invariant()
    def consistent(self) -> None:
        self.cm.check()
        # Compare contents without match_prefix, which would disturb the LRU clock.
        assert tree_pages(self.cm) == self.pages
        total = len(self.pages) * self.p
        protected = len(self.locked_pages()) * self.p
        assert self.cm.protected_tokens == protected
        assert self.cm.evictable_tokens == total - protected


def tree_pages(cm: RadixCacheManager) -> dict[tuple[int, ...], list[int]]:
    """Read-only dump of the tree: every cached page-aligned prefix -> its last page's indices."""
    out: dict[tuple[int, ...], list[int]] = {}
    stack = [(child, ()) for child in cm.root.children.values()]
    while stack:
        node, prefix = stack.pop()
        for n in range(cm.page_size, len(node.key) + 1, cm.page_size):
            out[prefix + tuple(node.key[:n])] = node.value[n - cm.page_size : n].tolist()
        full = prefix + tuple(node.key)
        stack.extend((child, full) for child in node.children.values())
    return out


RadixMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=25, deadline=None)
TestRadixMachine = RadixMachine.TestCase
