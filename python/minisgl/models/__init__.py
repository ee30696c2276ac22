"""Model registry, keyed by the checkpoint's `architectures` entry."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .llama import LlamaForCausalLM

# all are the Llama decoder with q/k/v bias, per-head q/k norm or expert MLPs (see ModelConfig);
# Mistral3ForConditionalGeneration loads its language model only
MODEL_REGISTRY: dict[str, type[nn.Module]] = dict.fromkeys(
    ["LlamaForCausalLM", "MistralForCausalLM", "Mistral3ForConditionalGeneration",
     "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"], LlamaForCausalLM,
)  # fmt: skip


def create_model(cfg: ModelConfig, max_pos: int) -> nn.Module:
    """The model for sequences of up to `max_pos` tokens (its parameters uninitialised)."""
    if cfg.architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    window = cfg.sliding_window
    if window is not None and window < max_pos:
        raise ValueError(
            f"{cfg.architecture} attends over a sliding window of {window} tokens, which the "
            f"attention backends cannot do; pass --max-seq-len {window} or less (up to the "
            "window, full attention is the same)"
        )
    return MODEL_REGISTRY[cfg.architecture](cfg, max_pos)


__all__ = ["MODEL_REGISTRY", "ModelConfig", "create_model"]
