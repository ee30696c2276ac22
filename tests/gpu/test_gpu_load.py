"""GPU correctness under load (issue 15), marked `gpu`: the tests that would have caught the
decode graphs' token corruption. The standard offline workload must give ids in [0, vocab) and
exact lengths (also with every buffer poisoned at start); staggered arrivals must give the
same greedy tokens with overlap on/off, graphs on/off and on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from staggered import make_load, run_load

from minisgl import LLM, SamplingParams

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
QWEN3_06B = {  # Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B), for dummy weights
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936,
}  # fmt: skip


def _bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmark/offline/bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def qwen3_06b_shape(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("qwen3_06b_shape")
    (d / "config.json").write_text(json.dumps(QWEN3_06B))
    return str(d)


def _standard(llm: LLM, temps: tuple[float, ...]) -> None:
    bench = _bench()
    prompts, out_lens = bench.make_workload(256, 100, 1024, 100, 1024, 0, 10000)
    assert sum(out_lens) == bench.STANDARD_OUTPUT_TOKENS
    for t in temps:
        params = [SamplingParams(temperature=t, max_tokens=n, ignore_eos=True) for n in out_lens]
        outs = llm.generate(prompts, params, use_tqdm=False)
        bench.verify(outs, out_lens, QWEN3_06B["vocab_size"])  # raises WrongOutput


def test_standard_workload_output_is_valid(qwen3_06b_shape: str) -> None:
    """(a) bf16, dummy weights, default options: 133,966 ids, all in range, exact lengths."""
    llm = LLM(qwen3_06b_shape, dummy_weight=True)
    try:
        assert llm.engine.graphs is not None
        _standard(llm, (0.0, 0.6))
    finally:
        llm.shutdown()


def test_standard_workload_poisoned(qwen3_06b_shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """(b) KV pool and graph buffers start as NaN / out-of-range ids: no non-finite logit is
    sampled from and every id stays valid."""
    monkeypatch.setenv("MINISGL_DEBUG_POISON", "1")
    llm = LLM(qwen3_06b_shape, dummy_weight=True)
    try:
        _standard(llm, (0.6,))
        assert int(llm.engine.nonfinite_logits) == 0
    finally:
        llm.shutdown()


def _staggered(path: str, monkeypatch: pytest.MonkeyPatch, overlap: bool, **kw: object) -> dict:
    monkeypatch.setenv("MINISGL_DISABLE_OVERLAP_SCHEDULING", "0" if overlap else "1")
    llm = LLM(path, page_size=16, max_prefill_length=96, max_running_requests=48,
              num_pages=4096, **kw)  # fmt: skip
    try:
        return run_load(llm, make_load(210, llm.engine.cfg.vocab_size, seed=3))
    finally:
        llm.shutdown()


def test_staggered_fp32_overlap_and_cpu_agree(
    stories_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(c) stories260K, float32: overlap on and off on the GPU equal the CPU engine."""
    kw = dict(dtype="float32", attn="torch")
    cpu = _staggered(stories_dir, monkeypatch, True, device="cpu", **kw)
    assert len(cpu) > 150
    assert _staggered(stories_dir, monkeypatch, True, device="cuda", **kw) == cpu
    assert _staggered(stories_dir, monkeypatch, False, device="cuda", **kw) == cpu


def test_staggered_bf16_graphs_on_off_agree(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(c) bf16 FlashInfer: the decode graphs give the eager engine's greedy tokens under the
    same load (same batches: overlap on in both), and in the poison debug mode too."""
    from test_gpu import _hf_init_model

    # 8 KV heads: the buckets past 33 replay an eager decode plan (attention/flashinfer.py)
    path = _hf_init_model(tmp_path_factory, "qwen3_kv8_load", "Qwen3", hidden_size=256,
                          head_dim=128, num_attention_heads=16, num_key_value_heads=8)  # fmt: skip
    kw = dict(device="cuda", dtype="bfloat16", attn="fi")
    eager = _staggered(path, monkeypatch, True, cuda_graph_max_bs=0, **kw)
    assert _staggered(path, monkeypatch, True, cuda_graph_max_bs=48, **kw) == eager
    monkeypatch.setenv("MINISGL_DEBUG_POISON", "1")
    assert _staggered(path, monkeypatch, True, cuda_graph_max_bs=48, **kw) == eager


def test_server_standard_online_workload(qwen3_06b_shape: str, tmp_path: Path) -> None:
    """(d) the server on the GPU: 256 streaming chat requests (the online benchmark), at 16
    req/s and all at once, temperature 0 and 0.6: every request streams exactly its tokens.
    Kernels are compiled before /health answers: the first request's TTFT is under 1 s."""
    import shutil
    import subprocess
    import sys
    import time

    import httpx
    from procs import free_port

    d = tmp_path / "model"
    shutil.copytree(qwen3_06b_shape, d)
    spec = importlib.util.spec_from_file_location(
        "dt", ROOT / "benchmark/online/dummy_tokenizer.py"
    )
    dt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dt)
    dt.write(str(d))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "minisgl", "--model", str(d), "--dummy-weight",
                             "--port", str(port), "--served-model-name", "m"])  # fmt: skip
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the server exited"
            time.sleep(1)
        t0 = time.perf_counter()
        body = {"model": "m", "messages": [{"role": "user", "content": "t1 t2 t3"}],
                "max_tokens": 1}  # fmt: skip
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        first = time.perf_counter() - t0
        print(f"first request after /health: {first * 1000:.0f} ms")
        assert first < 1.0
        spec = importlib.util.spec_from_file_location("bc", ROOT / "benchmark/online/bench_chat.py")
        bc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bc)
        for rate in ("16", "inf"):
            for temp in ("0", "0.6"):
                bc.main(
                    [
                        "--base-url",
                        url + "/v1",
                        "--model",
                        "m",
                        "--rate",
                        rate,
                        "--temperature",
                        temp,
                    ]
                )  # fmt: skip  (exits 3 on a wrong output)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(60)
