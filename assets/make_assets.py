"""Regenerate the tiny offline tokenizer and text dataset used by the CPU debug configs.

Nothing in the debug runs may download at run time, and torchtitan 0.2.2's pip
wheel does not ship the source repo's ``tests/assets`` (test tokenizer and
``c4_test`` data). So we ship our own, generated deterministically from text
that every CPython install carries: the language-reference topics in
``pydoc_data`` (English prose with code, PSF licensed).

    python assets/make_assets.py        # rewrites assets/tokenizer and assets/c4_tiny

Outputs (kept well under 2 MB together):
  assets/tokenizer/tokenizer.json, tokenizer_config.json   byte-level BPE, 2048 ids
  assets/c4_tiny/data.json                                  c4-style JSON lines {"text": ...}
"""

from __future__ import annotations

import json
import os
import re

from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
# The debug model flavors (llama3 / deepseek_v3 "debugmodel") have vocab_size=2048.
VOCAB_SIZE = 2048
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
MAX_DATA_BYTES = 400_000


def documents() -> list[str]:
    """Paragraph-sized documents, sorted by topic name so the output is deterministic."""
    docs = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(para.split())
            if len(text) >= 80:
                docs.append(text)
    return docs


def write_dataset(docs: list[str]) -> None:
    out_dir = os.path.join(HERE, "c4_tiny")
    os.makedirs(out_dir, exist_ok=True)
    size = 0
    with open(os.path.join(out_dir, "data.json"), "w") as f:
        for text in docs:
            line = json.dumps({"text": text}) + "\n"
            size += len(line)
            if size > MAX_DATA_BYTES:
                break
            f.write(line)


def write_tokenizer(docs: list[str]) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    out_dir = os.path.join(HERE, "tokenizer")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # torchtitan's HuggingFaceTokenizer reads BOS/EOS from tokenizer_config.json.
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": True}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def main() -> None:
    docs = documents()
    write_dataset(docs)
    write_tokenizer(docs)


if __name__ == "__main__":
    main()
