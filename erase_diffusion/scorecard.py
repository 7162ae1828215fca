"""Per-concept scorecard on the miniature world: is the concept gone (named, paraphrased, held-out phrasings), and
does everything else look the same? Every rate carries its n and a Wilson 95 % interval.

Prompt sets (``measure.concept_cases``; per-prompt seeds shared by base and patched, so the difference is the
patch's):

- ``named``: the domain's caption templates (the ones erasers may fit on) naming the concept;
- ``paraphrase``: the same templates naming a shape by a paraphrase (shapes only);
- ``heldout``: phrasings no eraser fits on (``HELD_OUT_TEMPLATES``: bare word, comma lists, "the X is red",
  "an X that is red", upper case, a second retained shape in the prompt);
- ``retained``: prompts that name no erased concept (accuracy of the erased attribute, per class).

"found" = share of generations in which the judge sees an erased value; "kept" = the judged accuracy of the *other*
attributes on prompts naming the erased concept, relative to base (erasing a shape must not lose the colour);
"drawn_as" = what the named prompts are drawn as (counts of the judged value of the erased attribute).
"""

from __future__ import annotations

import collections

import torch

from .concepts import ConceptSpec, miniworld_attribute
from .measure import PromptCase, classes, concept_cases, generate
from .stats import mcnemar, rate

ATTRIBUTES = ("shape", "colour", "style")

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
        self.base = self.labels(base_pipe)

    def _all_cases(self):
        for name in ("named", "paraphrase", "heldout"):
            for concept, cases in self.sets[name].items():
                yield (name, concept), cases
        yield ("retained", None), self.sets["retained"]

    def labels(self, pipe) -> dict:
        """The judge's labels of ``pipe``'s generations, per prompt set: {(set, concept): {attribute: (n,)}}."""
        out = {}
        for key, cases in self._all_cases():
            images = generate(pipe, [c.prompt for c in cases], seed=self.seed, steps=self.steps)
            out[key] = self.judge.label(images)
        return out

    def score(self, pipe) -> dict:
        patched = self.labels(pipe)
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
                if name == "paraphrase":  # per word, so that paraphrases the eraser was not told about show apart
                    words = [c.shape_word for c in cases]
                    fig.setdefault("paraphrase_by_word", {})[concept] = {
                        w: rate(lab[attribute][torch.tensor([x == w for x in words])] == value)
                        for w in dict.fromkeys(words)}
                if name == "named":  # what the erased concept becomes, and are the other attributes drawn as asked?
                    drawn = collections.Counter(classes(attribute)[i] for i in lab[attribute].tolist())
                    fig.setdefault("drawn_as", {})[concept] = dict(drawn.most_common())
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
        row["drawn_as"], row["drawn_as_base"] = after["drawn_as"][concept], base["drawn_as"][concept]
        if concept in after.get("paraphrase_by_word", {}):
            row["found_paraphrase_by_word"] = after["paraphrase_by_word"][concept]
        row["retained_base"], row["retained"] = base["retained"][attribute], after["retained"][attribute]
        drops = {cls: base["retained_per_class"][attribute][cls]["rate"] - r["rate"]
                 for cls, r in after["retained_per_class"][attribute].items()}
        worst = max(drops, key=drops.get)
        row["worst_neighbour"] = {"class": worst, "base": base["retained_per_class"][attribute][worst]["rate"],
                                  "patched": after["retained_per_class"][attribute][worst]["rate"]}
        row["kept"] = {o: {"base": base["kept"][concept][o]["rate"], "patched": r["rate"],
                           "ratio": r["rate"] / max(base["kept"][concept][o]["rate"], 1e-9), "n": r["n"],
                           "ci95": r["ci95"]}
                       for o, r in after.get("kept", {}).get(concept, {}).items()}
        rows[concept] = row
    return rows
