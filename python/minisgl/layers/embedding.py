"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_last_dim, all_reduce, get_tp_info
from .linear import _param, default_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.tp = get_tp_info()
        self.vocab_size = vocab_size
        self.local_vocab = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * self.local_vocab
        self.weight = _param((self.local_vocab, hidden), self.load)

    def load(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        part = loaded[self.start : self.start + self.local_vocab]
        param.data.zero_()  # the padded rows of the last rank stay zero
        default_loader(param.data[: part.shape[0]], part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        return all_reduce(out.masked_fill_(mask.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits = h W^T over this rank's vocabulary slice, gathered to the full vocabulary."""

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = all_gather_last_dim(F.linear(h, self.weight))
        return logits[..., : self.vocab_size] if self.tp.size > 1 else logits
