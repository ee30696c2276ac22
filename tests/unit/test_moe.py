"""Qwen3-MoE and Mistral beyond tests/unit/test_models.py (which checks them against transformers
at tp=1): greedy tokens at tp=2 on CPU/gloo (against transformers), the MoE Triton kernels run in triton's
interpreter (against the torch path, and inside the tiny model against transformers), the
sliding-window start-up error, and the offline benchmark on a MoE config with dummy weights.

`kernel_checks(device)` is shared with tests/gpu/test_gpu_moe.py, which runs it compiled."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MOE_CONFIG, _common_config
from test_models import PROMPTS, hf_greedy, hf_logits

ROOT = Path(__file__).resolve().parents[2]

# (tokens, experts, top-k, hidden, intermediate, routing): odd sizes exercise every mask;
# "skewed" sends every token to experts 0..k-1 (one expert's run spans many tiles)
CPU_CASES = [
    (0, 8, 2, 64, 32, "random"),
    (1, 8, 2, 64, 32, "random"),
    (7, 8, 2, 64, 48, "random"),
    (33, 16, 4, 96, 80, "random"),
    (64, 4, 2, 64, 160, "skewed"),
]


def _inputs(t, e, k, h, i, routing, dtype, device, seed=0):  # noqa: ANN001, ANN202
    """x, w13, w2, router weights and expert ids, drawn on `device` (30B-A3B's are 2 GB)."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    x = torch.randn(t, h, **kw)
    w13 = torch.randn(e, 2 * i, h, **kw) / h**0.5
    w2 = torch.randn(e, h, i, **kw) / i**0.5
    logits = torch.randn(t, e, **kw)
    if routing == "skewed":
        logits[:, :k] += 100.0
    weights, ids = torch.topk(torch.softmax(logits, -1), k)
    return [x.to(dtype), w13.to(dtype), w2.to(dtype), weights.to(dtype), ids]


def kernel_checks(device: str, cases: list[tuple], dtypes: list[torch.dtype]) -> list[str]:
    """The Triton path against the torch path (in float32); the sorted list's invariants."""
    from minisgl.kernel.moe import _config, fused_moe_torch, fused_moe_triton, moe_align

    report = []
    for t, e, k, h, i, routing in cases:
        for dtype in dtypes:
            args = _inputs(t, e, k, h, i, routing, dtype, device)
            # the reference: the torch path in float32 on the same (rounded) inputs
            want = fused_moe_torch(*[a.float() if a.is_floating_point() else a for a in args])
            got, torch_path = fused_moe_triton(*args).float(), fused_moe_torch(*args).float()
            assert got.shape == want.shape == (t, h)
            if t == 0:
                continue
            err, base = (((o - want).norm() / want.norm()).item() for o in (got, torch_path))
            # bf16: the interpreter truncates to 16 bits where GPUs round (about 6e-3 then)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            report.append(f"T={t} E={e} k={k} {routing} {dtype}: rel err {err:.1e} "
                          f"(torch path {base:.1e})")  # fmt: skip
            assert err < tol, report[-1]
            ids = args[4]
            bm = _config(t * k, e)["BLOCK_M"]
            sorted_ids, expert_ids, padded_len = moe_align(ids, e, bm)
            n, flat = t * k, ids.flatten().cpu()
            s, owners, total = sorted_ids.cpu(), expert_ids.cpu(), int(padded_len.item())
            counts = torch.bincount(flat, minlength=e)
            assert total == int(((counts + bm - 1) // bm * bm).sum())
            real = s[:total][s[:total] < n]
            assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
            assert (s[total:] == n).all()
            tile_of = torch.arange(total) // bm
            pos = (s[:total] < n).nonzero().flatten()
            assert (owners[tile_of[pos]] == flat[s[pos].long()]).all()  # tiles own their pairs
    return report


def test_kernels_in_triton_interpreter(qwen3_moe_dir: str, hf_model) -> None:
    """Runs the kernels in triton's interpreter (TRITON_INTERPRET=1 must be set before
    minisgl imports, so in a child process): against the torch path, then inside the tiny
    model, whose greedy tokens and prefill logits must match transformers."""
    assert importlib.util.find_spec("triton"), "triton is a dev dependency: pip install -e '.[dev]'"
    ids = PROMPTS[1]
    code = f"""
import json, torch
import minisgl.kernel.moe as moe
from test_moe import CPU_CASES, kernel_checks
from minisgl import LLM, SamplingParams
print(kernel_checks("cpu", CPU_CASES, [torch.float32, torch.bfloat16]))
calls, kernel = [], moe.fused_moe_triton
moe.fused_moe_triton = lambda *a: calls.append(1) or kernel(*a)
llm = LLM({qwen3_moe_dir!r}, device="cpu", dtype="float32")
out = llm.generate([{ids}], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
logits = llm.prefill_logits({ids}).float()
assert len(calls) > 2 * 32, len(calls)  # two sparse layers per step took the kernels
print(json.dumps({{"tokens": out[0]["token_ids"], "logits": logits.tolist()}}))
llm.shutdown()
"""
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "tests" / "unit"), *sys.path])
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=240, cwd=ROOT / "tests", env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    ref = hf_model(qwen3_moe_dir)
    assert res["tokens"] == hf_greedy(ref, ids)
    expected = hf_logits(ref, ids)
    err = (torch.tensor(res["logits"]) - expected).abs().max().item()
    assert err <= 1e-4 * max(1.0, expected.abs().max().item()), err


TP2 = ["qwen3_moe_dir", "qwen3_moe_fused_dir", "mistral_dir"]


@pytest.fixture(scope="module")
def tp2_llms(request: pytest.FixtureRequest):
    from minisgl import LLM

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers' environment is fixed at spawn
    llms = {}
    try:
        for name in TP2:
            llms[name] = LLM(request.getfixturevalue(name), device="cpu", dtype="float32", tp=2)
        yield llms
    finally:
        for llm in llms.values():
            llm.shutdown()
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.mark.parametrize("fixture", TP2)
def test_tp2_greedy_matches_hf(
    fixture: str, request: pytest.FixtureRequest, tp2_llms, hf_model
) -> None:
    """Two gloo ranks (the experts' intermediate dimension split, from both checkpoint
    layouts; Mistral's heads): 32 greedy tokens equal transformers'."""
    from minisgl import SamplingParams

    ref = hf_model(request.getfixturevalue(fixture.replace("_fused", "")))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    got = [o["token_ids"] for o in tp2_llms[fixture].generate(PROMPTS, params, use_tqdm=False)]
    assert got == [hf_greedy(ref, ids) for ids in PROMPTS]


def _config_dir(tmp_path: Path, **cfg: object) -> str:
    cfg = _common_config(**cfg)
    cfg["dtype"] = cfg.pop("torch_dtype")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_sliding_window_refused_unless_within(tmp_path: Path) -> None:
    """A Mistral config with a 16-token sliding window is refused at start-up with an error that
    names the window and --max-seq-len 16; with max_seq_len=16 it starts and generates 8 tokens."""
    from minisgl import LLM, SamplingParams

    d = _config_dir(tmp_path, architectures=["MistralForCausalLM"], sliding_window=16)
    with pytest.raises(Exception, match=r"sliding window of 16 tokens.*--max-seq-len 16"):
        LLM(d, device="cpu", dtype="float32", dummy_weight=True).shutdown()
    llm = LLM(d, device="cpu", dtype="float32", dummy_weight=True, max_seq_len=16)
    out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 8
    llm.shutdown()


def test_mistral3_other_language_model_refused(tmp_path: Path) -> None:
    """A Mistral3 checkpoint whose text model is of another type (ministral3) is refused with an
    error naming that language model type."""
    from minisgl import LLM

    text = _common_config(model_type="ministral3")
    cfg = {"architectures": ["Mistral3ForConditionalGeneration"], "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="language model type 'ministral3'"):
        LLM(str(tmp_path), device="cpu", dtype="float32", dummy_weight=True).shutdown()


def test_offline_bench_moe_config_dummy_weights(tmp_path: Path) -> None:
    """benchmark/offline/bench.py --config-json on a bfloat16 Qwen3-MoE config (the 30B-A3B
    one, shrunk): config-only model dir, dummy weights, every output of the right length."""
    cfg = _common_config(architectures=["Qwen3MoeForCausalLM"], **MOE_CONFIG)
    cfg.update(decoder_sparse_step=1, mlp_only_layers=[], torch_dtype="bfloat16")
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(ROOT / "benchmark/offline/bench.py"), "--config-json", str(path),
           "--dummy-weight", "--device", "cpu", "--num-reqs", "3", "--min-in", "4", "--max-in",
           "12", "--min-out", "3", "--max-out", "6", "--max-token-id", "300", "--repeats", "1",
           "--json"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["runs"][0]["output_tokens"] == res["total_output_tokens"] > 0
