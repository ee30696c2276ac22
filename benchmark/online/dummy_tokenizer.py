"""Give a config-only model directory (dummy weights) a tokenizer that covers its whole
vocabulary: token id i is the word `t{i}`. Token-id prompts need no tokenizer, but streamed
text does, so the online benchmark needs one to see tokens arrive.

    python benchmark/online/dummy_tokenizer.py MODEL_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def write(model_dir: str) -> None:
    d = Path(model_dir)
    vocab_size = json.loads((d / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(d / "tokenizer.json"))
    # no special tokens in the config: a decode with skip_special_tokens would drop the word of
    # a sampled special id (seen: `t0` as unk_token cost one word at temperature 0.6)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 20,
        # the reference's peer directories use this template too: a prompt is its words
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    print(f"wrote a {vocab_size}-word tokenizer to {d}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write(sys.argv[1])
