"""A word-level CLIP tokenizer over a vocabulary we write ourselves (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def write_clip_tokenizer(folder, words: Iterable[str], max_length: int = 16):
    """Save a CLIPTokenizer that reads every word with known symbols. CLIP's BPE needs merges and
    the intermediate symbols they produce: each word's characters are merged left to right.
    Merges are global, so one word's early merge ("r e" of "red") can stop another's chain
    ("green" ends as g·re·e·n): such words take a few tokens, still distinct and never unknown."""
    from transformers import CLIPTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    merges = []
    for w in words:
        sym = list(w[:-1]) + [w[-1] + "</w>"]
        for piece in sym:
            vocab.setdefault(piece, len(vocab))
        while len(sym) > 1:
            merges.append(f"{sym[0]} {sym[1]}")
            sym = [sym[0] + sym[1]] + sym[2:]
            vocab.setdefault(sym[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    for f in ("vocab.json", "merges.txt"):
        if (folder / "tokenizer.json").exists():
            (folder / f).unlink()  # the fast tokenizer file holds both
    return CLIPTokenizer.from_pretrained(folder)
