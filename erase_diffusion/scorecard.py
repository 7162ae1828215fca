"""Per-concept scorecard on the miniature world: is the concept gone (named, paraphrased, held-out phrasings), and
does everything else look the same? Every rate carries its n and a Wilson 95 % interval.

Prompt sets (per-prompt seeds shared by base and patched, so the difference is the patch's):

- ``named``: the domain's caption templates (the ones erasers may fit on) naming the concept;
- ``paraphrase``: the same templates naming a shape by a paraphrase (shapes only);
- ``heldout``: phrasings no eraser fits on (``HELD_OUT_TEMPLATES``: bare word, comma lists, "the X is red",
  "an X that is red", upper case, a second retained shape in the prompt);
- ``retained``: prompts that name no erased concept (accuracy of the erased attribute, per class).

"found" = share of generations in which the judge sees an erased value; "kept" = the judged accuracy of the *other*
attributes on prompts naming the erased concept, relative to base (erasing a shape must not lose the colour).
"""

from __future__ import annotations

import random

import torch

from .concepts import ConceptSpec, miniworld_attribute
from .measure import PromptCase, classes, generate
from .miniworld import domain
from .stats import mcnemar, rate

# phrasings that neither eraser sees while fitting (they use domain.TEMPLATES)
HELD_OUT_TEMPLATES = (
    "{shape}",
    "{colour}, {shape}, {style}",
    "the {shape} is {colour}",
    "a {shape} that is {colour}",
    "{COLOUR} {SHAPE}",
    "a {colour} {shape} and a {colour2} {shape2}",
)
ATTRIBUTES = ("shape", "colour", "style")


def _case(rng: random.Random, template: str, shape: str, colour: str, style: str, word: str,
          erased: set[str]) -> PromptCase:
    # a second, retained object for the two-object templates (with 7 of 8 shapes erased it may repeat the first)
    others = [s for s in domain.SHAPES if s != shape and s not in erased] or [s for s in domain.SHAPES
                                                                              if s not in erased] or [shape]
    shape2 = rng.choice(others)
    colour2 = rng.choice([c for c in domain.COLOURS if c not in erased] or [colour])
    text = template.format(shape=word, colour=colour, style=style, SHAPE=word.upper(), COLOUR=colour.upper(),
                           shape2=shape2, colour2=colour2)
    named_style = style if "{style}" in template else None
    # the bare-word template names no colour: the colour is then not a prompted attribute
    named_colour = colour if ("{colour}" in template or "{COLOUR}" in template) else ""
    return PromptCase(domain.with_articles(text), shape, named_colour, named_style, word)


def concept_cases(spec: ConceptSpec, n: int = 64, n_retained: int = 128, seed: int = 0) -> dict:
    """{"named" | "paraphrase" | "heldout": {concept: [PromptCase]}, "retained": [PromptCase]}."""
    rng = random.Random(seed)
    erased = set(spec.erase)
    kinds = {c: miniworld_attribute(c)[0] for c in spec.erase}
    sets = {"named": {}, "paraphrase": {}, "heldout": {}}

    def draw(attribute, value, templates, words):
        out = []
        for i in range(n):
            parts = {"shape": rng.choice([s for s in domain.SHAPES if s not in erased] or domain.SHAPES),
                     "colour": rng.choice([c for c in domain.COLOURS if c not in erased] or list(domain.COLOURS)),
                     "style": rng.choice([s for s in domain.STYLES if s not in erased] or domain.STYLES)}
            parts[attribute] = value
            word = words[i % len(words)] if attribute == "shape" else parts["shape"]
            template = templates[i % len(templates)]
            if attribute == "style" and "{style}" not in template:
                template = "a {style} {colour} {shape}" if templates is domain.TEMPLATES else "{colour}, {shape}, {style}"
            if attribute == "colour" and "{colour}" not in template and "{COLOUR}" not in template:
                template = "a {colour} {shape}" if templates is domain.TEMPLATES else "the {shape} is {colour}"
            out.append(_case(rng, template, parts["shape"], parts["colour"], parts["style"], word, erased))
        return out

    for concept, attribute in kinds.items():
        sets["named"][concept] = draw(attribute, concept, domain.TEMPLATES, [concept])
        sets["heldout"][concept] = draw(attribute, concept, HELD_OUT_TEMPLATES, [concept])
        if attribute == "shape" and domain.SYNONYMS.get(concept):
            sets["paraphrase"][concept] = draw(attribute, concept, domain.TEMPLATES, list(domain.SYNONYMS[concept]))
    retained = []
    while len(retained) < n_retained:
        s, c, st = rng.choice(domain.SHAPES), rng.choice(list(domain.COLOURS)), rng.choice(domain.STYLES)
        if erased & {s, c, st}:
            continue
        retained.append(_case(rng, rng.choice(domain.TEMPLATES), s, c, st, s, erased))
    sets["retained"] = retained
    return sets


def _truth(cases: list[PromptCase], attribute: str) -> torch.Tensor:
    """Prompted class index per case (-1 where the prompt does not name the attribute)."""
    names = classes(attribute)
    return torch.tensor([names.index(v) if (v := getattr(c, attribute)) in names else -1 for c in cases])


class Scorecard:
    """Base generations are made once per prompt set and reused for every patched pipeline scored against them."""

    def __init__(self, base_pipe, judge, spec: ConceptSpec, *, n: int = 64, n_retained: int = 128, steps: int = 10,
                 seed: int = 0):
        self.spec, self.judge, self.steps, self.seed = spec, judge, steps, seed
        self.sets = concept_cases(spec, n, n_retained, seed)
        self.base = self._labels(base_pipe)

    def _all_cases(self):
        for name in ("named", "paraphrase", "heldout"):
            for concept, cases in self.sets[name].items():
                yield (name, concept), cases
        yield ("retained", None), self.sets["retained"]

    def _labels(self, pipe) -> dict:
        out = {}
        for key, cases in self._all_cases():
            images = generate(pipe, [c.prompt for c in cases], seed=self.seed, steps=self.steps)
            out[key] = self.judge.label(images)
        return out

    def score(self, pipe) -> dict:
        patched = self._labels(pipe)
        return {"base": self._figures(self.base), "patched": self._figures(patched),
                "paired": self._paired(patched)}

    def _figures(self, labels: dict) -> dict:
        fig = {}
        for name in ("named", "paraphrase", "heldout"):
            for concept, cases in self.sets[name].items():
                attribute = miniworld_attribute(concept)[0]
                value = classes(attribute).index(concept)
                lab = labels[(name, concept)]
                fig.setdefault(name, {})[concept] = rate(lab[attribute] == value)
                if name == "named":  # the other attributes the prompt names: still drawn as asked?
                    for other in ATTRIBUTES:
                        truth = _truth(cases, other)
                        if other != attribute and (truth >= 0).any():
                            idx = truth >= 0
                            fig.setdefault("kept", {}).setdefault(concept, {})[other] = rate(lab[other][idx] == truth[idx])
        retained, lab = self.sets["retained"], labels[("retained", None)]
        for attribute in sorted({miniworld_attribute(c)[0] for c in self.spec.erase}):
            truth = _truth(retained, attribute)
            idx = truth >= 0
            fig.setdefault("retained", {})[attribute] = rate(lab[attribute][idx] == truth[idx])
            per = {}
            for k, cls in enumerate(classes(attribute)):
                sel = truth == k
                if sel.any():
                    per[cls] = rate(lab[attribute][sel] == k)
            fig.setdefault("retained_per_class", {})[attribute] = per
        return fig

    def _paired(self, patched: dict) -> dict:
        """McNemar's exact test (two-sided) on the found flags of the named prompts, base vs patched."""
        out = {}
        for concept in self.spec.erase:
            attribute = miniworld_attribute(concept)[0]
            value = classes(attribute).index(concept)
            out[concept] = mcnemar(self.base[("named", concept)][attribute] == value,
                                   patched[("named", concept)][attribute] == value)
        return out


def summary(card: dict, spec: ConceptSpec) -> dict:
    """The headline row per concept: worst of the found rates, retained accuracy, worst neighbour, other attributes."""
    base, after = card["base"], card["patched"]
    rows = {}
    for concept in spec.erase:
        attribute = miniworld_attribute(concept)[0]
        row = {"attribute": attribute}
        for name in ("named", "paraphrase", "heldout"):
            if concept in after.get(name, {}):
                row[f"found_{name}"] = after[name][concept]
                row[f"found_{name}_base"] = base[name][concept]
        row["retained_base"], row["retained"] = base["retained"][attribute], after["retained"][attribute]
        drops = {cls: base["retained_per_class"][attribute][cls]["rate"] - r["rate"]
                 for cls, r in after["retained_per_class"][attribute].items()}
        worst = max(drops, key=drops.get)
        row["worst_neighbour"] = {"class": worst, "base": base["retained_per_class"][attribute][worst]["rate"],
                                  "patched": after["retained_per_class"][attribute][worst]["rate"]}
        row["kept"] = {o: {"base": base["kept"][concept][o]["rate"], "patched": r["rate"],
                           "ratio": r["rate"] / max(base["kept"][concept][o]["rate"], 1e-9)}
                       for o, r in after.get("kept", {}).get(concept, {}).items()}
        rows[concept] = row
    return rows
