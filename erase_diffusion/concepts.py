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

GENERIC_TEMPLATES = ("{}", "a photo of a {}", "a picture of a {}", "a painting of a {}", "an image of a {}",
                     "a close-up photo of a {}", "a drawing of a {}", "{} in the style of a photograph")


@dataclass
class ConceptSpec:
    erase: list[str]
    paraphrases: dict[str, list[str]] = field(default_factory=dict)
    keep: list[str] = field(default_factory=list)
    anchor: str | None = None  # what erased prompts should look like instead (token-level forgetting target)

    def __post_init__(self):
        self.erase = [c.strip() for c in self.erase if c and c.strip()]
        self.keep = [c.strip() for c in self.keep if c and c.strip()]
        if not self.erase:
            raise ValueError("no concept to erase: pass at least one non-empty concept")
        both = {c.lower() for c in self.erase} & {c.lower() for c in self.keep}
        if both:
            raise ValueError(f"concept(s) {sorted(both)} are listed both to erase and to keep")
        unknown = set(self.paraphrases) - set(self.erase)
        if unknown:
            raise ValueError(f"paraphrases given for {sorted(unknown)}, which are not concepts to erase")

    def words(self, concept: str) -> list[str]:
        """The concept and its paraphrases."""
        return [concept, *self.paraphrases.get(concept, [])]

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
                   keep=list(raw.get("keep", [])), anchor=raw.get("anchor"))


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
