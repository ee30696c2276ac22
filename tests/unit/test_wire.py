"""The wire codec's records (SamplingParams, Logprob, TextOut) and check_prompt, without processes."""

from __future__ import annotations

import re

import msgpack
import pytest

from minisgl.core import SamplingParams
from minisgl.messages import (
    BadFrame,
    Limits,
    Logprob,
    PromptError,
    TextOut,
    TextOuts,
    TokenizeReq,
    TokenOut,
    UserReq,
    check_prompt,
    decode,
    encode,
)

FULL = SamplingParams(0.5, 3, 0.9, 7, True, [1, 2], 5, 2, 0.1, -0.2, 1.1, 0.05, {3: 1.5}, 1,
                      ["regex", "a+"])  # fmt: skip


def test_round_trips() -> None:
    """Every record kind (TokenizeReq, UserReq, TokenOut, TextOuts, with full SamplingParams and
    logprobs) decodes back equal to what was encoded, logit_bias keys still ints."""
    for msg in (TokenizeReq(1, "hi", None, FULL, True, True), UserReq(2, [1, 2], SamplingParams()),
                TokenOut([1, 2], [3, 4], [None, "stop"],
                         [Logprob(-0.5, [3, 9], [-0.5, -1.0]), None], [0, 1], [3, 3]),
                TextOuts([TextOut(1, "x", [3], None, [Logprob(-0.5, [3], [-0.5], "x", ["x"]), None], 0, 3),
                          TextOut(2, "", [4], "stop", [None], 1, 5)])):  # fmt: skip
        assert decode(encode(msg)) == msg
    assert decode(encode(UserReq(2, [1], FULL))).params.logit_bias == {3: 1.5}


@pytest.mark.parametrize(
    "params",
    [[0.5, 3, 0.9, 0],  # max_tokens 0: SamplingParams' own validation
     [0.5, 3, 0.9, "7"], [True], {"temperature": 1.0}, [1.0] * 16,  # types, a dict, arity
     [1.0, -1, 1.0, 16, False, [], None, -1, 0, 0, 1, 0, {"3": 1.0}]],  # logit_bias key type
)  # fmt: skip
def test_bad_params_rejected(params) -> None:
    """A UserReq frame whose params fail SamplingParams' validation, or have a wrong type, a dict, a
    wrong count of fields or a string logit_bias key, is a BadFrame naming UserReq.params."""
    with pytest.raises(BadFrame, match="UserReq.params"):
        decode(msgpack.packb([2, 1, [1], params]))


def test_bad_logprobs_rejected() -> None:
    """A TokenOut frame whose logprob row has too many fields, a non-int id, a wrong type or too few
    fields is a BadFrame naming TokenOut.logprobs."""
    for row in ([-0.5, [1], [-0.5], 3], [-0.5, ["1"], [-0.5]], "x", [-0.5]):
        with pytest.raises(BadFrame, match="TokenOut.logprobs"):
            decode(msgpack.packb([4, [1], [2], [None], [row]]))


def test_bad_text_outs_rejected() -> None:
    """One malformed TextOut record makes the whole step's frame a BadFrame, never a partly
    decoded message."""
    good = [1, "x", [3], None, [None], 0, 3]
    for bad in ([1, "x", [3], None, [None], 0], [1, b"x", [3], None, [None], 0, 3],
                [1, "x", ["3"], None, [None], 0, 3], "x"):  # fmt: skip
        with pytest.raises(BadFrame, match="TextOuts.outs"):
            decode(msgpack.packb([5, [good, bad]]))


def test_check_prompt() -> None:
    """check_prompt returns the params unchanged for a valid prompt and with fill=True sets
    max_tokens to the room left; it raises a PromptError saying why for an empty prompt, an id
    outside the vocabulary (in the prompt, stop_token_ids or logit_bias), a prompt that leaves no
    room or one that asks for more tokens than max_seq_len, and a ValueError when the filled
    max_tokens falls below min_tokens."""
    lim = Limits(max_seq_len=10, vocab_size=100)
    p = SamplingParams(max_tokens=4, stop_token_ids=[5])
    assert check_prompt([1, 2, 3], p, lim) is p
    assert check_prompt([1, 2, 3], p, lim, fill=True).max_tokens == 7
    for ids, params, why in [
        ([], p, "the prompt is empty"),
        ([1, 100, -1], p, "token id 100 is outside the vocabulary [0, 100)"),
        ([1], SamplingParams(stop_token_ids=[7, 200]), "stop_token_ids: token id 200"),
        ([1], SamplingParams(logit_bias={100: 1.0}), "logit_bias: token id 100"),
        (list(range(10)), p, "leaves no room"),
        ([1] * 7, p, "you requested 11 tokens (7 in the prompt, 4 for the completion)"),
    ]:
        with pytest.raises(PromptError, match=re.escape(why)):
            check_prompt(ids, params, lim)
    with pytest.raises(ValueError, match="min_tokens"):  # a filled max_tokens below min_tokens
        check_prompt([1] * 8, SamplingParams(max_tokens=10, min_tokens=5), lim, fill=True)
