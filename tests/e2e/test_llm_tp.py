"""`minisgl.LLM(..., tp=2)` on CPU (gloo): the offline API over the server's worker processes.

Greedy float32 outputs (token-id and text prompts) must equal the in-process tp=1 path; a
request over the context raises ValueError and the LLM keeps working; prefill_logits refuses;
shutdown() leaves no child process (Python's multiprocessing resource tracker aside). One
tp=2 LLM serves every test; the last one shuts it down.
"""

from __future__ import annotations

import glob
import os
from multiprocessing import resource_tracker

import pytest
from conftest import _build

from minisgl import LLM, SamplingParams

TOKEN_PROMPTS = [
    [1, 45, 120, 200, 33, 7],
    [1, 300, 12],
    [1, 5, 99, 250, 251, 17, 64, 380, 42, 11, 150],
    [1, 7],
]
TEXT_PROMPTS = ["the cat sat on the mat", "a happy fox"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for path in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                with open(path) as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.update(kids)
            todo += kids
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _build(
        tmp_path_factory,
        "qwen3_llm_tp",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        seed=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def llm_tp2(model_dir: str):
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers' environment is fixed at spawn
    try:
        llm = LLM(model_dir, device="cpu", dtype="float32", tp=2)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    yield llm
    llm.shutdown()


def test_tp2_matches_tp1(model_dir: str, llm_tp2: LLM) -> None:
    """LLM with tp=2 gives the same greedy outputs (token ids and text) as tp=1 for token-id and
    text prompts, 16 tokens each."""
    prompts = TOKEN_PROMPTS + TEXT_PROMPTS
    ref_llm = LLM(model_dir, device="cpu", dtype="float32", tp=1)
    ref = ref_llm.generate(prompts, GREEDY, use_tqdm=False)
    ref_llm.shutdown()
    got = llm_tp2.generate(prompts, GREEDY)
    assert got == ref
    assert all(len(o["token_ids"]) == 16 for o in got)
    assert got[4]["text"] and got[5]["text"]


def test_tp2_errors(llm_tp2: LLM) -> None:
    """At tp=2 a batch with a request over the context raises a ValueError and prefill_logits raises
    one saying it needs tp=1; the LLM still serves the next batch."""
    with pytest.raises(ValueError, match="maximum context length"):
        llm_tp2.generate([TOKEN_PROMPTS[0], [1] * 10], SamplingParams(max_tokens=100_000))
    with pytest.raises(ValueError, match="needs tp=1"):
        llm_tp2.prefill_logits([1, 2, 3])
    # still serving after the failed batch; late messages of its aborted requests are ignored
    out = llm_tp2.generate([TOKEN_PROMPTS[1]], GREEDY, use_tqdm=False)
    assert len(out[0]["token_ids"]) == 16


def test_shutdown_leaves_no_process(llm_tp2: LLM) -> None:
    """A tp=2 LLM runs 4 worker processes (2 scheduler ranks, detokenizer, tokenizer) under this
    one; shutdown, which can be called twice, leaves no child process but the resource tracker, and
    a later generate raises a RuntimeError saying it was shut down."""
    workers = set(llm_tp2.client.workers.pids().values())
    assert len(workers) == 4  # 2 scheduler ranks, detokenizer, tokenizer
    assert workers <= descendants(os.getpid())
    llm_tp2.shutdown()
    llm_tp2.shutdown()  # idempotent (the fixture calls it once more)
    left = descendants(os.getpid()) - {resource_tracker._resource_tracker._pid}
    assert not left, f"processes left after shutdown: {left}"
    assert all(p.exitcode is not None for p in llm_tp2.client.workers.procs.values())
    with pytest.raises(RuntimeError, match="shut down"):
        llm_tp2.generate([TOKEN_PROMPTS[0]], GREEDY, use_tqdm=False)
