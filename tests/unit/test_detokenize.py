"""The incremental detokenizer alone: streamed deltas must concatenate to the full decode.

On the SentencePiece-style tokenizer of `small_llama_dir` (byte fallback, `\u2581` spaces), and
again on stories260K's real one when ../shared has it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisgl.messages import AbortReq, ErrorOut, Logprob, Stats, TextOuts, TokenOut
from minisgl.server.detokenizer import Detokenizer, IncrementalDetokenizer

TEXTS = [
    "Once upon a time, there was a little girl.",
    "Hello world 😀 你好 ok",
    "  two leading spaces and trailing  ",
    "émoji🎉🎉 mixed ÄÖÜ ß → ∑ 日本語のテキスト",
    "😀",
    " a",
    "\n\nnew lines\tand tabs",
]


@pytest.fixture(scope="module", params=["small_llama_dir", "stories_dir"])
def tok(request):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


def full_decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream(inc: IncrementalDetokenizer, uid: int, chunks: list[list[int]]) -> list[str]:
    out = []
    for i, chunk in enumerate(chunks):
        out += inc.step([(uid, chunk, i == len(chunks) - 1)])
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tok, text):
    """Each text plus EOS, fed one token per step, gives deltas that concatenate to the full decode,
    with no U+FFFD in any delta; the request's state is freed once its last token is in."""
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    inc = IncrementalDetokenizer(tok)
    deltas = stream(inc, 7, [[i] for i in ids])
    assert "".join(deltas) == full_decode(tok, ids)
    assert not any("\ufffd" in d for d in deltas), deltas  # multi-byte chars held back whole
    assert inc.states == {}  # freed when finished


def test_multibyte_held_back_until_complete(tok):
    """An emoji that arrives as byte-fallback tokens comes out whole in a single delta, the four
    deltas before it being empty; no delta holds U+FFFD and together they equal the full decode."""
    ids = tok.encode("x 😀 ok", add_special_tokens=False)
    inc = IncrementalDetokenizer(tok)
    deltas = [inc.step([(1, [i], False)])[0] for i in ids]
    # the emoji arrives as 4 byte-fallback tokens: held back (a later byte could still turn the
    # run into invalid UTF-8) and released whole with the next ordinary token
    k = next(j for j, d in enumerate(deltas) if "😀" in d)
    assert deltas[k - 4 : k] == ["", "", "", ""] and "\ufffd" not in "".join(deltas)
    assert "".join(deltas) == full_decode(tok, ids)


def test_invalid_utf8_run_matches_full_decode(tok):
    """A run of byte tokens that is not valid UTF-8 (a NUL, a stray continuation byte, a lead byte
    cut off by EOS, more continuation bytes, then "a"): with the last token marked finished the
    deltas equal the full decode, and when never finished they are a prefix of it."""
    byte = {tok.convert_ids_to_tokens(i): i for i in range(tok.vocab_size)}
    ids = [
        byte["<0x00>"],
        byte["<0x80>"],
        byte["<0xE4>"],
        tok.eos_token_id,
        byte["<0xBD>"],
        byte["<0xA0>"],
    ]
    ids += tok.encode("a", add_special_tokens=False)
    for done_at_end in (True, False):
        inc = IncrementalDetokenizer(tok)
        got = "".join(
            inc.step([(1, [i], done_at_end and k == len(ids) - 1)])[0] for k, i in enumerate(ids)
        )
        if done_at_end:
            assert got == full_decode(tok, ids)
        else:
            assert full_decode(tok, ids).startswith(got)


def test_leading_space_kept_mid_stream(tok):
    """Streaming "Once upon a time" token by token, the first delta is "Once" with no leading space
    and the second keeps its leading space."""
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    inc = IncrementalDetokenizer(tok)
    deltas = stream(inc, 1, [[i] for i in ids])
    assert deltas[0] == "Once" and deltas[1].startswith(" ")


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_ids_interleaved(tok, data):
    """Random token ids (specials and byte tokens included), random chunking, 3 interleaved
    requests in one detokenizer: deltas always concatenate to the full decode."""
    n = 3
    seqs = [
        data.draw(st.lists(st.integers(0, tok.vocab_size - 1), min_size=1, max_size=40))
        for _ in range(n)
    ]
    inc = IncrementalDetokenizer(tok)
    pos = [0] * n
    got = [""] * n
    while any(p < len(s) for p, s in zip(pos, seqs)):
        batch, who = [], []
        for r in range(n):
            if pos[r] < len(seqs[r]):
                k = data.draw(st.integers(1, 3))
                chunk = seqs[r][pos[r] : pos[r] + k]
                pos[r] += len(chunk)
                batch.append((r, chunk, pos[r] == len(seqs[r])))
                who.append(r)
        for r, d in zip(who, inc.step(batch)):
            got[r] += d
    for r in range(n):
        assert got[r] == full_decode(tok, seqs[r])
    assert inc.states == {}


def test_worker_messages(tok):
    """The detokenizer worker turns each TokenOut into one TextOuts whose texts and token ids add up
    to the full decode, with per-token logprob texts, cached and prompt lengths and the finish
    reason carried over; ErrorOut and Stats pass through unchanged; an AbortReq frees the request's
    state and its later rows are dropped while other requests in the same message still get text."""
    ids = tok.encode("Hi 你好", add_special_tokens=False)
    det = Detokenizer(tok)
    texts, ids_seen = "", []
    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        out = det.handle(
            TokenOut(
                [5],
                [t],
                ["stop" if last else None],
                [Logprob(-0.5, [t, 3], [-0.5, -2.0])],
                [2],
                [9],
            )
        )
        assert len(out) == 1 and isinstance(out[0], TextOuts) and len(out[0].outs) == 1
        o = out[0].outs[0]
        texts += o.text
        ids_seen += o.token_ids
        lp = o.logprobs[0]
        assert lp.text == det.inc.token_text(t) and lp.logprob == -0.5
        assert lp.top_ids == [t, 3] and lp.top_texts == [lp.text, "\x00"]
        assert o.cached == 2 and o.prompt_len == 9
    assert texts == full_decode(tok, ids) and ids_seen == ids
    assert o.finished == "stop"
    # other messages pass through unchanged
    for m in (ErrorOut(3, "bad", 400), Stats({"running_reqs": 1.0})):
        assert det.handle(m) == [m]
    # aborted uids: state freed, late rows dropped
    det.handle(TokenOut([8], [ids[0]], [None]))
    assert 8 in det.inc.states
    assert det.handle(AbortReq(8)) == [] and 8 not in det.inc.states
    assert det.handle(TokenOut([8, 9], [ids[1], ids[1]], [None, None])) != []
    assert 8 not in det.inc.states and 9 in det.inc.states


def test_token_text_keeps_space(tok):
    """token_text of the last token of "Once upon" (the word after the space) starts with the
    space."""
    inc = IncrementalDetokenizer(tok)
    once = tok.encode("Once upon", add_special_tokens=False)
    assert inc.token_text(once[-1]).startswith(" ")


def test_no_tokenizer_passes_ids():
    """Without a tokenizer the detokenizer passes token ids and finish reasons through with empty
    text and keeps no state per request."""
    det = Detokenizer(None)
    (out,) = det.handle(TokenOut([1, 2], [10, 11], [None, "length"]))
    assert [(o.uid, o.text, o.token_ids, o.finished) for o in out.outs] == [
        (1, "", [10], None),
        (2, "", [11], "length"),
    ]
    assert det.inc.states == {}


def test_one_undecodable_request_fails_alone(tok):
    """An id the tokenizer cannot decode fails its own request with an ErrorOut (500); the other
    requests of the same step still get their text in the step's one TextOuts."""
    det = Detokenizer(tok)
    good = tok.encode("Hi", add_special_tokens=False)[0]
    out = det.handle(TokenOut([1, 2], [good, 10**12], [None, None]))
    assert [type(m).__name__ for m in out] == ["TextOuts", "ErrorOut"]
    assert [o.uid for o in out[0].outs] == [1] and out[1].uid == 2 and out[1].status == 500
    assert det.handle(TokenOut([2], [good], [None])) == []  # its later tokens are dropped
