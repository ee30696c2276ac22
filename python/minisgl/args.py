"""Every engine/server option in one dataclass, shared by the CLI and `minisgl.LLM`."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import env


@dataclass
class ServerArgs:
    model: str = ""
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    tp: int = 1  # over all nodes
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of node 0's rendezvous (nnodes > 1)
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
    api_key_file: str | None = None
    allowed_hosts: str | None = None
    allowed_origins: str | None = None
    num_tokenizer: int = 1
    log_level: str = "info"
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 16
    max_choices: int = 256
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20
    request_timeout: float = 0.0
    stall_timeout: float = 10.0
    reasoning_parser: str | None = None
    temperature: float = 0.0  # shell sampling defaults
    max_tokens: int = 0  # 0 = fitted to the context (shell.py)
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
        need(self.nnodes >= 1, f"--nnodes must be >= 1, got {self.nnodes}")
        need(0 <= self.node_rank < self.nnodes, "--node-rank must be in [0, --nnodes)")
        need(self.tp % self.nnodes == 0, f"--tp {self.tp} must be a multiple of --nnodes")
        if self.nnodes > 1:
            host, _, port = (self.dist_init_addr or "").rpartition(":")
            need(bool(host) and port.isdigit(), "--nnodes > 1 needs --dist-init-addr HOST:PORT")
            need(not self.shell, "--shell runs on one node only")
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
        need(self.max_tokens >= 0, f"--max-tokens must be >= 0, got {self.max_tokens}")
        need(
            self.max_n >= 1 and self.max_request_bytes >= 1024,
            "--max-n / --max-request-bytes too small",
        )
        need(
            min(self.max_choices, self.max_waiting_requests) >= 1 and self.max_waiting_tokens >= 0,
            "--max-choices / --max-waiting-requests must be >= 1, --max-waiting-tokens >= 0",
        )
        need(
            self.request_timeout >= 0 and self.stall_timeout > 0,
            "--request-timeout must be >= 0 and --stall-timeout > 0",
        )
        need(
            self.reasoning_parser in (None, "qwen3"),
            f"--reasoning-parser must be qwen3, got {self.reasoning_parser!r}",
        )
        need(
            self.log_level in ("debug", "info", "warning", "error"),
            f"--log-level must be debug, info, warning or error, got {self.log_level!r}",
        )

    def __repr__(self) -> str:  # the API key never reaches a log
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        return f"ServerArgs({shown | {'api_key': '***' if self.api_key else None}})"

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def local_ranks(self) -> range:
        """The global TP ranks whose scheduler runs on this node."""
        n = self.tp // self.nnodes
        return range(self.node_rank * n, (self.node_rank + 1) * n)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def replace(self, **kw: Any) -> ServerArgs:
        return dataclasses.replace(self, **kw)


_HELP = {
    "model": "HF model id or local model directory (required)",
    "device": "auto (cuda when a GPU is visible), cuda or cpu",
    "dtype": "auto = checkpoint dtype on GPU, float32 on CPU",
    "tp": "tensor-parallel size over all nodes (one scheduler process per rank)",
    "nnodes": "number of nodes the TP group spans (node 0 serves HTTP)",
    "node_rank": "this node's index in [0, --nnodes)",
    "dist_init_addr": "HOST:PORT of node 0's rendezvous, reachable from every node",
    "cache": "prefix cache: radix (reuse shared prefixes) or naive (no reuse)",
    "max_prefill_length": "token budget of one prefill step; longer prompts are chunked",
    "page_size": "tokens per KV page; 0 = 1 on CPU, 64 on GPU",
    "attn": "attention backend: auto, torch, fi, fa, or a prefill,decode pair like fa,fi",
    "cuda_graph_max_bs": "largest decode batch captured in a CUDA graph; -1 = auto, 0 = off",
    "max_running_requests": "cap on requests decoding at once",
    "memory_ratio": "fraction of GPU memory for weights + KV cache",
    "num_pages": "KV pages to allocate (overrides --memory-ratio); 0 = from memory",
    "max_seq_len": "longest sequence (prompt + output); 0 = the model's context length",
    "dummy_weight": "random weights: a directory with only config.json runs",
    "seed": "seed for unseeded sampling and dummy weights",
    "host": "address to bind; 0.0.0.0 exposes the server to the network",
    "port": "HTTP port",
    "shell": "interactive chat in the terminal instead of an HTTP server",
    "chat_template": "path of a Jinja chat template overriding the tokenizer's",
    "served_model_name": "the name clients send as `model` and /v1/models lists "
    "(default: the --model argument as given)",
    "api_key": "require 'Authorization: Bearer KEY' on every /v1 route and /generate "
    "(/health and /metrics stay open)",
    "api_key_file": "read the API key from this file's first line (or set MINISGL_API_KEY): "
    "unlike --api-key, not visible in ps",
    "allowed_hosts": "comma-separated Host header names accepted, or '*' (default: loopback "
    "names when bound to loopback, else any)",
    "allowed_origins": "comma-separated Origin values accepted from browsers, or '*', also "
    "answered with CORS headers (default: origins whose host is an allowed host, no CORS)",
    "num_tokenizer": "number of tokenizer worker processes",
    "log_level": "debug, info, warning or error",
    "max_request_bytes": "largest accepted request body, in bytes",
    "max_n": "largest accepted n (choices per request)",
    "max_choices": "largest prompts x n in one request (400 beyond)",
    "max_waiting_requests": "choices without a first token yet, server-wide (429 beyond)",
    "max_waiting_tokens": "prompt tokens waiting in the scheduler (429 beyond; 0 = no limit)",
    "request_timeout": "seconds after which a request ends with a 504 error (0 = never)",
    "stall_timeout": "seconds a client may read nothing of its response before it is aborted",
    "temperature": "sampling temperature of the answers",
    "max_tokens": "max new tokens per answer; 0 = a quarter of the context, at most 512",
    "reasoning_parser": "qwen3: move <think>...</think> into reasoning_content (chat)",
}
_GROUPS = {  # --help sections, in this order; every flag is in one
    "model": ["model", "served_model_name", "chat_template", "dtype", "dummy_weight", "seed"],
    "engine": ["device", "tp", "nnodes", "node_rank", "dist_init_addr", "cache", "max_prefill_length", "page_size", "attn",
               "cuda_graph_max_bs", "max_running_requests", "memory_ratio", "num_pages",
               "max_seq_len"],
    "HTTP server": ["host", "port", "api_key", "api_key_file", "allowed_hosts", "allowed_origins",
                    "num_tokenizer", "log_level", "max_request_bytes", "max_n", "max_choices",
                    "max_waiting_requests", "max_waiting_tokens", "request_timeout",
                    "stall_timeout", "reasoning_parser"],
    "interactive shell (--shell)": ["shell", "temperature", "max_tokens"],
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from minisgl import __version__

    env_help = "\n".join(f"  {k}{shown}\n{' ' * 8}{v}" for k, (shown, v) in env.VARS.items())
    p = argparse.ArgumentParser(
        prog="python -m minisgl",
        description="minisgl: an OpenAI-compatible LLM server, or a terminal chat with --shell.",
        epilog=f"environment variables:\n{env_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"minisgl {__version__}")
    fields = {f.name: f for f in dataclasses.fields(ServerArgs) if f.repr}
    grouped = {n for names in _GROUPS.values() for n in names}
    groups = {**_GROUPS, "other": [n for n in fields if n not in grouped]}
    for title, names in groups.items():
        if not names:
            continue
        group = p.add_argument_group(title)
        for name in names:
            flag, default, text = "--" + name.replace("_", "-"), fields[name].default, _HELP[name]
            if isinstance(default, bool):
                group.add_argument(flag, action="store_true", help=text)
                continue
            if default not in (None, "") and "default" not in text:
                text += f" (default: {default})"
            typ = type(default) if default is not None else str
            group.add_argument(flag, type=typ, default=default, required=name == "model", help=text)
    return p


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.api_key_file:  # never on the command line (ps) nor in a log
            if ns.api_key:
                parser.error("give --api-key or --api-key-file, not both")
            with open(ns.api_key_file) as f:
                ns.api_key = f.readline().strip() or parser.error("--api-key-file is empty")
        ns.api_key = ns.api_key or env.api_key()
        return ServerArgs(**vars(ns))
    except OSError as e:
        parser.error(f"--api-key-file: {e.strerror}: {ns.api_key_file}")
        raise
    except ValueError as e:
        parser.error(str(e))
        raise
