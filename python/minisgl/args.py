"""Every engine/server option in one dataclass, shared by the CLI and `minisgl.LLM`."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from . import env


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A field with its --help text beside it."""
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ServerArgs:
    """None = chosen at start-up (from the device, the model or memory: each help says how);
    an option's help text is beside it (`_opt`), so the CLI is this dataclass."""

    model: str = _opt("", "HF model id or local model directory (required)")
    device: str = _opt("auto", "auto (cuda when a GPU is visible), cuda or cpu")
    dtype: str = _opt("auto", "auto = checkpoint dtype on GPU, float32 on CPU")
    tp: int = _opt(1, "tensor-parallel size over all nodes (one scheduler process per rank)")
    nnodes: int = _opt(1, "number of nodes the TP group spans (node 0 serves HTTP)")
    node_rank: int = _opt(0, "this node's index in [0, --nnodes)")
    dist_init_addr: str | None = _opt(None, "HOST:PORT of node 0's rendezvous, "
        "reachable from every node (--nnodes > 1)")  # fmt: skip
    cache: str = _opt("radix", "prefix cache: radix (reuse shared prefixes) or naive (no reuse)")
    max_prefill_length: int = _opt(16384, "tokens per prefill step; longer prompts are chunked")
    page_size: int | None = _opt(None, "tokens per KV page (default: 1 on CPU, 64 on GPU)")
    attn: str = _opt("auto", "attention backend: auto, torch, fi, fa, "
        "or a prefill,decode pair like fa,fi")  # fmt: skip
    cuda_graph_max_bs: int | None = _opt(None, "largest decode batch captured in a CUDA graph; "
        "0 = no graphs (default: chosen from --max-running-requests, at most 256)")  # fmt: skip
    max_running_requests: int = _opt(256, "cap on requests decoding at once")
    memory_ratio: float = _opt(0.9, "fraction of GPU memory for weights + KV cache")
    num_pages: int | None = _opt(None, "KV pages to allocate (default: sized from "
        "--memory-ratio on GPU, 32768 tokens' worth at most on CPU)")  # fmt: skip
    max_seq_len: int | None = _opt(None, "longest sequence, prompt + output "
        "(default: the model's context length)")  # fmt: skip
    dummy_weight: bool = _opt(False, "random weights: a directory with only config.json runs")
    seed: int = _opt(0, "seed for unseeded sampling and dummy weights")
    # server only
    host: str = _opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = _opt(30000, "HTTP port")
    shell: bool = _opt(False, "interactive chat in the terminal instead of an HTTP server")
    chat_template: str | None = _opt(None, "a Jinja chat template file overriding the tokenizer's")
    served_model_name: str | None = _opt(None, "the name clients send as `model` and "
        "/v1/models lists (default: the --model argument as given)")  # fmt: skip
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on every /v1 route "
        "and /generate (/health and /metrics stay open)")  # fmt: skip
    api_key_file: str | None = _opt(None, "read the API key from this file's first line (or "
        "set MINISGL_API_KEY): unlike --api-key, not visible in ps")  # fmt: skip
    allowed_hosts: str | None = _opt(None, "comma-separated Host header names accepted, or '*' "
        "(default: loopback names when bound to loopback, else any)")  # fmt: skip
    allowed_origins: str | None = _opt(None, "comma-separated Origin values accepted from "
        "browsers, or '*', also answered with CORS headers (default: origins whose host is an "
        "allowed host, no CORS)")  # fmt: skip
    num_tokenizer: int = _opt(1, "number of tokenizer worker processes")
    log_level: str = _opt("info", "debug, info, warning or error")
    max_request_bytes: int = _opt(8 * 1024 * 1024, "largest accepted request body, in bytes")
    max_n: int = _opt(16, "largest accepted n (choices per request)")
    max_choices: int = _opt(256, "largest prompts x n in one request (400 beyond)")
    max_waiting_requests: int = _opt(1024, "choices without a first token yet, "
        "server-wide (429 beyond)")  # fmt: skip
    max_waiting_tokens: int = _opt(1 << 20, "prompt tokens waiting in the scheduler "
        "(429 beyond; 0 = no limit)")  # fmt: skip
    request_timeout: float = _opt(0.0, "seconds after which a request ends with a 504 (0 = never)")
    stall_timeout: float = _opt(10.0, "seconds a client may read nothing of its response "
        "before it is aborted")  # fmt: skip
    reasoning_parser: str | None = _opt(None, "qwen3: move <think>...</think> into "
        "reasoning_content (chat)")  # fmt: skip
    temperature: float = _opt(0.0, "sampling temperature of the answers")  # shell's sampling
    max_tokens: int | None = _opt(None, "max new tokens per answer "
        "(default: a quarter of the context, at most 512)")  # fmt: skip
    # internal
    zmq_dir: str = field(default="", repr=False)
    dist_port: int = field(default=0, repr=False)

    def __post_init__(self) -> None:  # every construction is validated, replace() too
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        words = {  # the values each choice accepts, as its message says them
            "device": "auto, cuda or cpu",
            "dtype": "auto, float32, float16 or bfloat16",
            "cache": "radix or naive",
            "reasoning_parser": "qwen3",  # or None
            "log_level": "debug, info, warning or error",
        }
        for name, ok in words.items():
            v, accepted = getattr(self, name), ok.replace(" or ", ", ").split(", ")
            if not (v in accepted or (v is None and name == "reasoning_parser")):
                raise ValueError(f"--{name.replace('_', '-')} must be {ok}, got {v!r}")
        need(self.tp >= 1, f"--tp must be >= 1, got {self.tp}")
        need(self.nnodes >= 1, f"--nnodes must be >= 1, got {self.nnodes}")
        need(0 <= self.node_rank < self.nnodes, "--node-rank must be in [0, --nnodes)")
        need(self.tp % self.nnodes == 0, f"--tp {self.tp} must be a multiple of --nnodes")
        if self.nnodes > 1:
            host, _, port = (self.dist_init_addr or "").rpartition(":")
            need(bool(host) and port.isdigit(), "--nnodes > 1 needs --dist-init-addr HOST:PORT")
            need(not self.shell, "--shell runs on one node only")
        need(self.max_prefill_length >= 1, "--max-prefill-length must be >= 1")
        for flag, v, low in (("page-size", self.page_size, 1), ("num-pages", self.num_pages, 1),
                             ("max-seq-len", self.max_seq_len, 1), ("max-tokens", self.max_tokens, 1),
                             ("cuda-graph-max-bs", self.cuda_graph_max_bs, 0)):  # fmt: skip
            # None: the default; 0 or -1 (the old "default" values) are refused, not guessed at
            need(v is None or v >= low, f"--{flag} must be >= {low} (leave it out for the "
                 f"default), got {v}")  # fmt: skip
        need(self.max_running_requests >= 1, "--max-running-requests must be >= 1")
        need(0 < self.memory_ratio <= 1,
             f"--memory-ratio must be in (0, 1], got {self.memory_ratio}")  # fmt: skip
        need(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}")
        need(self.num_tokenizer >= 1, "--num-tokenizer must be >= 1")
        need(self.max_n >= 1 and self.max_request_bytes >= 1024,
             "--max-n / --max-request-bytes too small")  # fmt: skip
        need(min(self.max_choices, self.max_waiting_requests) >= 1 and self.max_waiting_tokens >= 0,
             "--max-choices / --max-waiting-requests must be >= 1, "
             "--max-waiting-tokens >= 0")  # fmt: skip
        need(self.request_timeout >= 0 and self.stall_timeout > 0,
             "--request-timeout must be >= 0 and --stall-timeout > 0")  # fmt: skip

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
    hints = typing.get_type_hints(ServerArgs)
    assert {n for names in _GROUPS.values() for n in names} == fields.keys(), "flag without a group"
    for title, names in _GROUPS.items():
        group = p.add_argument_group(title)
        for name in names:
            f, flag = fields[name], "--" + name.replace("_", "-")
            default, text = f.default, f.metadata["help"]
            if isinstance(default, bool):
                group.add_argument(flag, action="store_true", help=text)
                continue
            if default not in (None, "") and "default" not in text:
                text += f" (default: {default})"
            hint = hints[name]  # X, or X | None: then X
            typ = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
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
    except ValueError as e:
        parser.error(str(e))
