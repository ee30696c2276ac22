"""The slot table: for every request row, the KV slot of each token position. The scheduler
edits the host copy; the device copy (read by attention) is brought up to date in one
batched write at the start of the next forward, never with a copy per request."""

from __future__ import annotations

import numpy as np
import torch


class SlotTable:
    def __init__(self, rows: int, max_len: int, device: str) -> None:
        self.host = torch.zeros(rows, max_len, dtype=torch.int64)
        self.np = self.host.numpy()  # shares memory: numpy indexing is far cheaper per call
        self.device = torch.zeros(rows, max_len, dtype=torch.int32, device=device)
        self._stale: list[tuple[int, int, int]] = []

    def mark_stale(self, row: int, start: int, end: int) -> None:
        """Positions [start, end) of `row` changed on the host outside a forward's own writes."""
        if end > start:
            self._stale.append((row, start, end))

    def take_stale(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, positions, values) of every stale entry, once; the values are read now, so a
        position marked twice gets the latest one both times."""
        if not self._stale:
            return _EMPTY, _EMPTY, _EMPTY
        rows, pos = token_coords(*(np.array(x, dtype=np.int64) for x in zip(*self._stale)))
        self._stale.clear()
        return rows, pos, self.np[rows, pos]


_EMPTY = np.zeros(0, dtype=np.int64)


def token_coords(
    rows: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ranges [start, end) of rows into (row, position) pairs, in order."""
    lens = ends - starts
    offsets = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(rows, lens), np.repeat(starts, lens) + offsets
