"""Portable attention on plain torch ops (CPU and GPU): gathers each request's K/V from the
paged pool through the slot table and runs SDPA. The reference the fast backends are tested
against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend


class TorchBackend(AttentionBackend):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: int
    ) -> torch.Tensor:
        self.store_kv(layer, k, v)
        m = self.meta
        kbuf, vbuf = self.pool.k[layer], self.pool.v[layer]
        if not m.is_prefill:
            return self._decode(q, kbuf, vbuf)
        out = torch.empty_like(q)
        start = 0
        for i, (prefix, ext) in enumerate(zip(m.prefix_lens_host, m.extend_lens_host)):
            total = prefix + ext
            slots = self.slot_table[m.rows_host[i], :total]
            qi = q[start : start + ext].transpose(0, 1)  # [H, ext, D]
            ki, vi = kbuf[slots].transpose(0, 1), vbuf[slots].transpose(0, 1)
            # query j (absolute position prefix + j) sees keys 0..prefix + j
            mask = torch.ones(ext, total, dtype=torch.bool, device=q.device).tril(prefix)
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=self.scale, enable_gqa=True
            )
            out[start : start + ext] = o.transpose(0, 1)
            start += ext
        return out

    def _decode(self, q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor) -> torch.Tensor:
        m = self.meta
        max_len = max(m.seq_lens_host)
        slots = self.slot_table[m.rows, :max_len]  # [B, L]; entries past a row's length are junk
        valid = torch.arange(max_len, device=q.device)[None, :] < m.seq_lens[:, None]
        slots = torch.where(valid, slots, 0)
        k, v = kbuf[slots].transpose(1, 2), vbuf[slots].transpose(1, 2)  # [B, KV, L, D]
        mask = valid[:, None, None, :]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask, scale=self.scale, enable_gqa=True
        )
        return o.squeeze(2)
