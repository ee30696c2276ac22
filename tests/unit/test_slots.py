"""The slot table's host/device bookkeeping: stale ranges flatten to (row, position) pairs in
order, are taken once, and a forward writes their latest host values to the device copy."""

from __future__ import annotations

import numpy as np
import torch

from minisgl.kvcache.slots import SlotTable, token_coords


def test_token_coords_flattens_ranges_in_order() -> None:
    """token_coords turns (row, start, end) ranges into (row, position) pairs, range after range in
    the given order, an empty range adding none."""
    rows, pos = token_coords(np.array([3, 1, 2]), np.array([5, 0, 7]), np.array([8, 2, 7]))
    assert rows.tolist() == [3, 3, 3, 1, 1]
    assert pos.tolist() == [5, 6, 7, 0, 1]


def test_stale_entries_are_taken_once_with_latest_values() -> None:
    """take_stale returns every marked range in marking order (an empty range ignored) with the
    latest host value of each entry, even one marked twice, and returns nothing the second time."""
    table = SlotTable(4, 16, "cpu")
    table.host[2, :4] = torch.tensor([10, 11, 12, 13])
    table.mark_stale(2, 0, 4)
    table.mark_stale(1, 3, 3)  # empty: ignored
    table.host[2, 1] = 99  # changed again before the next forward: the latest value wins
    table.mark_stale(2, 1, 2)
    rows, pos, vals = table.take_stale()
    assert list(zip(rows.tolist(), pos.tolist())) == [(2, 0), (2, 1), (2, 2), (2, 3), (2, 1)]
    assert vals.tolist() == [10, 99, 12, 13, 99]
    assert table.take_stale()[0].size == 0
