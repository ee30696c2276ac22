"""Every MINISGL_* environment variable, declared once here with its help (`--help` lists
`VARS`, docs/features.md documents them; tests/e2e/test_cli.py checks that nothing else is read).

One parser per kind: a switch takes 1/true/yes/on or 0/false/no/off (unset or empty: its
default; anything else is an error naming the variable), so `MINISGL_DISABLE_KERNELS=0` means
"not disabled". Values are read when a function is called, never at import, so a test's
monkeypatch.setenv takes effect; a reader that keeps a value says why where it does.
"""

from __future__ import annotations

import os

VARS = {  # name -> (the value --help shows, help)
    "MINISGL_DISABLE_OVERLAP_SCHEDULING": ("=1", "the plain sequential scheduler loop"),
    "MINISGL_DECODE_SORT": ("=0", "decode in admission order, not longest context first"),
    "MINISGL_DISABLE_KERNELS": ("=1", "torch/FlashInfer ops, not minisgl's Triton/tvm-ffi kernels"),
    "MINISGL_DISABLE_FUSED": ("=1", "torch ops, not FlashInfer's fused norm/activation/RoPE"),
    "MINISGL_FI_TENSOR_CORES": ("=0|1", "tensor-core FlashInfer decode (default: 1 at 2+ q/kv)"),
    "MINISGL_FI_DECODE_BACKEND": ("", "that decode kernel's FlashInfer backend (default: fa2)"),
    "MINISGL_DEBUG_POISON": ("=1", "debug: NaN-filled KV pool and sentinels (docs/correctness.md)"),
    "MINISGL_QK_HEADS": ("", "heads per program of the q/k-norm+RoPE kernel (default: 8)"),
    "MINISGL_QK_WARPS": ("", "warps per program of that kernel (default: 4)"),
    "MINISGL_API_KEY": ("", "the API key, when neither --api-key nor --api-key-file is given"),
}


def _raw(name: str) -> str:
    assert name in VARS, f"{name} is not declared in minisgl.env.VARS"
    return os.environ.get(name, "").strip()


def flag(name: str, default: bool = False) -> bool:
    value = _raw(name).lower()
    if not value:
        return default
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1/0, true/false, yes/no or on/off")


def integer(name: str, default: int) -> int:
    value = _raw(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def overlap_scheduling() -> bool:
    return not flag("MINISGL_DISABLE_OVERLAP_SCHEDULING")


def decode_sort() -> bool:
    """Decode batches longest context first (docs/features.md), unless switched off."""
    return flag("MINISGL_DECODE_SORT", default=True)


def disable_kernels() -> bool:
    return flag("MINISGL_DISABLE_KERNELS")


def disable_fused() -> bool:
    return flag("MINISGL_DISABLE_FUSED")


def fi_tensor_cores(default: bool) -> bool:
    return flag("MINISGL_FI_TENSOR_CORES", default)


def fi_decode_backend() -> str:
    return _raw("MINISGL_FI_DECODE_BACKEND") or "fa2"


def debug_poison() -> bool:
    return flag("MINISGL_DEBUG_POISON")


def qk_heads() -> int:
    return integer("MINISGL_QK_HEADS", 8)


def qk_warps() -> int:
    return integer("MINISGL_QK_WARPS", 4)


def api_key() -> str | None:
    return os.environ.get("MINISGL_API_KEY") or None  # as set, not stripped: it is a secret
