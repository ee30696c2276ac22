"""One decoder covering Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm) and
Qwen3-MoE (Qwen3 with sparse expert MLPs in the layers `ModelConfig.is_moe_layer` names).
Module names follow the HF checkpoints so weights load by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.base import AttentionBackend
from ..distributed import get_tp_info
from ..kernel import triton_ops
from ..kernel.fused import fused_ops
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.moe import SparseMoeBlock
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        tp = get_tp_info().size
        if cfg.num_heads % tp:
            raise ValueError(f"--tp {tp} must divide the {cfg.num_heads} attention heads")
        if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
            raise ValueError(
                f"--tp {tp} and the {cfg.num_kv_heads} KV heads must divide one another"
            )
        self.layer, self.rope, self.head_dim = layer, rope, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if triton_ops.fits_qk_norm_rope_store(qkv, self.head_dim):
            # one kernel: q/k norm, RoPE, and K/V written straight into the cache
            qn, kn = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
            k_buf, v_buf, loc = attn.kv_target(self.layer)
            q = triton_ops.qk_norm_rope_store(
                qkv, pos, self.rope.cos_sin, qn.weight if qn else None,
                kn.weight if kn else None, qn.eps if qn else 0.0, k_buf, v_buf, loc, self.num_heads, self.num_kv_heads,
            )  # fmt: skip
            k = v = None
        else:
            q, k, v = self._split_rope(qkv, pos)
        o = attn.forward(q, k, v, self.layer)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))

    def _split_rope(
        self, qkv: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, kv = self.head_dim, self.num_kv_heads
        q, k, v = qkv.split([self.num_heads * d, kv * d, kv * d], -1)
        q, k, v = q.view(-1, self.num_heads, d), k.view(-1, kv, d), v.view(-1, kv, d)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(pos, q, k)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate] * 2)
        self.down_proj = RowParallelLinear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fi = fused_ops(gate_up, multiple=16)  # both halves in whole 16-byte vectors
        if fi is not None:
            return self.down_proj(fi.activation.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, rope)
        if cfg.is_moe_layer(layer):
            self.mlp: nn.Module = SparseMoeBlock(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                cfg.num_experts_per_tok, cfg.norm_topk_prob,
            )  # fmt: skip
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, pos: torch.Tensor,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, pos, attn)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, max_pos: int) -> None:
        super().__init__()
        rope = RotaryEmbedding(cfg.head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rope) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_pos: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, max_pos)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """Hidden states of the new tokens, after the final norm: [T, hidden]."""
        x, residual = self.model.embed_tokens(ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, pos, attn)
        x, _ = self.model.norm.add_forward(x, residual)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # model dtype: the sampling kernel reads 16-bit logits, the torch paths cast
        return self.lm_head(h)
