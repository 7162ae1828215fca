"""What erased prompts become: the anchor an erasure maps a concept's prompts onto.

Real models: the empty word (the concept dropped from the prompt) unless the user names an anchor. The miniature
world: a sibling class, measured at run time (``miniworld_anchors``).
"""

from __future__ import annotations

import dataclasses

import torch

from .concepts import ConceptSpec, miniworld_attribute
from .miniworld.domain import COLOURS, SHAPES, STYLES
from .prompts import PromptSet, article, tokenize

GENERIC_ANCHOR = ""
MINIWORLD_ANCHOR = "object"  # only when every class of the concept's attribute is erased


def with_default_anchor(spec: ConceptSpec, text_encoder, tokenizer, miniworld: bool) -> ConceptSpec:
    """``spec`` with its anchor filled in when it leaves it open (both methods): the miniature world's measured
    siblings, else the empty word."""
    if spec.anchor is not None:
        return spec
    anchor = miniworld_anchors(text_encoder, tokenizer, spec.erase) if miniworld else GENERIC_ANCHOR
    return dataclasses.replace(spec, anchor=anchor)


@torch.no_grad()
def miniworld_anchors(text_encoder, tokenizer, concepts: list[str]) -> dict[str, str]:
    """The miniature world's anchors (``text_encoder``: a CLIP text model, or its ``text_model``): for each concept, the not-erased class of its own attribute that the text
    encoder finds least like it (pooled states averaged over the concept's frames; "object" when every class is
    erased). A colour or a style has no neutral value to become — every image has one — and "object" drew hexagons
    and stars (55 % and 17 % of the anchor prompts), so those could not be erased; the least similar sibling is
    drawn unmistakably otherwise (found ≤ 6 % for circle, star, hexagon, red, striped, n = 32 each, where the nearest
    sibling left 12 % of hexagons: bench_concepts.py measures the defaults)."""
    groups = {"shape": SHAPES, "colour": tuple(COLOURS), "style": STYLES}

    out = {}
    for c in concepts:
        siblings = [v for v in groups[miniworld_attribute(c)[0]] if v not in concepts]
        if not siblings:
            out[c] = MINIWORLD_ANCHOR
            continue
        frames, words = PromptSet(miniworld=True).frames(c), [c, *siblings]
        texts = [article(b, w) + w + a for w in words for b, a in frames]
        # the pooled state is the end token's; the encoder is causal, so the padding after it can be cut
        length = max(len(ids) for ids in tokenizer(texts).input_ids)
        ids = tokenize(tokenizer, texts, length).to(next(text_encoder.parameters()).device)
        pooled = text_encoder(input_ids=ids).pooler_output.float()
        mean = torch.nn.functional.normalize(pooled, dim=-1).reshape(len(words), len(frames), -1).mean(1)
        similarity = (mean[1:] @ mean[0]).tolist()
        out[c] = siblings[similarity.index(min(similarity))]
    return out
