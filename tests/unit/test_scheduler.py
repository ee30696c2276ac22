"""Scheduler acceptance tests (issue 3, points 2-6) on CPU, on `small_llama_dir`
(stories260K's shape with random weights, built by conftest).

Every scheduler here runs with `debug_checks=True`: after each step `ReqMemory.check` asserts
that every KV page is free, in the prefix cache or owned by exactly one live request, and that
no table row leaks. Both scheduling loops are exercised by setting `scheduler.overlap` on the
instance (the env var MINISGL_DISABLE_OVERLAP_SCHEDULING is only read at construction).

The measured numbers (cached tokens, retractions, steps) are printed: `pytest -s` shows them,
and docs/features.md records them.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from minisgl import LLM
from minisgl.core import SamplingParams
from minisgl.messages import TokenOut

CONTEXT = 512  # small_llama_dir (stories260K's shape): max_position_embeddings
GREEDY = dict(temperature=0.0, ignore_eos=True)


# --------------------------------------------------------------------------- helpers


def make_llm(model_dir: str, overlap: bool = True, **options: object) -> LLM:
    llm = LLM(model_dir, device="cpu", **options)
    llm.scheduler.debug_checks = True
    llm.scheduler.overlap = overlap
    return llm


def record(llm: LLM) -> list[TokenOut]:
    """Wrap the scheduler's output callback; returns the list that collects every TokenOut."""
    msgs: list[TokenOut] = []
    inner = llm.scheduler.on_output

    def hook(msg: TokenOut) -> None:
        msgs.append(msg)
        inner(msg)

    llm.scheduler.on_output = hook
    return msgs


def rows(msgs: list[TokenOut]) -> list[tuple[int, int, str | None, int, int]]:
    """(uid, token, finished, cached, prompt_len) of every row of every message."""
    return [
        row
        for m in msgs
        for row in zip(m.uids, m.tokens, m.finished, m.cached, m.prompt_lens, strict=True)
    ]


def count_steps(llm: LLM) -> dict[str, int]:
    """Count scheduler steps and engine forwards (split by kind, with the largest prefill)."""
    sched, engine = llm.scheduler, llm.engine
    n = dict(steps=0, prefill=0, decode=0, max_prefill_tokens=0, max_batch=0)
    step, forward = sched.step, engine.forward

    def counted_step() -> None:
        n["steps"] += 1
        step()
        n["max_batch"] = max(n["max_batch"], len(sched.running))

    def counted_forward(batch, *a, **kw):  # type: ignore[no-untyped-def]
        if batch.is_prefill:
            n["prefill"] += 1
            n["max_prefill_tokens"] = max(n["max_prefill_tokens"], batch.num_tokens)
        else:
            n["decode"] += 1
        return forward(batch, *a, **kw)

    sched.step = counted_step  # type: ignore[method-assign]
    engine.forward = counted_forward  # type: ignore[method-assign]
    return n


def assert_idle(llm: LLM) -> None:
    """No request left; every page is free or held (unlocked) by the prefix cache."""
    sched = llm.scheduler
    mem = sched.mem
    st = sched.stats()
    assert not sched.busy and not sched.reqs and sched.chunked is None, st
    assert st["running_reqs"] == 0 and st["waiting_reqs"] == 0, st
    assert mem.cache.protected_tokens == 0, "a finished request still locks the prefix cache"
    assert st["pages_free"] + st["pages_cached"] == st["pages_total"], st
    assert mem.cache.evictable_tokens == st["pages_cached"] * mem.ps
    assert len(mem.free_rows) == llm.engine.max_reqs
    mem.check([])
    # stronger than the counts: the free list and the cached pages partition the pool exactly
    free = list(mem.pages._free)
    cached = [
        int(s) // mem.ps
        for node in getattr(mem.cache, "_nodes", list)()
        for s in node.value[:: mem.ps]
    ]
    assert len(set(free)) == len(free), "a page is on the free list twice"
    assert not set(free) & set(cached), "a cached page is also free"
    assert sorted(free + cached) == list(range(mem.pages.num_pages))


def random_prompts(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def token_ids(results: list[dict[str, object]]) -> list[list[int]]:
    return [list(r["token_ids"]) for r in results]  # type: ignore[call-overload]


def assert_same_greedy(llm: LLM, prompts: list, out: list, ref: list, tol: float = 1e-4) -> None:
    """out == ref, except where a request's two outputs part at a float32 near-tie: a different
    batch composition sums in another order (the CPU's BLAS picks kernels by ISA), so the two
    best logits may swap. Both tokens must then be within `tol` of the best logit there."""
    assert len(out) == len(ref)
    for p, a, b in zip(prompts, out, ref):
        if a == b:
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert k < min(len(a), len(b)), (a, b)  # same tokens, different lengths: a real bug
        row = llm.prefill_logits(list(p) + b[:k])[-1].double()
        best = row.max().item()
        assert row[a[k]].item() >= best - tol and row[b[k]].item() >= best - tol, (k, a, b)


# --------------------------------------------------------------------------- 2. prefix cache


@pytest.mark.parametrize("page_size", [1, 4])
def test_shared_prefix_hits_cache_and_matches_naive(small_llama_dir: str, page_size: int) -> None:
    """Of two prompts sharing a 200-token prefix, run a, b, b: with the radix cache b first hits all
    200 prefix tokens and then its whole prompt but the last token (a partial page copied), while the naive
    cache never hits; every row of a request reports the same cached count, the counter sums them,
    and both caches give the same greedy tokens."""
    rng = random.Random(2)
    prefix = [rng.randrange(3, 500) for _ in range(200)]
    a = prefix + [7, *(rng.randrange(3, 500) for _ in range(19))]
    b = prefix + [8, *(rng.randrange(3, 500) for _ in range(29))]
    params = SamplingParams(max_tokens=16, **GREEDY)

    outs, hits = {}, {}
    for cache in ("radix", "naive"):
        llm = make_llm(small_llama_dir, cache=cache, page_size=page_size)
        msgs = record(llm)
        res = []
        for prompt in (a, b, b):  # a alone, then b (shares the prefix), then b again (all of it)
            msgs.clear()
            res.append(token_ids(llm.generate([prompt], params, use_tqdm=False))[0])
            cached = {c for _, _, _, c, _ in rows(msgs)}
            assert len(cached) == 1  # every row of a request reports the same figure
            hits.setdefault(cache, []).append(cached.pop())
        outs[cache] = res
        assert llm.scheduler.counters["prefix_hit_tokens"] == sum(hits[cache])
        assert_idle(llm)

    print(
        f"\n[prefix cache] page_size={page_size}: cached tokens radix={hits['radix']} naive={hits['naive']}"
    )
    assert hits["naive"] == [0, 0, 0]
    assert hits["radix"][0] == 0
    assert hits["radix"][1] >= 192
    assert hits["radix"][1] == 200  # 200 is a multiple of both page sizes
    # the whole prompt is cached except its last token, which must be recomputed for logits
    # (its last, partial page copied from the cached page that starts with it)
    assert hits["radix"][2] == len(b) - 1
    assert outs["radix"] == outs["naive"]
    assert outs["radix"][1] == outs["radix"][2]


# --------------------------------------------------------------------------- 3. chunked prefill


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
def test_chunked_prefill_matches_unlimited(small_llama_dir: str, overlap: bool) -> None:
    """With a 16-token prefill budget, prompts of up to 400 tokens (some sharing prefixes) are
    prefilled in many chunks of at most 16 tokens and give the same greedy tokens, each request its
    full max_tokens, as with an unlimited budget."""
    rng = random.Random(3)
    lens = [100, 400, 150, 250, 333, 120, 380, 210]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lens]
    # two prompts share a prefix with a third so chunks also meet the radix cache
    prompts[5][:100] = prompts[1][:100]
    prompts[6][:300] = prompts[1][:300]
    params = [SamplingParams(max_tokens=min(24, CONTEXT - n), **GREEDY) for n in lens]
    assert all(len(p) + q.max_tokens <= CONTEXT for p, q in zip(prompts, params))

    outs, steps = {}, {}
    for budget in (16, 8192):
        llm = make_llm(small_llama_dir, overlap=overlap, max_prefill_length=budget)
        steps[budget] = count_steps(llm)
        outs[budget] = token_ids(llm.generate(prompts, params, use_tqdm=False))
        assert_idle(llm)
    print(
        f"\n[chunked prefill] overlap={overlap}: budget 16 -> {steps[16]}; unlimited -> {steps[8192]}"
    )
    assert steps[16]["max_prefill_tokens"] <= 16
    assert steps[16]["prefill"] >= sum(lens) // 16 // 2  # really split into many chunks
    assert [len(o) for o in outs[16]] == [p.max_tokens for p in params]
    assert outs[16] == outs[8192]


def test_chunked_prefill_keeps_decoding(small_llama_dir: str) -> None:
    """While a long prompt is prefilled chunk by chunk, already running requests decode."""
    llm = make_llm(small_llama_dir, max_prefill_length=16)
    rng = random.Random(33)
    short = [rng.randrange(3, 500) for _ in range(10)]
    long = [rng.randrange(3, 500) for _ in range(300)]
    kinds: list[tuple[bool, list[int]]] = []
    forward = llm.engine.forward

    def spy(batch, *a, **kw):  # type: ignore[no-untyped-def]
        kinds.append((batch.is_prefill, [r.uid for r in batch.reqs]))
        return forward(batch, *a, **kw)

    llm.engine.forward = spy  # type: ignore[method-assign]
    out = llm.generate([short, long], [SamplingParams(max_tokens=40, **GREEDY)] * 2, use_tqdm=False)
    long_uid = max(u for _, us in kinds for u in us)
    chunks = [i for i, (pf, us) in enumerate(kinds) if pf and long_uid in us]
    decodes_between = [
        i for i, (pf, _) in enumerate(kinds) if not pf and chunks[0] < i < chunks[-1]
    ]
    print(
        f"\n[chunked prefill] 300-token prompt: {len(chunks)} chunks, {len(decodes_between)} decode steps in between"
    )
    assert len(chunks) >= 300 // 16
    assert len(decodes_between) >= len(chunks) - 1
    assert [len(o["token_ids"]) for o in out] == [40, 40]
    assert_idle(llm)


# --------------------------------------------------------------------------- 4. overlap


def _mixed_workload(sampled: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(4)
    prompts = random_prompts(40, 32, 1, 150)
    params = []
    for i in range(32):
        max_tokens = rng.choice([1, 2, 5, 17, 32])
        if sampled and i % 3 == 0:
            params.append(
                SamplingParams(
                    temperature=rng.choice([0.7, 1.0, 1.3]),
                    top_k=rng.choice([-1, 20]),
                    top_p=rng.choice([1.0, 0.9]),
                    seed=1000 + i,
                    max_tokens=max_tokens,
                )
            )
        else:  # greedy; every fourth request may stop at EOS
            params.append(
                SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=i % 4 != 0)
            )
    return prompts, params


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "mixed-seeded"])
def test_overlap_matches_sequential(small_llama_dir: str, sampled: bool) -> None:
    """On 32 requests of mixed lengths (greedy, some free to stop at EOS, or also seeded sampling)
    the overlap loop gives the same tokens as the sequential one, each output 1 to max_tokens long;
    a second overlapped run of the sampled workload repeats them."""
    prompts, params = _mixed_workload(sampled)
    outs, steps = {}, {}
    for overlap in (True, False):
        llm = make_llm(small_llama_dir, overlap=overlap, max_prefill_length=256)
        steps[overlap] = count_steps(llm)
        outs[overlap] = token_ids(llm.generate(prompts, params, use_tqdm=False))
        assert_idle(llm)
    print(f"\n[overlap] sampled={sampled}: overlap {steps[True]}; sequential {steps[False]}")
    assert outs[True] == outs[False]
    for out, p in zip(outs[True], params):
        assert 1 <= len(out) <= p.max_tokens
    # seeded sampling is reproducible: a second overlapped run gives the same tokens
    if sampled:
        llm = make_llm(small_llama_dir, overlap=True, max_prefill_length=256)
        assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == outs[True]


def test_overlap_env_var(small_llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MINISGL_DISABLE_OVERLAP_SCHEDULING=1 turns overlap scheduling off in a new engine; with the
    variable unset it is on."""
    monkeypatch.setenv("MINISGL_DISABLE_OVERLAP_SCHEDULING", "1")
    assert LLM(small_llama_dir, device="cpu").scheduler.overlap is False
    monkeypatch.delenv("MINISGL_DISABLE_OVERLAP_SCHEDULING")
    assert LLM(small_llama_dir, device="cpu").scheduler.overlap is True


# --------------------------------------------------------------------------- 5. KV pressure


@pytest.fixture(scope="module")
def pressure_workload(small_llama_dir: str) -> tuple[list[list[int]], list[SamplingParams], list]:
    """40 requests of ~60 prompt tokens + ~30 new ones, and their unconstrained outputs."""
    prompts = random_prompts(5, 40, 50, 70)
    rng = random.Random(55)
    params = [SamplingParams(max_tokens=rng.randint(25, 35), **GREEDY) for _ in prompts]
    ref = token_ids(
        make_llm(small_llama_dir, cache="naive").generate(prompts, params, use_tqdm=False)
    )
    return prompts, params, ref


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
def test_kv_pressure_retracts_and_recovers(
    small_llama_dir: str, pressure_workload: tuple, page_size: int, overlap: bool
) -> None:
    """40 requests in a pool that holds about three: some are retracted, the batch never exceeds 6,
    and the outputs equal the unconstrained run (up to float32 near-ties); afterwards no page is
    lost and a request filling the whole pool still fits, the cache giving its pages back."""
    prompts, params, ref = pressure_workload
    num_pages = 300 // page_size  # about three requests of ~60 + ~30 tokens
    llm = make_llm(small_llama_dir, overlap=overlap, page_size=page_size, num_pages=num_pages)
    steps = count_steps(llm)
    out = token_ids(llm.generate(prompts, params, use_tqdm=False))
    st = llm.scheduler.stats()
    print(
        f"\n[kv pressure] page_size={page_size} overlap={overlap} num_pages={num_pages}: "
        f"retracted={st['retracted']} steps={steps['steps']} max_batch={steps['max_batch']} "
        f"prefill_tokens={st['prefill_tokens']} decode_tokens={st['decode_tokens']} "
        f"prefix_hit_tokens={st['prefix_hit_tokens']}"
    )
    assert_same_greedy(llm, prompts, out, ref)
    assert st["retracted"] > 0
    assert steps["max_batch"] <= 6
    assert_idle(llm)
    # the evictable cache gives its pages back on demand: a full-pool request still fits
    big = [SamplingParams(max_tokens=8, **GREEDY)]
    n = num_pages * page_size - 8
    assert len(llm.generate([[5] * n], big, use_tqdm=False)[0]["token_ids"]) == 8
    assert_idle(llm)


@pytest.mark.parametrize("page_size", [1, 4])
def test_admission_counts_pages_of_the_whole_prefill_batch(
    small_llama_dir: str, page_size: int
) -> None:
    """Two prompts that each fit the pool but not together, submitted at once: the second
    must wait for the first (each admission alone sees enough free pages, but the batch
    allocates both only after admitting them)."""
    llm = make_llm(small_llama_dir, page_size=page_size, num_pages=100 // page_size)
    params = SamplingParams(max_tokens=4, **GREEDY)
    prompts = [[5] * 60, [6] * 60]
    out = token_ids(llm.generate(prompts, params, use_tqdm=False))
    ref = token_ids(make_llm(small_llama_dir).generate(prompts, params, use_tqdm=False))
    assert out == ref
    assert_idle(llm)


@pytest.mark.parametrize("page_size", [1, 4])
def test_cached_tokens_stay_within_the_prompt_after_retraction(
    small_llama_dir: str, pressure_workload: tuple, page_size: int
) -> None:
    """Under KV pressure with retractions, no output row reports more cached tokens than its prompt
    length, and the outputs equal the unconstrained run (up to float32 near-ties)."""
    prompts, params, ref = pressure_workload
    llm = make_llm(small_llama_dir, overlap=False, page_size=page_size, num_pages=300 // page_size)
    msgs = record(llm)
    assert_same_greedy(llm, prompts, token_ids(llm.generate(prompts, params, use_tqdm=False)), ref)
    assert llm.scheduler.counters["retracted"] > 0
    bad = sorted({(u, c, n) for u, _, _, c, n in rows(msgs) if c > n})
    assert not bad, f"(uid, cached, prompt_len) with cached > prompt_len: {bad[:5]}"


def test_prefill_chunks_are_inserted_into_the_cache(small_llama_dir: str) -> None:
    """B shares 256 tokens with A and arrives while A is still being prefilled in chunks of 64:
    A's finished chunks are already in the radix tree, so B hits them."""
    llm = make_llm(small_llama_dir, max_prefill_length=64)
    sched = llm.scheduler
    cached: dict[int, int] = {}
    sched.on_output = lambda m: [cached.setdefault(u, c) for u, c in zip(m.uids, m.cached)]
    rng = random.Random(8)
    a = [rng.randrange(3, 500) for _ in range(300)]
    b = a[:256] + [rng.randrange(3, 500) for _ in range(20)]
    params = SamplingParams(max_tokens=8, **GREEDY)
    assert sched.add(0, a, params) is None
    sched.step()
    sched.step()
    assert sched.add(1, b, params) is None
    while sched.busy:
        sched.step()
    print(f"\n[chunk insert] cached tokens {cached}")
    assert cached[1] >= 192
    assert_idle(llm)


def test_max_running_requests_caps_the_batch(
    small_llama_dir: str, pressure_workload: tuple
) -> None:
    """With max_running_requests=4 the running batch reaches 4 requests and never more, and the
    outputs equal the uncapped run's."""
    prompts, params, ref = pressure_workload
    llm = make_llm(small_llama_dir, max_running_requests=4)
    steps = count_steps(llm)
    out = token_ids(llm.generate(prompts, params, use_tqdm=False))
    print(f"\n[max running] cap 4: {steps}")
    assert steps["max_batch"] == 4
    assert out == ref
    assert_idle(llm)


# --------------------------------------------------------------------------- 6. abort


ABORTED = list(range(0, 20, 2))


@pytest.fixture(scope="module")
def abort_workload(small_llama_dir: str) -> tuple[list[list[int]], list[SamplingParams], dict]:
    """20 requests, and what each of the 10 survivors gives when it runs alone."""
    prompts = random_prompts(6, 20, 20, 90)
    params = [SamplingParams(max_tokens=30, **GREEDY) for _ in prompts]
    llm = make_llm(small_llama_dir)
    alone = {
        u: token_ids(llm.generate([prompts[u]], params[u], use_tqdm=False))[0]
        for u in range(20)
        if u not in ABORTED
    }
    return prompts, params, alone


@pytest.mark.parametrize("overlap,budget", [(True, 8192), (False, 8192), (True, 48), (False, 48)])
def test_abort_half_of_running(
    small_llama_dir: str, abort_workload: tuple, overlap: bool, budget: int
) -> None:
    """Aborting 10 of 20 requests mid-flight (both loops, with and without chunked prefill): abort
    returns True once, then False, and False for an unknown uid; an aborted request gets no token
    after its abort and no finish, no page is lost, and the 10 others finish by length with the
    tokens each gives alone."""
    prompts, params, alone = abort_workload
    llm = make_llm(small_llama_dir, overlap=overlap, max_prefill_length=budget)
    sched = llm.scheduler
    got: dict[int, list[int]] = {uid: [] for uid in range(20)}
    finished: dict[int, str] = {}

    def on_output(msg: TokenOut) -> None:
        for uid, tok, fin in zip(msg.uids, msg.tokens, msg.finished):
            assert uid not in finished, f"token for request {uid} after it finished"
            got[uid].append(tok)
            if fin is not None:
                finished[uid] = fin

    sched.on_output = on_output
    for uid, (p, sp) in enumerate(zip(prompts, params)):
        assert sched.add(uid, p, sp) is None
    warm = 0
    while sum(len(v) > 0 for v in got.values()) < 10 or warm < 4:
        sched.step()
        warm += 1
    states = dict(
        running=len(sched.running), waiting=len(sched.waiting), chunked=sched.chunked is not None
    )
    aborted = ABORTED
    at_abort = {uid: len(got[uid]) for uid in aborted}
    for uid in aborted:
        assert sched.abort(uid) is True
        assert sched.abort(uid) is False  # a second abort is a no-op
    assert sched.abort(12345) is False
    sched.mem.check(list(sched.reqs.values()))
    n = 0
    while sched.busy:
        sched.step()
        n += 1
        assert n < 10_000
    print(
        f"\n[abort] overlap={overlap} budget={budget}: aborted after {warm} steps with {states}, "
        f"tokens at abort {at_abort}; {n} steps to drain"
    )
    for uid in aborted:
        assert len(got[uid]) == at_abort[uid], "an aborted request produced more tokens"
        assert uid not in finished
    assert_idle(llm)
    survivors = [u for u in range(20) if u not in aborted]
    assert all(finished[u] == "length" for u in survivors)
    assert {u: got[u] for u in survivors} == alone


# --------------------------------------------------------------------------- rejection


def test_requests_that_never_fit_are_rejected(small_llama_dir: str) -> None:
    """scheduler.add returns an error for a request past the 512-token context, one larger than the
    128-token KV cache, an empty prompt, an id outside the vocabulary and a duplicate uid, and
    admits one that exactly fits; LLM.generate raises a ValueError for a batch holding a request
    that cannot fit, withdraws its valid requests, and serves the next batch."""
    llm = make_llm(small_llama_dir, num_pages=64, page_size=2)  # 128 KV tokens
    sched = llm.scheduler
    too_long = sched.add(0, [5] * 500, SamplingParams(max_tokens=20))
    assert too_long is not None and "maximum context length is 512" in too_long, too_long
    too_big = sched.add(1, [5] * 100, SamplingParams(max_tokens=29))
    assert too_big is not None and "KV cache (128)" in too_big, too_big
    assert sched.add(2, [], SamplingParams()) is not None
    assert sched.add(3, [600], SamplingParams()) is not None  # outside the vocabulary
    assert sched.add(4, [5] * 100, SamplingParams(max_tokens=28)) is None  # exactly fits
    assert "duplicate" in (sched.add(4, [5], SamplingParams()) or "")
    assert not any(u in sched.reqs for u in (0, 1, 2, 3))
    assert sched.abort(4)
    assert_idle(llm)
    ok = SamplingParams(max_tokens=4, **GREEDY)
    with pytest.raises(ValueError, match="context length"):
        llm.generate([[5] * 10, [5] * 510], [ok, SamplingParams(max_tokens=3)], use_tqdm=False)
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate([[5] * 10, [5] * 200], ok, use_tqdm=False)
    assert_idle(llm)  # the valid requests of a rejected batch were withdrawn
    assert len(llm.generate([[5] * 10], ok, use_tqdm=False)[0]["token_ids"]) == 4


# --------------------------------------------------------------------------- stop conditions


def _stop_case(llm: LLM) -> tuple[list[int], list[int]]:
    """A prompt whose 20-token greedy output has a 5th token not seen among the first 4."""
    for seed in range(100):
        prompt = random_prompts(seed, 1, 10, 30)[0]
        out = token_ids(
            llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
        )[0]
        if out[4] not in out[:4]:
            return prompt, out
    raise AssertionError("no suitable prompt")


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
def test_stop_token_ids_and_length(small_llama_dir: str, overlap: bool) -> None:
    """A stop token id ends the output right after that token (included), with finish 'stop' on its
    row and None on the rows before; max_tokens=7 gives the first 7 greedy tokens, the last row
    marked 'length'; under both loops."""
    llm = make_llm(small_llama_dir, overlap=overlap)
    prompt, full = _stop_case(llm)
    msgs = record(llm)
    stop = SamplingParams(max_tokens=20, stop_token_ids=[full[4]], **GREEDY)
    out = token_ids(llm.generate([prompt], stop, use_tqdm=False))[0]
    assert out == full[:5]  # the stop token is included
    assert [f for _, _, f, _, _ in rows(msgs)] == [None] * 4 + ["stop"]
    msgs.clear()
    out = token_ids(llm.generate([prompt], SamplingParams(max_tokens=7, **GREEDY), use_tqdm=False))[
        0
    ]
    assert out == full[:7]
    assert [f for _, _, f, _, _ in rows(msgs)][-1] == "length"
    assert_idle(llm)


def test_stop_reason_is_pure() -> None:
    """EOS (unless ignore_eos), stop ids (always), then max_tokens and the context length."""
    from minisgl.core import FinishReason, Req, stop_reason

    def why(outputs: list[int], max_seq_len: int = 100, **kw: object) -> FinishReason | None:
        req = Req(0, [1, 2, 3], SamplingParams(max_tokens=4, **kw))  # type: ignore[arg-type]
        req.token_ids += outputs
        before = (list(req.token_ids), req.device_len, req.cached_len, req.finished)
        reason = stop_reason(req, {9}, max_seq_len)
        assert (req.token_ids, req.device_len, req.cached_len, req.finished) == before
        return reason

    assert why([5]) is None and why([5, 6, 7]) is None
    assert why([9]) is FinishReason.STOP and why([9], ignore_eos=True) is None
    assert why([7], stop_token_ids=[7], ignore_eos=True) is FinishReason.STOP
    assert why([5, 6, 7, 8]) is FinishReason.LENGTH  # max_tokens
    assert why([5], max_seq_len=4) is FinishReason.LENGTH  # the context is full
    assert why([5, 6, 7, 9], ignore_eos=True) is FinishReason.LENGTH
    assert why([5, 6, 7, 9]) is FinishReason.STOP  # a stop beats the length


def test_req_state() -> None:
    """`extend_len`, `can_decode` and `token_in_flight` along a request's life."""
    from minisgl.core import Req

    req = Req(0, [1, 2, 3, 4], SamplingParams(max_tokens=2))
    assert (req.extend_len, req.can_decode, req.token_in_flight) == (4, False, False)
    req.cached_len = 3  # only the newest token lacks KV (mid-chunk: the scheduler knows)
    assert req.extend_len == 1 and req.can_decode
    req.cached_len, req.device_len = 4, 5  # prefill done, its token sampled on the device
    assert req.token_in_flight and req.can_decode
    req.token_ids.append(7)
    req.cached_len, req.device_len = 5, 6  # decoded the last of max_tokens: nothing to sample
    assert req.token_in_flight and not req.can_decode


def test_generation_config_eos(small_llama_dir: str, tmp_path: Path) -> None:
    """EOS ids from generation_config.json stop a request unless ignore_eos is set."""
    base = make_llm(small_llama_dir)
    assert base.scheduler.eos == {2}  # </s>
    prompt, full = _stop_case(base)
    fake = tmp_path / "stories_eos"
    shutil.copytree(small_llama_dir, fake)
    (fake / "generation_config.json").chmod(0o644)
    (fake / "generation_config.json").write_text(f'{{"eos_token_id": [2, {full[4]}]}}')
    llm = make_llm(str(fake))
    assert llm.scheduler.eos == {2, full[4]}
    msgs = record(llm)
    out = token_ids(
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    )[0]
    assert out == full[:5]
    assert rows(msgs)[-1][2] == "stop"
    ignore = SamplingParams(max_tokens=20, **GREEDY)
    assert token_ids(llm.generate([prompt], ignore, use_tqdm=False))[0] == full
    assert_idle(llm)


# --------------------------------------------------------------------------- counters


def test_counters(small_llama_dir: str) -> None:
    """With the naive cache and at most 5 running requests, prefill_tokens is the sum of the prompt
    lengths and decode_tokens the sum of max_tokens - 1, with no prefix hits or retractions; the
    per-step stats reach 5 running requests, keep pages used + free = total and never count more
    than the 12 requests."""
    prompts = random_prompts(7, 12, 5, 60)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in range(1, 13)]
    llm = make_llm(small_llama_dir, cache="naive", max_running_requests=5)
    sched = llm.scheduler
    seen: list[dict[str, float]] = []
    step = sched.step

    def watched() -> None:
        step()
        seen.append(sched.stats())

    sched.step = watched  # type: ignore[method-assign]
    llm.generate(prompts, params, use_tqdm=False)
    st = sched.stats()
    print(f"\n[counters] {st}")
    assert st["prefill_tokens"] == sum(map(len, prompts))
    assert st["decode_tokens"] == sum(p.max_tokens - 1 for p in params)
    assert st["prefix_hit_tokens"] == 0 and st["retracted"] == 0
    assert max(s["running_reqs"] for s in seen) == 5
    assert max(s["pages_used"] for s in seen) > 0
    for s in seen:
        assert s["pages_used"] + s["pages_free"] == s["pages_total"]
        assert s["running_reqs"] + s["waiting_reqs"] <= 12
    assert_idle(llm)


@pytest.mark.parametrize("overlap", [True, False])
def test_chunked_prefill_under_kv_pressure(small_llama_dir: str, overlap: bool) -> None:
    """A long prompt prefilled in 16-token chunks while short requests decode in a tight pool:
    when the chunk cannot get pages it waits (and nobody is admitted past it); every output
    equals the unconstrained run."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (20, 25, 180, 22, 30, 24)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
        for m in (60, 50, 20, 40, 45, 30)
    ]
    ref = token_ids(make_llm(small_llama_dir).generate(prompts, params, use_tqdm=False))
    llm = make_llm(small_llama_dir, overlap=overlap, num_pages=260, max_prefill_length=16)
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == ref
    print(f"\n[chunk+pressure] overlap={overlap}: {llm.scheduler.counters}")
    assert_idle(llm)


def test_generate_pauses_the_garbage_collector(small_llama_dir: str) -> None:
    """No collection pauses inside an offline batch; the caller's GC state comes back."""
    import gc

    llm = make_llm(small_llama_dir)
    seen: list[bool] = []
    step = llm.scheduler.step

    def spy() -> None:
        seen.append(gc.isenabled())
        step()

    llm.scheduler.step = spy
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate(["Once upon a time"], params, use_tqdm=False)
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**9]], params, use_tqdm=False)
    assert gc.isenabled()  # restored on errors too
    gc.disable()
    try:
        llm.generate(["Once upon a time"], params, use_tqdm=False)
        assert not gc.isenabled()
    finally:
        gc.enable()
