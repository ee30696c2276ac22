"""Where a model is (`resolve_model_path`: a directory, or a Hugging Face snapshot) and its
hyper-parameters, read straight from a HF `config.json` (both config dialects; for
Mistral3ForConditionalGeneration, its language model's `text_config`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    torch_dtype: str
    eos_token_ids: list[int]
    # Qwen3-MoE: sparse layers are every `decoder_sparse_step`-th one outside mlp_only_layers
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # attention window (Mistral), None = full attention

    def context_len(self, max_seq_len: int | None) -> int:
        """The longest sequence served: --max-seq-len, else the model's own context."""
        return max_seq_len or self.max_position_embeddings

    def is_moe_layer(self, layer: int) -> bool:
        sparse = (layer + 1) % self.decoder_sparse_step == 0
        return self.num_experts > 0 and layer not in self.mlp_only_layers and sparse

    @classmethod
    def from_dir(cls, path: str) -> ModelConfig:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        eos = _as_list(cfg.get("eos_token_id"))
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos += [e for e in _as_list(json.load(f).get("eos_token_id")) if e not in eos]
        return cls.from_dict(cfg, eos)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], eos_token_ids: list[int]) -> ModelConfig:
        arch = (cfg.get("architectures") or ["<missing>"])[0]
        if "text_config" in cfg:  # a vision-language checkpoint: its language model alone
            text = cfg["text_config"]
            if text.get("model_type", "mistral") != "mistral":
                raise ValueError(
                    f"unsupported {arch} language model type {text['model_type']!r} (supported: mistral)"
                )
            keep = ("tie_word_embeddings", "torch_dtype", "dtype")
            cfg = {**text, **{k: cfg[k] for k in keep if k in cfg}}
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        # transformers 5.x moves rope_theta/rope_scaling into one `rope_parameters` dict
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = dict(cfg.get("rope_scaling") or (rope if "rope_type" in rope else {}))
        scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        is_qwen2 = arch == "Qwen2ForCausalLM"
        mistral = arch.startswith("Mistral")
        bias = bool(cfg.get("attention_bias", False))
        # Mistral uses its window whenever one is set; Qwen2/3 only with use_sliding_window
        window = cfg.get("sliding_window") if mistral or cfg.get("use_sliding_window") else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if scaling["rope_type"] == "default" else scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or bias,
            o_bias=bias and not is_qwen2,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            torch_dtype=str(dtype).replace("torch.", ""),
            eos_token_ids=list(eos_token_ids),
            # transformers 5.x writes `num_local_experts`, the hub checkpoints `num_experts`
            num_experts=cfg.get("num_experts") or cfg.get("num_local_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            sliding_window=window,
        )


def resolve_model_path(model: str) -> str:
    """A model directory as given, or the local snapshot of a Hugging Face id (downloaded
    when missing); ValueError with a one-line reason otherwise."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.startswith((".", "/", "~")):
        raise ValueError(
            f"model {model!r} is not a directory; give a model directory or a Hugging Face id"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as e:  # network errors, unknown repos, gated models
        from huggingface_hub.errors import LocalEntryNotFoundError

        why = " ".join(str(e).split())  # one line: the hub's messages span several
        if isinstance(e, LocalEntryNotFoundError):
            why = "not in the local Hugging Face cache, and the hub cannot be reached"
        raise ValueError(f"cannot find model {model!r}: {why}") from e


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, list) else [int(x)]
