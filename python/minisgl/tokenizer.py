"""Loading a checkpoint's tokenizer; a config-only directory simply has none."""

from __future__ import annotations

import glob
import os
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(path: str) -> bool:
    return any(glob.glob(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def load_tokenizer(path: str, chat_template: str | None = None) -> Any | None:
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    # the engine checks lengths against its own context; transformers would also warn (wrongly,
    # "will result in indexing errors") about every prompt longer than the tokenizer's limit
    tok.model_max_length = int(1e30)
    if chat_template:
        with open(chat_template) as f:
            tok.chat_template = f.read()
    return tok
