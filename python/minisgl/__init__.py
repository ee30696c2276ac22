"""minisgl: a compact, fast, readable LLM serving engine.

`LLM` is imported on first use: `python -m minisgl --help` (which imports this package first)
then answers without loading torch.
"""

from typing import Any

from .core import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(f"module 'minisgl' has no attribute {name!r}")
