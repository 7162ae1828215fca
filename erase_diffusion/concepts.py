"""What to erase and what to keep: a ``ConceptSpec`` from the command line or a JSON/TOML file, and the prompts
built from it.

    {"erase": ["circle"], "paraphrases": {"circle": ["disc", "round shape"]}, "keep": ["square"], "anchor": "object"}
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .miniworld import domain


@dataclass
class ConceptSpec:
    """The one input of both methods: what to erase (with its paraphrases), what to keep, which prompts to keep exactly
    (closed form; None: the method's default) and what erased prompts should become (one anchor, or one per concept;
    None: the method's default)."""

    erase: list[str]
    paraphrases: dict[str, list[str]] = field(default_factory=dict)  # per erased or kept concept
    keep: list[str] = field(default_factory=list)
    anchor: str | dict[str, str] | None = None
    protect_prompts: list[str] | None = None

    def __post_init__(self):
        self.erase = [c.strip() for c in self.erase if c and c.strip()]
        self.keep = [c.strip() for c in self.keep if c and c.strip()]
        if not self.erase:
            raise ValueError("no concept to erase: pass at least one non-empty concept")
        both = {c.lower() for c in self.erase} & {c.lower() for c in self.keep}
        if both:
            raise ValueError(f"concept(s) {sorted(both)} are listed both to erase and to keep")
        unknown = set(self.paraphrases) - set(self.erase) - set(self.keep)
        if unknown:
            raise ValueError(f"paraphrases given for {sorted(unknown)}, which are neither erased nor kept")
        self.paraphrases = {k: [w.strip() for w in v if w.strip()] for k, v in self.paraphrases.items()}
        clash = sorted({w.lower() for w in self.all_erase_words()} & {k.lower() for k in self.keep})
        if clash:
            raise ValueError(f"kept concept(s) {clash} are paraphrases of an erased concept")
        if self.protect_prompts is not None:
            self.protect_prompts = [str(p).strip() for p in self.protect_prompts]
            if any(not p for p in self.protect_prompts):
                raise ValueError("empty protected prompt")
        if isinstance(self.anchor, dict) and set(self.anchor) - set(self.erase):
            raise ValueError(f"anchors given for {sorted(set(self.anchor) - set(self.erase))}, which are not erased")

    def words(self, concept: str) -> list[str]:
        """The concept and its paraphrases."""
        return [concept, *self.paraphrases.get(concept, [])]

    def anchor_for(self, concept: str) -> str:
        """What ``concept``'s prompts should become ("" when no anchor is set: the word is dropped)."""
        anchor = self.anchor.get(concept) if isinstance(self.anchor, dict) else self.anchor
        return anchor or ""

    def all_erase_words(self) -> list[str]:
        return [w for c in self.erase for w in self.words(c)]

    def mentions_erased(self, text: str) -> bool:
        return any(re.search(rf"\b{re.escape(w.lower())}\b", text.lower()) for w in self.all_erase_words())

    @classmethod
    def from_file(cls, path: str | Path) -> "ConceptSpec":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"concept file {path} does not exist")
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        return cls(erase=list(raw.get("erase", [])), paraphrases=dict(raw.get("paraphrases", {})),
                   keep=list(raw.get("keep", [])), anchor=raw.get("anchor"), protect_prompts=raw.get("protect_prompts"))


def miniworld_attribute(concept: str) -> tuple[str, str]:
    """('shape' | 'colour' | 'style', class name) for a word of the miniature world's vocabulary."""
    for attribute, names in (("shape", domain.SHAPES), ("colour", tuple(domain.COLOURS)), ("style", domain.STYLES)):
        if concept in names:
            return attribute, concept
    raise ValueError(
        f"{concept!r} is not in the miniature world's vocabulary: shapes {', '.join(domain.SHAPES)}; colours "
        f"{', '.join(domain.COLOURS)}; styles {', '.join(domain.STYLES)}"
    )


def miniworld_spec(erase: list[str], keep: list[str] = (), anchor: str | None = None) -> ConceptSpec:
    """A spec for the miniature world, with the domain's own paraphrases filled in and unknown words refused."""
    erase, keep = [c.strip() for c in erase if c.strip()], [c.strip() for c in keep if c.strip()]
    ConceptSpec(erase, {}, keep)  # empty / contradictory lists are refused first, with their own message
    for c in [*erase, *keep]:
        miniworld_attribute(c)
    return ConceptSpec(list(erase), {c: list(domain.SYNONYMS.get(c, ())) for c in erase if c in domain.SYNONYMS},
                       list(keep), anchor)


# prompts whose conditioning the closed form keeps exactly on the miniature world when nothing else is asked
MINIWORLD_PROTECT_PROMPTS = ("a red square", "a blue triangle")


def miniworld_keep(erase: list[str]) -> list[str]:
    """The other classes of every attribute an erased concept belongs to (erase a shape: keep the other shapes;
    erase a shape and a colour: the other shapes and the other colours)."""
    erased = {c.lower() for c in erase}
    groups = (domain.SHAPES, tuple(domain.COLOURS), domain.STYLES)
    return [v for group in groups if erased & set(group) for v in group if v not in erased]


def with_miniworld_defaults(spec: ConceptSpec) -> ConceptSpec:
    """The closed form's defaults on the miniature world, for whatever ``spec`` leaves open: kept concepts (the erased
    attributes' other classes), every word's domain paraphrases (those given win), and the exactly kept prompts
    (``MINIWORLD_PROTECT_PROMPTS`` less any that name an erased word). Words outside the vocabulary are refused."""
    for c in [*spec.erase, *spec.keep]:
        miniworld_attribute(c)
    keep = spec.keep or miniworld_keep(spec.erase)
    paraphrases = {c: list(domain.SYNONYMS.get(c, ())) for c in [*spec.erase, *keep]}
    paraphrases.update(spec.paraphrases)
    out = ConceptSpec(list(spec.erase), paraphrases, keep, spec.anchor, spec.protect_prompts)
    if out.protect_prompts is None:
        out.protect_prompts = [p for p in MINIWORLD_PROTECT_PROMPTS if not out.mentions_erased(p)]
    return out
