"""Staggered arrivals on the CPU engine (tests/staggered.py): overlap scheduling on and off give
the same greedy tokens, and so does the debug mode that poisons the KV pool with NaN; every
request gets exactly its tokens, no page leaks. The GPU version is tests/gpu/test_gpu_load.py."""

from __future__ import annotations

import pytest
from staggered import make_load, run_load

from minisgl import LLM


def _llm(path: str, monkeypatch: pytest.MonkeyPatch, overlap: bool, poison: bool = False) -> LLM:
    monkeypatch.setenv("MINISGL_DISABLE_OVERLAP_SCHEDULING", "0" if overlap else "1")
    monkeypatch.setenv("MINISGL_DEBUG_POISON", "1" if poison else "0")
    return LLM(path, device="cpu", page_size=16, max_prefill_length=96, max_running_requests=24)


def test_overlap_on_off_and_poison_agree(
    llama_gqa_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staggered load gives the same greedy tokens for every finished request with overlap
    scheduling on and off, and with the KV pool poisoned with NaN, which yields no non-finite
    logits; more than 60 requests finish, each with its max_tokens, and no page leaks."""
    load = make_load(90, 384, seed=1)
    on = run_load(_llm(llama_gqa_dir, monkeypatch, True), load)
    off = run_load(_llm(llama_gqa_dir, monkeypatch, False), load)
    poisoned = _llm(llama_gqa_dir, monkeypatch, True, poison=True)
    assert len(on) > 60 and on == off
    assert run_load(poisoned, load) == on
    assert int(poisoned.engine.nonfinite_logits) == 0


def test_scheduler_fails_only_the_request_with_a_bad_id(
    llama_gqa_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupted id in a step's host copy fails that request with an error, not the batch."""
    from minisgl.core import SamplingParams

    llm = _llm(llama_gqa_dir, monkeypatch, True)
    sched, got = llm.scheduler, []
    sched.on_output = got.append
    for uid in (0, 1):
        sched.add(uid, [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    forward, hits = llm.engine.forward, []

    def corrupt(batch):  # noqa: ANN001, ANN202
        out = forward(batch)
        if not batch.is_prefill and out.tokens is not None and not hits:
            hits.append(batch.reqs[0].uid)
            out.tokens = out.tokens.clone()
            out.tokens[0] = 0x3C31BA89BB7EBC72  # four bf16 values read as one int64
        return out

    llm.engine.forward = corrupt
    while sched.busy:
        sched.step()
    errors = [m for m in got if type(m).__name__ == "ErrorOut"]
    tokens = [t for m in got if type(m).__name__ == "TokenOut" for t in m.tokens]
    assert [(e.uid, e.status) for e in errors] == [(hits[0], 500)]
    assert all(0 <= t < 384 for t in tokens) and len(tokens) == 6 + 1  # the other + the first
    assert not sched.reqs and not sched.running


def test_warmup_leaves_no_trace(llama_gqa_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-ready warm-up (run on GPUs) sends nothing out, frees every page, resets the
    counters, and the engine serves the same greedy tokens afterwards."""
    llm = _llm(llama_gqa_dir, monkeypatch, True)
    load = make_load(30, 384, seed=2)
    before = run_load(llm, load)
    sched, got = llm.scheduler, []
    emit, sched.on_output = sched.on_output, got.append
    assert sched.warmup() > 0
    sched.on_output = emit
    assert got == [] and not sched.busy and not any(sched.counters.values())
    assert sched.mem.pages.num_free == sched.mem.pages.num_pages
    assert run_load(llm, load) == before
