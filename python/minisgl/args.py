"""Every engine/server option in one dataclass, shared by the CLI and `minisgl.LLM`."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServerArgs:
    model: str = ""
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    tp: int = 1
    cache: str = "radix"  # radix | naive
    max_prefill_length: int = 16384
    page_size: int = 0  # 0 = default (1 on CPU, 64 on GPU)
    attn: str = "auto"
    cuda_graph_max_bs: int = -1  # -1 = chosen from memory, 0 = disabled
    max_running_requests: int = 256
    memory_ratio: float = 0.9
    num_pages: int = 0  # 0 = sized from memory_ratio (GPU) or a default (CPU)
    max_seq_len: int = 0  # 0 = the model's context length
    dummy_weight: bool = False
    seed: int = 0
    # server only
    host: str = "127.0.0.1"
    port: int = 30000
    shell: bool = False
    chat_template: str | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    num_tokenizer: int = 1
    log_level: str = "info"
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 16
    allowed_origins: str | None = None
    reasoning_parser: str | None = None
    temperature: float = 0.0  # shell sampling defaults
    max_tokens: int = 512
    # internal
    zmq_dir: str = field(default="", repr=False)
    dist_port: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(
            self.device in ("auto", "cuda", "cpu"),
            f"--device must be auto, cuda or cpu, got {self.device!r}",
        )
        need(
            self.dtype in ("auto", "float32", "float16", "bfloat16"),
            f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}",
        )
        need(self.tp >= 1, f"--tp must be >= 1, got {self.tp}")
        need(
            self.cache in ("radix", "naive"), f"--cache must be radix or naive, got {self.cache!r}"
        )
        need(self.max_prefill_length >= 1, "--max-prefill-length must be >= 1")
        need(self.page_size >= 0, "--page-size must be >= 1")
        need(self.max_running_requests >= 1, "--max-running-requests must be >= 1")
        need(
            0 < self.memory_ratio <= 1, f"--memory-ratio must be in (0, 1], got {self.memory_ratio}"
        )
        need(self.num_pages >= 0, "--num-pages must be >= 1")
        need(self.cuda_graph_max_bs >= -1, "--cuda-graph-max-bs must be >= 0")
        need(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}")
        need(self.num_tokenizer >= 1, "--num-tokenizer must be >= 1")
        need(
            self.max_n >= 1 and self.max_request_bytes >= 1024,
            "--max-n / --max-request-bytes too small",
        )
        need(
            self.reasoning_parser in (None, "qwen3"),
            f"--reasoning-parser must be qwen3, got {self.reasoning_parser!r}",
        )
        need(
            self.log_level in ("debug", "info", "warning", "error"),
            f"--log-level must be debug, info, warning or error, got {self.log_level!r}",
        )

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def replace(self, **kw: Any) -> ServerArgs:
        return dataclasses.replace(self, **kw)


_HELP = {
    "model": "HF model id or local directory",
    "device": "auto (cuda when a GPU is visible), cuda or cpu",
    "dtype": "auto = checkpoint dtype on GPU, float32 on CPU",
    "tp": "tensor-parallel size (one scheduler process per rank)",
    "cache": "prefix cache: radix (reuse shared prefixes) or naive (no reuse)",
    "max_prefill_length": "token budget of one prefill step; longer prompts are chunked",
    "page_size": "tokens per KV page (0 = 1 on CPU, 64 on GPU)",
    "attn": "attention backend: auto, torch, fi, fa, or a prefill,decode pair like fa,fi",
    "cuda_graph_max_bs": "largest decode batch captured in a CUDA graph (-1 auto, 0 off)",
    "max_running_requests": "cap on requests decoding at once",
    "memory_ratio": "fraction of GPU memory for weights + KV cache",
    "num_pages": "KV pages to allocate (overrides --memory-ratio)",
    "max_seq_len": "longest sequence (prompt + output); 0 = model context length",
    "dummy_weight": "random weights: a directory with only config.json runs",
    "seed": "seed for unseeded sampling and dummy weights",
    "host": "address to bind (default loopback only)",
    "port": "HTTP port",
    "shell": "interactive chat in the terminal instead of an HTTP server",
    "chat_template": "path of a Jinja chat template overriding the tokenizer's",
    "served_model_name": "model name reported by the API (default: --model)",
    "api_key": "require 'Authorization: Bearer KEY' on /v1 routes",
    "num_tokenizer": "number of tokenizer worker processes",
    "log_level": "debug, info, warning or error",
    "max_request_bytes": "largest accepted request body",
    "max_n": "largest accepted n (choices per request)",
    "allowed_origins": "comma-separated origins allowed by CORS (e.g. http://localhost:3000, or *)",
    "reasoning_parser": "qwen3: move <think>...</think> into reasoning_content (chat)",
    "temperature": "shell: sampling temperature",
    "max_tokens": "shell: max new tokens per answer",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minisgl", description="minisgl LLM server")
    for f in dataclasses.fields(ServerArgs):
        if not f.repr:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
        else:
            typ = type(default) if default is not None else str
            p.add_argument(
                flag, type=typ, default=default, help=f"{_HELP[f.name]} (default: {default})"
            )
    return p


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.model:
        parser.error("--model is required")
    try:
        return ServerArgs(**vars(ns))
    except ValueError as e:
        parser.error(str(e))
        raise


def overlap_enabled() -> bool:
    return os.environ.get("MINISGL_DISABLE_OVERLAP_SCHEDULING", "0") in ("", "0", "false")


def decode_sort_enabled() -> bool:
    """Decode batches longest context first, unless MINISGL_DECODE_SORT=0."""
    return os.environ.get("MINISGL_DECODE_SORT", "1") not in ("0", "false")
