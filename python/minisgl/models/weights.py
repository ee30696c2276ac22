"""Safetensors loading into the model (a checkpoint's tensor names mapped to our parameters)."""

from __future__ import annotations

import glob
import json
import os
import re

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

# HF name fragment -> (our fused parameter fragment, shard index)
_FUSED = {".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1),
          ".v_proj.": (".qkv_proj.", 2), ".gate_proj.": (".gate_up_proj.", 0),
          ".up_proj.": (".gate_up_proj.", 1)}  # fmt: skip
# the hub's per-expert tensors -> our 3-D expert tensor, the expert index as a loader argument
_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_up_proj|down_proj)\.weight$")
# Mistral3ForConditionalGeneration: the language model's tensors under two prefixes
# (transformers 4.x and hub checkpoints, then 5.x); the vision tower is not loaded
_RENAME = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
           ("model.language_model.", "model."))  # fmt: skip
_SKIP = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")  # fmt: skip


def checkpoint_target(name: str) -> tuple[str, tuple[int, ...]] | None:
    """Our parameter for the checkpoint tensor `name` and the extra weight_loader arguments
    (shard of a fused projection, expert index); None for tensors that are not loaded."""
    if "rotary_emb" in name or name.startswith(_SKIP):
        return None
    for old, new in _RENAME:
        if name.startswith(old):
            name = new + name[len(old) :]
    args: tuple[int, ...] = ()
    for frag, (fused, idx) in _FUSED.items():
        if frag in name:
            name, args = name.replace(frag, fused), (idx,)
            break
    if m := _EXPERT.search(name):
        name, args = f"{name[: m.start()]}.experts.{m.group(2)}", (*args, int(m.group(1)))
    return name, args


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(
            f"no *.safetensors weights in {path} (only safetensors is supported; or pass --dummy-weight)"
        )
    return files


def load_weights(model: nn.Module, path: str, show_progress: bool = True) -> None:
    params, tied = dict(model.named_parameters()), model.cfg.tie_word_embeddings
    seen: set[str] = set()
    files = safetensors_files(path)
    for file in tqdm(files, desc="Loading weights", disable=not show_progress or len(files) < 2):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                mapped = checkpoint_target(name)
                if mapped is None:
                    continue
                target, args = mapped
                if target not in params:
                    if target == "lm_head.weight" and tied:
                        continue  # a tied checkpoint may still ship its own copy
                    raise ValueError(f"unexpected tensor {name!r} in {os.path.basename(file)}")
                param = params[target]
                with torch.no_grad():
                    param.weight_loader(param, f.get_tensor(name).to(param.dtype), *args)
                seen.add(target)
    missing = [n for n in params if n not in seen and not (n == "lm_head.weight" and tied)]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of a sensible scale, so dummy runs produce finite, varied logits."""
    # drawn where the parameters live, in their dtype: on the CPU in float32 one tensor at a
    # time the Qwen3-8B shape took ~2 min before the engine was ready; on a GPU it is ms
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            p.uniform_(-0.02, 0.02, generator=gens[p.device])
