"""Model correctness: minisgl against transformers on tiny random checkpoints (and stories260K's
real output when ../shared has it)."""

from __future__ import annotations

import pytest
import torch

MAX_NEW = 32

# token-id prompts: a single BOS, a short one, and one whose generation runs past position 64
# (the llama3 rope scaling's original_max_position_embeddings)
PROMPTS = [
    [1],
    [1, 49, 80, 69, 71, 223, 87],
    [1] + [(7 * i + 11) % 380 + 3 for i in range(45)],
]

TINY = ["llama_gqa_dir", "llama_gqa_v4_dir", "qwen3_tied_dir", "qwen3_untied_dir", "qwen2_bias_dir",
        "qwen3_moe_dir", "qwen3_moe_fused_dir", "mistral_dir", "mistral3_dir"]  # fmt: skip
# the HF reference checkpoint of each fixture (a copy in another layout is checked against the
# original)
REFERENCE = {"llama_gqa_v4_dir": "llama_gqa_dir", "qwen3_moe_fused_dir": "qwen3_moe_dir"}


# --------------------------------------------------------------------------- helpers


class _OneLLM:
    """Keeps at most one engine alive: reused while the same (dir, options) is asked for."""

    def __init__(self) -> None:
        self.key = None
        self.llm = None

    def get(self, model_dir: str, **kw):
        from minisgl import LLM

        opts = dict(device="cpu", dtype="float32", num_pages=4096, max_running_requests=32)
        opts.update(kw)
        key = (model_dir, tuple(sorted(opts.items())))
        if key != self.key:
            self.close()
            self.llm = LLM(model_dir, **opts)
            self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            llm, self.llm, self.key = self.llm, None, None
            llm.shutdown()


@pytest.fixture(scope="module")
def engines():
    pool = _OneLLM()
    yield pool
    pool.close()


def greedy(max_tokens: int = MAX_NEW, **kw):
    from minisgl import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def hf_greedy(model, ids: list[int], n: int = MAX_NEW) -> list[int]:
    """n greedy tokens from transformers with EOS disabled (no early stop, no EOS suppression)."""
    from transformers import GenerationConfig

    # transformers fills unset (None) fields of a passed config from model.generation_config,
    # so EOS must be removed there too
    model.generation_config.eos_token_id = None
    gc = GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0, bos_token_id=None
    )
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
    new = out[0, len(ids) :].tolist()
    assert len(new) == n, f"HF reference stopped early: {len(new)} tokens"
    return new


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# --------------------------------------------------------------------------- tiny checkpoints


@pytest.mark.parametrize("fixture", TINY)
def test_greedy_matches_hf(fixture: str, request: pytest.FixtureRequest, engines, hf_model) -> None:
    """On every tiny checkpoint (and the copies in another layout, against the original), 32 greedy
    tokens for each prompt of a batch, one of which runs past position 64, equal transformers'."""
    model_dir = request.getfixturevalue(fixture)
    ref = hf_model(request.getfixturevalue(REFERENCE.get(fixture, fixture)))
    llm = engines.get(model_dir)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert len(outs) == len(PROMPTS)
    for ids, out in zip(PROMPTS, outs):
        expected = hf_greedy(ref, ids)
        got = list(out["token_ids"])
        assert len(got) == MAX_NEW, f"{fixture}: got {len(got)} tokens, expected {MAX_NEW}"
        first_diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        assert got == expected, (
            f"{fixture}: prompt of {len(ids)} tokens diverges at output index {first_diff}\n"
            f"  minisgl: {got}\n  HF:      {expected}"
        )


@pytest.mark.parametrize("fixture", TINY)
def test_prefill_logits_match_hf(
    fixture: str, request: pytest.FixtureRequest, engines, hf_model
) -> None:
    """On every tiny checkpoint, prefill logits at every position equal transformers' within 1e-4 of
    the largest logit, for a short prompt and one of about 100 tokens that crosses position 64."""
    model_dir = request.getfixturevalue(fixture)
    ref = hf_model(request.getfixturevalue(REFERENCE.get(fixture, fixture)))
    llm = engines.get(model_dir)
    # the longest one crosses position 64, where the llama3 scaling regime matters most
    for ids in (PROMPTS[1], PROMPTS[2] + [(5 * i + 3) % 380 + 3 for i in range(60)]):
        expected = hf_logits(ref, ids)
        got = llm.prefill_logits(ids)
        assert isinstance(got, torch.Tensor)
        got = got.detach().float().cpu()
        assert tuple(got.shape) == tuple(expected.shape), (got.shape, expected.shape)
        err = (got - expected).abs()
        tol = 1e-4 * max(1.0, expected.abs().max().item())
        worst = divmod(int(err.argmax()), expected.shape[1])
        assert err.max().item() <= tol, (
            f"{fixture}: prompt of {len(ids)} tokens, max |diff| {err.max().item():.3e} > {tol:.1e} "
            f"at (position, token) {worst}; per-position max diff: "
            f"{[round(v, 6) for v in err.max(dim=1).values.tolist()]}"
        )


# --------------------------------------------------------------------------- stories260K

STORIES_IDS = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
               410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394]  # fmt: skip
STORIES_TEXT = (
    ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw"
)

STORY_PROMPTS = [
    "Once upon a time",
    "Tom and his dog went to the park",
    "The sun was shining and the birds were singing.",
    "Lily had a red ball.",
    "One day, a little bunny",
    "Sara wanted to bake a cake with her mom",
    "There was a big tree in the garden",
    "Max liked to play with his toy car. One day",
    "The cat sat on the mat and",
    "Ben was sad because",
    "In a small town there lived a kind old man who",
    "Mia found a shiny stone",
    "The little bird could not fly",
    "It was a cold winter night and",
    "Sam and Anna were best friends. They",
    "A",
]


def test_stories_once_upon_a_time(stories_dir: str, engines) -> None:
    """stories260K's 32 greedy tokens after "Once upon a time" are its known output ids and text."""
    llm = engines.get(stories_dir)
    out = llm.generate(["Once upon a time"], greedy(), use_tqdm=False)[0]
    assert list(out["token_ids"]) == STORIES_IDS
    assert out["text"] == STORIES_TEXT


@pytest.mark.parametrize("model", ["small_llama_dir", "stories_dir"])
def test_stories_batch_equals_alone(model: str, engines, request) -> None:
    """Sixteen different prompts generated in one batch give the same 24 greedy tokens and text as
    each prompt generated alone (on small_llama and on stories260K)."""
    assert len(set(STORY_PROMPTS)) == 16
    llm = engines.get(request.getfixturevalue(model))
    params = greedy(24)
    together = llm.generate(STORY_PROMPTS, params, use_tqdm=False)
    assert len(together) == len(STORY_PROMPTS)
    for prompt, out in zip(STORY_PROMPTS, together):
        alone = llm.generate([prompt], params, use_tqdm=False)[0]
        assert len(alone["token_ids"]) == 24
        assert list(out["token_ids"]) == list(alone["token_ids"]), (
            f"prompt {prompt!r}: batched {list(out['token_ids'])} != alone {list(alone['token_ids'])}"
        )
        assert out["text"] == alone["text"]


# --------------------------------------------------------------------------- configs only


def test_qwen3_06b_dummy_weights_token_ids(qwen3_06b_config_dir: str, engines) -> None:
    """Qwen3-0.6B's config with dummy weights loads and generates 4 tokens for each of two prompts,
    every token an int inside its 151,936-token vocabulary, along with a text string."""
    engines.close()  # free the previous engine before building a 0.6B one
    llm = engines.get(
        qwen3_06b_config_dir,
        dummy_weight=True,
        num_pages=256,
        max_seq_len=128,
        max_running_requests=4,
        max_prefill_length=128,
    )
    prompts = [[151643, 872, 11, 1879], [9707, 1879, 0, 42, 1000, 150000]]
    outs = llm.generate(prompts, greedy(4), use_tqdm=False)
    assert len(outs) == 2
    for out in outs:
        assert len(out["token_ids"]) == 4
        assert all(isinstance(t, int) and 0 <= t < 151936 for t in out["token_ids"])
        assert isinstance(out["text"], str)
    engines.close()


def test_unsupported_architecture_lists_supported(unsupported_arch_dir: str) -> None:
    """Loading a checkpoint of an unsupported architecture raises an error that names the supported
    ones (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM among them)."""
    from minisgl import LLM

    with pytest.raises(Exception) as info:
        llm = LLM(unsupported_arch_dir, device="cpu", dtype="float32", dummy_weight=True)
        llm.shutdown()
    msg = str(info.value)
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in msg, f"supported architecture {name} missing from error: {msg!r}"
