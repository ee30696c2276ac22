"""Logits processing on the GPU (marked `gpu`): penalties, min_p, logit_bias, min_tokens and
grammars through the CUDA engine. float32 on the GPU must give the CPU engine's tokens and the
reference formula's argmax at every step; in bfloat16 with FlashInfer and CUDA graphs, rows
without processing keep the graph's own sampling (the same tokens as a batch of plain rows),
processed rows follow the reference on the engine's own logits, and a grammar holds."""

from __future__ import annotations

import json

import pytest
import torch
from test_gpu import qwen3_hd128_dir  # noqa: F401 (a fixture)
from test_logits import reference

from minisgl import LLM, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

KWS = [dict(repetition_penalty=1.6, frequency_penalty=0.8, presence_penalty=0.5),
       dict(frequency_penalty=1.2, min_p=0.3), dict(logit_bias={7: 3.0}, presence_penalty=1.0),
       dict(min_tokens=5, stop_token_ids=[0], logit_bias={0: 50.0})]  # fmt: skip


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw)


def _check_reference(llm: LLM, prompt: list[int], outs: list[dict]) -> None:
    for kw, out in zip(KWS, outs):
        ids, p = out["token_ids"], _params(**kw)
        logits = llm.prefill_logits(prompt + ids)[len(prompt) - 1 :].float()
        for k, tok in enumerate(ids):
            ref = reference(logits[k].tolist(), prompt, ids[:k], p, 0.0, [])
            best = max(ref)
            # bf16 logits: a near-tie may go either way between decode and this prefill
            assert ref[tok] >= best - 0.05 * max(1.0, abs(best)), (kw, k, tok)


def test_fp32_gpu_equals_cpu_and_reference(qwen3_tied_dir: str) -> None:
    """float32 on the GPU gives the CPU engine's greedy tokens for a batch of rows with penalties,
    min_p, logit_bias and min_tokens and a plain row, and every processed token is the argmax
    (within a small tolerance) of the reference-processed logits."""
    cpu = LLM(qwen3_tied_dir, device="cpu", dtype="float32", num_pages=1024)
    prompt = cpu.tokenizer.encode("The cat saw a red ball.")
    params = [_params(**kw) for kw in KWS] + [_params()]
    want = [o["token_ids"] for o in cpu.generate([prompt] * 5, params, use_tqdm=False)]
    cpu.shutdown()
    gpu = LLM(qwen3_tied_dir, device="cuda", dtype="float32", num_pages=1024)
    try:
        outs = gpu.generate([prompt] * 5, params, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == want
        _check_reference(gpu, prompt, outs)
    finally:
        gpu.shutdown()


def test_bf16_graphs_keep_plain_rows_and_follow_reference(qwen3_hd128_dir: str) -> None:  # noqa: F811
    """In bf16 with CUDA graphs, plain rows batched beside processed rows keep the tokens of a batch
    of plain rows only; the penalised rows' tokens differ from the plain row's and follow the
    reference on the engine's own logits (up to bf16 near-ties), and min_tokens holds the stop token
    it is biased to back until the sixth token."""
    llm = LLM(qwen3_hd128_dir, device="cuda", dtype="bfloat16", num_pages=2048)
    assert llm.engine.graphs is not None
    try:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 380, (n,), generator=g).tolist() for n in (9, 17, 30, 5)]
        plain = [o["token_ids"] for o in llm.generate(prompts, _params(), use_tqdm=False)]
        # the same plain rows beside processed rows: the batch leaves the graph's sampler, the
        # plain rows' greedy tokens must not change
        mixed = llm.generate(prompts + [prompts[0]] * len(KWS),
                             [_params()] * 4 + [_params(**kw) for kw in KWS], use_tqdm=False)  # fmt: skip
        assert [o["token_ids"] for o in mixed[:4]] == plain
        processed = mixed[4:]
        assert all(o["token_ids"] != plain[0] for o in processed[:3])
        ids = processed[3]["token_ids"]  # min_tokens holds back the stop token it is biased to
        assert len(ids) == 6 and ids[-1] == 0 and 0 not in ids[:5]
        _check_reference(llm, prompts[0], processed)
    finally:
        llm.shutdown()


def test_bf16_grammar_on_gpu(qwen3_chat_dir: str) -> None:
    """A JSON schema and a regex, sampled at temperature 1 in one batch with plain rows."""
    llm = LLM(qwen3_chat_dir, device="cuda", dtype="bfloat16", num_pages=2048)
    try:
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                  "additionalProperties": False}  # fmt: skip
        eos = llm.engine.cfg.eos_token_ids[0]
        prompt = llm.tokenizer.encode("Give me JSON")
        js = SamplingParams(
            temperature=1.0, seed=3, max_tokens=48, grammar=["json", json.dumps(schema)]
        )
        rx = SamplingParams(temperature=1.0, seed=4, max_tokens=12, grammar=["regex", "(yes|no)!"])
        free = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
        outs = llm.generate([prompt] * 6, [js, js, rx, rx, free, free], use_tqdm=False)
        for o in outs[:2]:
            ids = [t for t in o["token_ids"] if t != eos]
            assert isinstance(json.loads(llm.tokenizer.decode(ids))["n"], int), o
        for o in outs[2:4]:
            ids = [t for t in o["token_ids"] if t != eos]
            assert llm.tokenizer.decode(ids) in ("yes!", "no!"), o
        assert all(len(o["token_ids"]) == 12 for o in outs[4:])
    finally:
        llm.shutdown()
