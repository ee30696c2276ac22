"""minisgl: a compact, fast, readable LLM serving engine."""

from .core import SamplingParams
from .llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
