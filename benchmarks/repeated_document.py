"""A c4-style dataset of one document, repeated: every rank reads the same sequences at every step.

Runs that must see the same data whatever their data-parallel degree (resume across layouts) or
whose curves must not move with the batch (QK-clip's training check) train on it.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_repeated_document(folder: Path, seq_len_of, sequences: int = 2) -> int:
    """Write ``folder/data.json``: one document, repeated, that tokenizes to exactly ``sequences``
    sequences; returns their seq_len. ``seq_len_of(tokens)``: the seq_len at which a document of that
    many tokens (BOS and EOS included) makes exactly ``sequences`` sequences in the trainer's packing
    (it differs between torchtitan releases), or None."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(str(REPO / "assets" / "tokenizer"))
    words = " ".join(json.loads(line)["text"] for line in (REPO / "assets" / "c4_tiny" / "data.json").open()
                     if line.strip()).split()
    for n in range(1, len(words)):
        text = " ".join(words[:n])
        seq_len = seq_len_of(len(tokenizer.encode(text, add_bos=True, add_eos=True)))
        if seq_len is not None and seq_len >= 32:
            break
    else:
        raise AssertionError(f"no prefix of assets/c4_tiny tokenizes to exactly {sequences} sequences")
    with open(Path(folder) / "data.json", "w") as f:
        for _ in range(16):
            f.write(json.dumps({"text": text}) + "\n")
    return seq_len


def packing_022(sequences: int = 2):
    """torchtitan 0.2.2 appends each document's tokens to a buffer and cuts it into seq_len + 1
    token pieces: a document of n tokens is ``sequences`` of them at seq_len n / sequences - 1."""
    return lambda n: n // sequences - 1 if n % sequences == 0 else None
