"""Tensor parallelism on two GPUs (NCCL; marked `gpu`, skipped with fewer than 2 GPUs).

float32 with the torch backend: `tp=2` must give exactly the greedy tokens of `tp=1`, for a
checkpoint whose KV heads split across the ranks and one whose single KV head is replicated.
bf16 with FlashInfer, CUDA graphs and overlap scheduling at `tp=2`: every request completes
with its full length (all-reduce sums differ in rounding from one GPU's, so bf16 tokens are
not compared)."""

from __future__ import annotations

import pytest
import torch
from conftest import _build

from minisgl import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
PROMPTS = [[1, 45, 120, 200, 33, 7], [1, 300, 12], [1, 5, 99, 250, 251, 17, 64, 380], [1, 7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", params=[2, 1], ids=["kv2", "kv1"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _build(tmp_path_factory, f"qwen3_gpu_tp_kv{request.param}", "Qwen3Config",
                  "Qwen3ForCausalLM", seed=3, num_attention_heads=4,
                  num_key_value_heads=request.param, head_dim=128)  # fmt: skip


def _run(model_dir: str, tp: int, **kw: object) -> list[list[int]]:
    llm = LLM(model_dir, device="cuda", tp=tp, num_pages=2048, **kw)
    try:
        return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


def test_tp2_equals_tp1_fp32(model_dir: str) -> None:
    """float32 with torch attention on two GPUs (tp=2) gives exactly the greedy tokens of tp=1, for
    KV heads split across the ranks and for a single KV head replicated on both."""
    kw = dict(dtype="float32", attn="torch")
    ref = _run(model_dir, 1, **kw)
    got = _run(model_dir, 2, **kw)
    print("tp=1", ref[0][:12], "\ntp=2", got[0][:12])
    assert got == ref


def test_tp2_bf16_graphs_complete(model_dir: str) -> None:
    """bf16 at tp=2 with FlashInfer, CUDA graphs and 16-token pages completes every request with its
    full 24 tokens."""
    out = _run(model_dir, 2, dtype="bfloat16", attn="fi", page_size=16)
    assert [len(t) for t in out] == [24] * len(PROMPTS)
