"""`--attn prefill,decode`: one backend for prefill batches, another for decode batches."""

from __future__ import annotations

import torch

from .base import AttentionBackend, AttnMeta


class HybridBackend(AttentionBackend):
    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        self.prefill_backend, self.decode_backend = prefill, decode
        self.supports_graph = decode.supports_graph
        self.active: AttentionBackend = prefill

    def prepare(self, meta: AttnMeta) -> None:
        self.active = self.prefill_backend if meta.is_prefill else self.decode_backend
        self.active.prepare(meta)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: int
    ) -> torch.Tensor:
        return self.active.forward(q, k, v, layer)

    def kv_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.active.kv_target(layer)

    def init_graph(self, max_bs: int) -> None:
        self.decode_backend.init_graph(max_bs)

    def prepare_graph_capture(self, bs: int, meta: AttnMeta, buf: int = 0) -> None:
        self.active = self.decode_backend
        self.decode_backend.prepare_graph_capture(bs, meta, buf)

    def prepare_graph_replay(self, bs: int, meta: AttnMeta, buf: int = 0) -> None:
        self.active = self.decode_backend
        self.decode_backend.prepare_graph_replay(bs, meta, buf)
