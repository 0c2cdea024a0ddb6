"""Regenerate vdu_engine/assets/clip_tokenizer/{vocab.json,merges.txt} from OpenAI CLIP's BPE file.

    git --git-dir=<openai/CLIP clone>/.git show HEAD:clip/bpe_simple_vocab_16e6.txt.gz > bpe.gz
    python tools/make_clip_tokenizer.py bpe.gz

The vocabulary is built exactly as CLIP's own clip/simple_tokenizer.py builds it (so the ids are
the ones every Stable Diffusion text encoder was trained with): the 256 byte symbols, the same
with '</w>', one symbol per merge of lines [1 : 49152-256-2+1], then the two special tokens.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "vdu_engine" / "assets" / "clip_tokenizer"


def bytes_to_unicode() -> dict:
    """GPT-2 / CLIP's reversible byte → printable-character table."""
    printable = [(ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ"))]
    bs = [b for lo, hi in printable for b in range(lo, hi + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build(bpe_gz: Path):
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def main(argv) -> int:
    vocab, merges = build(Path(argv[0]))
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(vocab)} tokens, {len(merges)} merges)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
