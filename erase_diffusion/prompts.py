"""Concepts → prompts for the closed-form edit: frames (a prompt with one word slot) filled with each concept, its
paraphrases and the protected concepts, and the token bookkeeping the edit needs (where the word sits, how a concept
prompt's positions map onto its anchor prompt's).

On the miniature world the frames are its caption templates with the word in the slot of its own attribute; for real
models, generic templates (``--template`` replaces them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .miniworld.domain import COLOURS, SHAPES, STYLE_WORDS, TEMPLATES, with_articles

# Generic prompt templates for real models; the miniature world uses its own caption templates and fillers.
GENERIC_TEMPLATES = (
    "{}",
    "a photo of a {}",
    "a painting of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
    "a close-up photo of a {}",
    "a photo of the {}",
    "a rendering of a {}",
    "a sketch of a {}",
    "a good photo of a {}",
    "a bright photo of a {}",
)


@dataclass(frozen=True)
class PromptSet:
    """Prompts are (before, after) pairs around a word slot: prompt = before + word + after.

    ``miniworld``: the domain's caption templates with the word in the slot of its attribute (a shape in the shape
    slot, a colour in the colour slot, a style in the style slot) and the other attributes varying; otherwise
    ``templates`` ("{}" is the slot)."""

    templates: tuple[str, ...] = GENERIC_TEMPLATES
    miniworld: bool = False

    def frames(self, word: str | None = None) -> list[tuple[str, str]]:
        if not self.miniworld:
            out = []
            for t in self.templates:
                if t.count("{}") != 1:
                    raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}' slot")
                before, after = t.split("{}")
                out.append((before, after))
            return out
        values = {"shape": list(SHAPES), "colour": list(COLOURS), "style": list(STYLE_WORDS.values())}
        # the slot the word fills; words outside the vocabulary (paraphrases, anchors) are shapes' words
        slot = "colour" if word in COLOURS else "style" if word in STYLE_WORDS else "shape"
        # every template with every value of the next attribute, the third rotating (a Latin design: 48 frames
        # for a shape or a colour, 40 for a style, instead of all 112 / 192)
        row, rotate = {"shape": ("colour", "style"), "colour": ("shape", "style"), "style": ("colour", "shape")}[slot]
        seen, out = set(), []
        for i, t in enumerate(TEMPLATES):
            if "{" + slot + "}" not in t:
                continue
            for j, value in enumerate(values[row]):
                other = values[rotate][(i + j) % len(values[rotate])]
                text = with_articles(t.format(**{slot: "\0", row: value, rotate: other}))
                if text not in seen:
                    seen.add(text)
                    before, after = text.split("\0")
                    out.append((before, after))
        return out


def tokenize(tokenizer, texts: list[str], length: int | None = None) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def n_tokens(tokenizer, text: str) -> int:
    return n_tokens_batch(tokenizer, [text])[0]


def n_tokens_batch(tokenizer, texts: list[str]) -> list[int]:
    nonempty = [t for t in texts if t.strip()]
    ids = iter(tokenizer(nonempty, add_special_tokens=False).input_ids if nonempty else [])
    return [len(next(ids)) if t.strip() else 0 for t in texts]


def aligned_positions(s: int, n: int, m: int, length: int) -> list[int]:
    """Map each position of the concept prompt (concept word at [s, s+n)) to the anchor prompt (anchor at [s, s+m))."""
    pos = []
    for t in range(length):
        if t < s:
            pos.append(t)
        elif t < s + n:
            pos.append(s + max(0, m - n + (t - s)) if m else s)
        else:
            pos.append(t + m - n)
    return [min(max(p, 0), length - 1) for p in pos]


def fill(prompts: PromptSet, words, tokenizer, length, subset: int | None = None, avoid: list[str] = ()):
    """(before, word, after, start of the word, its token count) for every frame of each word that fits ``length``
    and names none of ``avoid`` (the erased words: "a red circle" is neither a pure circle prompt nor a pure red one
    when both are erased, and no protected prompt may name one); ``subset``: a seeded, spread subset of that many
    frames per word."""
    frames = {w: [f for f in prompts.frames(w) if not any(names(f"{f[0]} {f[1]}", a) for a in avoid)] for w in words}
    if subset is not None:
        for w, f in frames.items():
            pick = torch.randperm(len(f), generator=torch.Generator().manual_seed(0))[:subset].sort().values
            frames[w] = [f[i] for i in pick.tolist()]
    texts = list(dict.fromkeys([*words, *(x for f in frames.values() for pair in f for x in pair)]))
    counts = dict(zip(texts, n_tokens_batch(tokenizer, texts)))  # one tokenizer call: the words share frames
    out = []
    for word in words:
        n = counts[word]
        if n == 0:
            raise ValueError(f"concept {word!r} tokenizes to nothing")
        for before, after in frames[word]:
            s = 1 + counts[before]  # "a" / "an" are one token each: the article below does not move the word
            if s + n + counts[after] + 1 <= length:
                out.append((article(before, word), word, after, s, n))  # "an orange circle"
    return out


def article(before: str, word: str) -> str:
    """``before`` with a trailing indefinite article that suits ``word`` ("a" / "an"; one token either way)."""
    for old, new in ((" a ", " an "), (" an ", " a ")):
        if f" {before}".endswith(old) and (word[:1].lower() in "aeiou") == (new == " an "):
            return before[: len(before) - len(old) + 1] + new[1:]
    return before


def names(prompt: str, word: str) -> bool:
    return f" {word.lower()} " in f" {prompt.lower().replace(',', ' ').replace('.', ' ')} "
