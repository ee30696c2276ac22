"""Logits processing (engine/logits.py): each op against its reference formula (vLLM's
semantics) on CPU, then end to end through LLM.generate, where greedy outputs with penalties
must equal the argmax of the reference-processed logits of the engine's own prefill."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from minisgl import SamplingParams
from minisgl.core import Req
from minisgl.engine.logits import LogitsProcessor

V = 50
EOS = 3


def _req(uid: int, prompt: list[int], **kw) -> Req:
    return Req(uid, list(prompt), SamplingParams(max_tokens=32, **kw))


def reference(logits: list[float], prompt: list[int], outs: list[int], p: SamplingParams,
              temp: float, stop_ids: list[int]) -> list[float]:  # fmt: skip
    """vLLM's formulas, float64, one row."""
    x = [float(v) for v in logits]
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(outs) < p.min_tokens:
        for t in p.stop_token_ids + ([] if p.ignore_eos else stop_ids):
            x[t] = -math.inf
    for t in range(len(x)):
        if t in prompt or t in outs:
            r = p.repetition_penalty
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
        c = outs.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    if p.min_p > 0:
        t = temp or 1.0
        m = max(x)
        z = sum(math.exp((v - m) / t) for v in x)
        probs = [math.exp((v - m) / t) / z for v in x]
        x = [v if q >= p.min_p * max(probs) else -math.inf for v, q in zip(x, probs)]
    return x


CASES = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(frequency_penalty=-0.5, presence_penalty=-1.0),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(min_p=0.2),
    dict(min_p=0.05, temperature=0.5),
    dict(logit_bias={5: 100.0, 7: -100.0, 9: 2.5}),
    dict(min_tokens=3, stop_token_ids=[11]),
    dict(min_tokens=3, ignore_eos=True, stop_token_ids=[12]),
    dict(
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.3,
        min_p=0.1,
        logit_bias={2: 1.0},
        min_tokens=2,
    ),  # fmt: skip
]


def test_each_op_matches_reference_formula() -> None:
    """Four steps of a batch holding every case plus a row with none of them: after each
    step's sampling the processor must have counted the right tokens (device-side counts)."""
    g = torch.Generator().manual_seed(0)
    proc = LogitsProcessor("cpu", [EOS])
    reqs = [_req(i, [1, 2, 5, 5, 8], **kw) for i, kw in enumerate(CASES)]
    reqs.append(_req(99, [4, 6]))  # no processing: untouched
    outs: list[list[int]] = [[] for _ in reqs]
    for _step in range(4):
        logits = torch.randn(len(reqs), V, generator=g) * 3
        temps = [r.params.temperature for r in reqs]
        got = proc.apply(logits, reqs, temps)
        assert not torch.equal(got, logits) and got.data_ptr() != logits.data_ptr()
        for i, r in enumerate(reqs):
            ref = torch.tensor(
                reference(logits[i].tolist(), r.token_ids, outs[i], r.params, temps[i], [EOS])
            )
            finite = torch.isfinite(ref)
            assert torch.equal(torch.isfinite(got[i]), finite), (CASES[i : i + 1], _step)
            assert torch.allclose(got[i][finite], ref[finite].float(), atol=1e-5), CASES[i : i + 1]
        # sample something that repeats earlier outputs (counts > 1) and prompt tokens
        tokens = torch.tensor([[5, 8, 13, 13][_step]] * len(reqs))
        proc.update(tokens)
        for o, t in zip(outs, tokens.tolist()):
            o.append(t)


def test_slots_come_back() -> None:
    """A request's slot in the processor is freed when the request is garbage-collected: after each
    of three rounds of ten penalised requests no state is left, and the count table has grown once
    (8 to 16 rows) and is reused, all 16 rows free."""
    proc = LogitsProcessor("cpu", [EOS])
    for _ in range(3):
        reqs = [_req(i, [1, 2], presence_penalty=1.0) for i in range(10)]
        proc.apply(torch.zeros(10, V), reqs, [1.0] * 10)
        proc.update(torch.zeros(10, dtype=torch.int64))
        del reqs
        gc.collect()
        assert len(proc.states) == 0
    assert proc.counts.shape[0] == 16 and len(proc.free) == 16  # grown once (8 -> 16), reused


def test_bad_params_rejected() -> None:
    """SamplingParams raises a ValueError for out-of-range penalties (presence 3, NaN frequency,
    repetition 0), min_p above 1, min_tokens negative or above max_tokens, a logit bias over 100 or
    on a negative token id, and a grammar of an unknown kind."""
    for kw in [dict(presence_penalty=3.0), dict(frequency_penalty=float("nan")),
               dict(repetition_penalty=0.0), dict(min_p=1.5), dict(min_tokens=-1),
               dict(min_tokens=99), dict(logit_bias={1: 200.0}), dict(logit_bias={-1: 1.0}),
               dict(grammar=["xml", ""])]:  # fmt: skip
        with pytest.raises(ValueError):
            SamplingParams(max_tokens=32, **kw)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def llm(qwen3_tied_dir: str):
    from minisgl import LLM

    engine = LLM(qwen3_tied_dir, device="cpu", dtype="float32", num_pages=2048)
    yield engine
    engine.shutdown()


def test_generate_with_penalties_matches_reference(llm) -> None:
    """Greedy decoding with penalties (under overlap scheduling, which is on) = argmax of the
    reference-processed logits at every step; a plain row in the same batch is unchanged."""
    prompt = llm.tokenizer.encode("The cat saw a red ball.")
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kws = [dict(repetition_penalty=1.6, frequency_penalty=0.8, presence_penalty=0.5),
           dict(frequency_penalty=1.2, min_p=0.3), dict(logit_bias={7: 3.0}, presence_penalty=1.0)]  # fmt: skip
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw) for kw in kws]
    base = llm.generate([prompt], plain, use_tqdm=False)[0]["token_ids"]
    outs = llm.generate([prompt] * 3 + [prompt], params + [plain], use_tqdm=False)
    assert outs[3]["token_ids"] == base
    for p, out in zip(params, outs):
        ids = out["token_ids"]
        assert ids != base and len(ids) == 16
        logits = llm.prefill_logits(prompt + ids)[len(prompt) - 1 :]
        for k, tok in enumerate(ids):
            ref = reference(logits[k].tolist(), prompt, ids[:k], p, 0.0, [])
            assert tok == max(range(len(ref)), key=ref.__getitem__), (p, k)


def test_min_tokens_and_logit_bias_end_to_end(llm) -> None:
    """Through LLM.generate: a +100 bias on EOS makes EOS the only output token; with min_tokens=5
    as well, EOS is held back for five tokens and comes sixth; min_p=1 at temperature 1 gives the
    greedy tokens."""
    eos = llm.engine.cfg.eos_token_ids[0]
    prompt = llm.tokenizer.encode("A brave knight")
    wants_eos = dict(temperature=0, max_tokens=20, logit_bias={eos: 100.0})
    out = llm.generate([prompt], SamplingParams(**wants_eos), use_tqdm=False)[0]
    assert out["token_ids"] == [eos]
    out = llm.generate([prompt], SamplingParams(**wants_eos, min_tokens=5), use_tqdm=False)[0]
    assert len(out["token_ids"]) == 6 and out["token_ids"][-1] == eos
    assert eos not in out["token_ids"][:5]
    # min_p = 1 at temperature 1 keeps only the most likely token: greedy
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]["token_ids"]  # fmt: skip
    sampled = SamplingParams(temperature=1.0, min_p=1.0, max_tokens=12, ignore_eos=True, seed=3)
    assert llm.generate([prompt], sampled, use_tqdm=False)[0]["token_ids"] == greedy


def test_offline_logprobs(llm) -> None:
    """With logprobs=5 every output token gets its logprob, equal (within 1e-4) to the log-softmax
    of the engine's prefill logits, and the 5 top ids of that row in order; without logprobs the
    output has no "logprobs" key."""
    prompt = llm.tokenizer.encode("My friend")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                logprobs=5), use_tqdm=False)[0]  # fmt: skip
    lps = out["logprobs"]
    assert len(lps) == 6
    ref = torch.log_softmax(llm.prefill_logits(prompt + out["token_ids"]).double(), -1)
    for k, (tok, (lp, top)) in enumerate(zip(out["token_ids"], lps)):
        row = ref[len(prompt) - 1 + k]
        assert abs(lp - row[tok].item()) < 1e-4 and len(top) == 5
        assert [i for i, _ in top] == row.topk(5).indices.tolist()
    assert "logprobs" not in llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]


def test_offline_grammar(llm) -> None:
    """A grammar through LLM.generate; with ignore_eos, a complete grammar allows only EOS."""
    eos = llm.engine.cfg.eos_token_ids[0]
    prompt = llm.tokenizer.encode("The king")
    p = SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True,
                       grammar=["regex", "(the red ball|a cake)!"])  # fmt: skip
    for out in llm.generate([prompt] * 3, p, use_tqdm=False):
        ids = out["token_ids"]
        text = llm.tokenizer.decode([t for t in ids if t != eos])
        assert text in ("the red ball!", "a cake!") and ids[-1] == eos and len(ids) == 8
    with pytest.raises(ValueError, match="regex"):
        llm.generate(
            [prompt], SamplingParams(max_tokens=4, grammar=["regex", "(x"]), use_tqdm=False
        )
