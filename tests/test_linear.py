"""The GEMM wrapper's CPU side: row-count buckets, and the F.linear fallback wherever the
cuBLASLt path does not apply (its GPU side is in test_gpu.py)."""

from __future__ import annotations

import torch

from minisgl.kernel import cublaslt


def test_buckets() -> None:
    assert [cublaslt.bucket(m) for m in (1, 2, 3, 5, 8, 9, 16, 17, 250, 256)] == [
        1, 2, 4, 8, 8, 16, 16, 32, 256, 256,
    ]  # fmt: skip
    assert [cublaslt.bucket(m) for m in (257, 512, 513, 8192)] == [512, 512, 1024, 8192]
    for m in range(1, 3000):  # a bucket holds m, and a padded decode batch keeps m's bucket
        b = cublaslt.bucket(m)
        assert b >= m and cublaslt.bucket(b) == b


def test_cpu_falls_back_to_torch() -> None:
    x, w, bias = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    assert not cublaslt.usable(x, w)
    assert torch.equal(cublaslt.linear(x, w), torch.nn.functional.linear(x, w))
    assert torch.equal(cublaslt.linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
    assert not cublaslt.tune([w], [1, 2])  # nothing to tune without a GPU
