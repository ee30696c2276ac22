"""GPU checks of Qwen3-MoE and Mistral (marked `gpu`, skipped without CUDA): the compiled MoE
kernels against the torch path for batch sizes 1-512 and several expert counts (also inside
a CUDA graph), float32 GPU tokens against CPU, bf16 logits against transformers, and decode
CUDA graphs against eager mode."""

from __future__ import annotations

import pytest
import torch
from conftest import MOE_CONFIG
from test_gpu import LLM, _greedy, _hf_init_model, _prompts
from test_moe import _inputs, kernel_checks

pytestmark = pytest.mark.gpu

SIZES = [1, 2, 3, 8, 17, 64, 100, 256, 512]
# (experts, top-k, hidden, intermediate): a small one, Qwen1.5-MoE-like, Qwen3-30B-A3B's
SHAPES = [(8, 2, 256, 96), (64, 4, 512, 256), (128, 8, 2048, 768)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"E{s[0]}k{s[1]}")
def test_moe_kernel_matches_torch(shape: tuple[int, int, int, int]) -> None:
    """For each expert shape (up to Qwen3-30B-A3B's), the compiled MoE kernels match the torch path
    in float32 and bf16 for 1 to 512 tokens and a skewed routing, and moe_align's sorted list holds
    every (token, expert) pair once, in tiles owned by its expert."""
    e, k, h, i = shape
    cases = [(t, e, k, h, i, "random") for t in SIZES] + [(256, e, k, h, i, "skewed")]
    for line in kernel_checks("cuda", cases, [torch.float32, torch.bfloat16]):
        print(line)


@pytest.mark.parametrize("bs", [1, 16, 160])
def test_moe_kernel_in_cuda_graph(bs: int) -> None:
    """Captured once, replayed on other routings (a skewed one among them): equal to eager."""
    from minisgl.kernel.moe import fused_moe_triton

    shape = (bs, 128, 8, 2048, 768)
    static = _inputs(*shape, "random", torch.bfloat16, "cuda", seed=0)
    fused_moe_triton(*static)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_triton(*static)
    for seed, routing in ((1, "random"), (2, "skewed"), (3, "random")):
        new = _inputs(*shape, routing, torch.bfloat16, "cuda", seed=seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(out, fused_moe_triton(*new)), (bs, routing)


@pytest.fixture(scope="session")
def moe_hd128_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    kw = {**MOE_CONFIG, "moe_intermediate_size": 128}
    return _hf_init_model(tmp_path_factory, "moe_hd128", "Qwen3Moe", hidden_size=256,
                          head_dim=128, num_attention_heads=4, **kw)  # fmt: skip


@pytest.fixture(scope="session")
def mistral_hd128_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _hf_init_model(tmp_path_factory, "mistral_hd128", "Mistral", hidden_size=256,
                          head_dim=128, num_attention_heads=4, sliding_window=None)  # fmt: skip


@pytest.mark.parametrize("fixture", ["qwen3_moe_dir", "qwen3_moe_fused_dir", "mistral_dir"])
def test_fp32_gpu_matches_cpu(fixture: str, request: pytest.FixtureRequest) -> None:
    """float32 on the GPU (the kernels with float32 products): CPU's greedy tokens (which are
    transformers', tests/unit/test_models.py) and prefill logits within 1e-4 of transformers."""
    from conftest import load_hf_model

    path = request.getfixturevalue(fixture)
    prompts = _prompts(4, 200)
    cpu = _greedy(LLM(path, device="cpu", dtype="float32"), prompts)
    llm = LLM(path, device="cuda", dtype="float32", attn="torch", cuda_graph_max_bs=0)
    assert _greedy(llm, prompts) == cpu
    ref = load_hf_model(request.getfixturevalue(fixture.replace("_fused", "")))
    with torch.no_grad():
        want = ref(torch.tensor([prompts[0]])).logits[0]
    err = (llm.prefill_logits(prompts[0]).cpu() - want).abs().max().item()
    print(f"{fixture}: fp32 GPU prefill logits vs transformers: max |diff| {err:.1e}")
    assert err <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("fixture", ["moe_hd128_dir", "mistral_hd128_dir"])
def test_bf16_logits_vs_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    """In bf16, prefill logits of the Qwen3-MoE and Mistral checkpoints, with torch attention and
    with FlashInfer, are within 2e-2 relative error of transformers' bf16 logits."""
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    ids = _prompts(1, 200, seed=2)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
    for attn in ("torch", "fi"):
        ours = LLM(path, device="cuda", dtype="bfloat16", attn=attn, cuda_graph_max_bs=0)
        err = ((ours.prefill_logits(ids).cpu() - ref).norm() / ref.norm()).item()
        print(f"{fixture} {attn}: bf16 rel err vs transformers {err:.2e}")
        assert err < 2e-2


def test_moe_graph_replay_equals_eager(moe_hd128_dir: str) -> None:
    """The decode graphs (buckets up to 64, their padded rows routed too; FlashInfer, so
    bf16) give the eager engine's tokens."""
    prompts = [[1, *p] for p in _prompts(37, 300, seed=5)]
    kw = dict(device="cuda", dtype="bfloat16", attn="fi")
    eager = _greedy(LLM(moe_hd128_dir, cuda_graph_max_bs=0, **kw), prompts)
    graph_llm = LLM(moe_hd128_dir, cuda_graph_max_bs=64, **kw)
    assert graph_llm.engine.graphs is not None
    assert _greedy(graph_llm, prompts) == eager
