"""Model registry, keyed by the checkpoint's `architectures` entry."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .llama import LlamaForCausalLM

# Qwen2 and Qwen3 are the Llama decoder with q/k/v bias or per-head q/k norm (see ModelConfig)
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def check_architecture(cfg: ModelConfig) -> None:
    if cfg.architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )


def create_model(cfg: ModelConfig, max_pos: int) -> nn.Module:
    check_architecture(cfg)
    return MODEL_REGISTRY[cfg.architecture](cfg, max_pos)


__all__ = ["MODEL_REGISTRY", "ModelConfig", "check_architecture", "create_model"]
