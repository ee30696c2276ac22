"""A scheduler-level load with staggered arrivals, shared by the CPU and GPU tests: requests
join while others decode, some share a long prefix (cache hits), some are longer than the
prefill budget (chunked) and some are aborted mid-flight. Arrivals are counted in scheduler
steps, so two engines given the same load see the same requests in the same order."""

from __future__ import annotations

import random

from minisgl import LLM
from minisgl.core import SamplingParams
from minisgl.messages import ErrorOut, TokenOut


def make_load(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(160)]
    load = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 150))]
        if i % 3 == 0:  # a cache hit once the first of these has been prefilled
            prompt = shared[: rng.randint(40, 160)] + prompt
        load.append(
            dict(
                prompt=prompt,
                max_tokens=rng.randint(1, 48),
                arrival=i // 3,  # steps
                abort_at=i // 3 + rng.randint(0, 6) if rng.random() < 0.1 else None,
            )
        )
    return load


def run_load(llm: LLM, load: list[dict], temperature: float = 0.0) -> dict[int, list[int]]:
    """Tokens of every request that was not aborted; checks the scheduler's invariants after
    every step and that every id is in the vocabulary."""
    sched = llm.scheduler
    vocab = llm.engine.cfg.vocab_size
    outs: dict[int, list[int]] = {i: [] for i in range(len(load))}
    done: set[int] = set()
    aborted: set[int] = set()

    def collect(msg: TokenOut | ErrorOut) -> None:
        assert not isinstance(msg, ErrorOut), msg
        for uid, tok, fin in zip(msg.uids, msg.tokens, msg.finished):
            assert 0 <= tok < vocab, (uid, tok)
            outs[uid].append(tok)
            if fin is not None:
                done.add(uid)

    emit, sched.on_output, sched.debug_checks = sched.on_output, collect, True
    try:
        step = 0
        while len(done | aborted) < len(load):
            for uid, r in enumerate(load):
                if r["arrival"] == step:
                    p = SamplingParams(temperature=temperature, max_tokens=r["max_tokens"],
                                       ignore_eos=True, seed=uid if temperature else None)  # fmt: skip
                    assert sched.add(uid, r["prompt"], p) is None
                if r["abort_at"] == step and sched.abort(uid):
                    aborted.add(uid)
            sched.step()
            step += 1
            assert step < 100_000, "the load does not finish"
        while sched.busy:
            sched.step()
    finally:
        sched.on_output, sched.debug_checks = emit, False
    assert sched.mem.pages.num_free + sched.mem.cache.evictable_tokens // sched.mem.ps == (
        sched.mem.pages.num_pages
    ), "pages leaked"
    for uid in done:
        assert len(outs[uid]) == load[uid]["max_tokens"], uid
    return {uid: outs[uid] for uid in sorted(done - aborted)}
