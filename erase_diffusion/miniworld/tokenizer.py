"""A real CLIP byte-level BPE tokenizer for the miniature world, written offline as vocab.json + merges.txt.

Every byte has a token (plain and end-of-word form), so any text tokenizes; the domain's words are merged into single
tokens. The special tokens come last in the vocabulary, as in OpenAI's CLIP (id 49406/49407 there): transformers'
legacy pooling rule takes the highest token id when ``eos_token_id == 2``, and this layout keeps pooling at
``<|endoftext|>`` either way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import CLIPTokenizer

from .domain import COLOURS, SHAPES, STYLE_WORDS, SYNONYMS, TEMPLATES

# words outside the captions that prompts commonly use; they cost one token each
EXTRA_WORDS = ("photo", "image", "the", "of", "with", "and", "on", "background", "dark", "shape", "no", "object")


def byte_alphabet() -> list[str]:
    """The GPT-2/CLIP mapping from the 256 byte values to printable characters."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def domain_words() -> list[str]:
    text = " ".join(
        [*SHAPES, *COLOURS, *STYLE_WORDS.values(), *(w for v in SYNONYMS.values() for w in v), *TEMPLATES, *EXTRA_WORDS]
    )
    words = re.findall(r"[a-z]+", text.replace("{style}", "").replace("{colour}", "").replace("{shape}", ""))
    return sorted(set(words), key=lambda w: (len(w), w))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training until every word is one token. Applying the merges in this order re-creates exactly these
    segmentations, which a hand-written merge chain per word does not (merges of different words interfere)."""
    corpus = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces in corpus:
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(sorted(counts), key=lambda p: counts[p])  # ties broken alphabetically: deterministic
        merges.append(best)
        for pieces in corpus:
            i = 0
            while i < len(pieces) - 1:
                if (pieces[i], pieces[i + 1]) == best:
                    pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
                i += 1


def write_tokenizer(folder: str | Path) -> CLIPTokenizer:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[str] = []
    for merge in learn_merges(domain_words()):
        vocab.setdefault("".join(merge), len(vocab))
        merges.append(" ".join(merge))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tok.save_pretrained(folder)  # tokenizer.json + tokenizer_config.json (keeps model_max_length)
    return tok
