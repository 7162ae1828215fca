"""Measurements every feature is judged by, on the miniature world:

- ``zero_shot_accuracy``: CLIP zero-shot accuracy per class on held-out images (prompt ensemble);
- ``eval_prompts`` + ``generate`` + ``judge_generations``: a fixed, seeded prompt set, generations from it with
  per-prompt seeds (so base and patched pipelines see identical latents), and the judge's verdict per prompt.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from . import attacks
from .atomic import atomic_path
from .concepts import ConceptSpec, miniworld_attribute
from .miniworld import domain
from .models import load_clip, load_judge, load_pipeline
from .patch import apply_to_clip
from .pipelines.loading import load_patches
from .stats import rate

N_RELATED = 2  # related classes: the closest other classes by text similarity

HELD_OUT_SEED = 10_000  # the build trains on seed 0; held-out images come from another stream


def held_out_dataset(n: int = 1152, seed: int = HELD_OUT_SEED) -> domain.Dataset:
    return domain.make_dataset(n, seed=seed, synonym_p=0.0)


def class_prompts(attribute: str, value: str) -> list[str]:
    """Prompt ensemble for one class: every caption of it over the other two attributes."""
    shapes = [value] if attribute == "shape" else domain.SHAPES
    colours = [value] if attribute == "colour" else list(domain.COLOURS)
    styles = [value] if attribute == "style" else domain.STYLES
    return [domain.with_articles(f"a {st} {c} {s}") for s in shapes for c in colours for st in styles]


def classes(attribute: str) -> tuple[str, ...]:
    return {"shape": domain.SHAPES, "colour": tuple(domain.COLOURS), "style": domain.STYLES}[attribute]


def features(output) -> torch.Tensor:
    """The projected features of ``get_image_features`` / ``get_text_features``: transformers 5 (the pinned major)
    returns them as the ``pooler_output`` of an output object."""
    return output.pooler_output


@torch.no_grad()
def image_embeddings(model, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """CLIP's projected image features of ``pixels`` (N, 3, H, W), in batches on the model's device."""
    return torch.cat([features(model.get_image_features(pixel_values=pixels[i : i + batch_size].to(model.device)))
                      for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt").to(model.device)
        out.append(F.normalize(features(model.get_text_features(**tok)), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, data: domain.Dataset, attribute: str = "shape") -> dict[str, float]:
    """Accuracy per class of ``attribute`` (plus "all"), classifying held-out images among all classes."""
    names = classes(attribute)
    class_emb = torch.stack(
        [F.normalize(text_embeddings(model, tokenizer, class_prompts(attribute, c)).mean(0), dim=-1) for c in names]
    )
    img = F.normalize(image_embeddings(model, data.float_images()), dim=-1)
    pred = (img @ class_emb.T).argmax(-1).cpu()
    truth = getattr(data, attribute)
    acc = {c: (pred[truth == k] == k).float().mean().item() for k, c in enumerate(names)}
    acc["all"] = (pred == truth).float().mean().item()
    return acc


def zero_shot_split(model, tokenizer, data: domain.Dataset, targets: list[tuple[str, str]]) -> dict:
    """{attribute: (zero-shot accuracy averaged over its erased classes, over its other classes)} for every attribute
    of ``targets`` ((attribute, class) per erased concept)."""
    out = {}
    for attribute in sorted({a for a, _ in targets}):
        acc = zero_shot_accuracy(model, tokenizer, data, attribute)
        gone = [v for a, v in targets if a == attribute]
        kept = [c for c in classes(attribute) if c not in gone]
        out[attribute] = (sum(acc[c] for c in gone) / len(gone), sum(acc[c] for c in kept) / len(kept))
    return out


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    shape: str
    colour: str
    style: str | None  # None: the prompt does not name a style
    shape_word: str  # the word used for the shape (the class name or a paraphrase)


def eval_prompts(shapes=domain.SHAPES, per_pair: int = 4, seed: int = 0, paraphrase: bool = False) -> list[PromptCase]:
    """Fixed, seeded prompts: every shape × colour, ``per_pair`` times with a random template and style.

    ``paraphrase=True`` names each shape by one of its synonyms instead (shapes without synonyms are skipped).
    """
    rng = random.Random(seed)
    cases = []
    for s in shapes:
        words = domain.SYNONYMS.get(s, ()) if paraphrase else (s,)
        for c in domain.COLOURS:
            for _ in range(per_pair if words else 0):
                style = rng.choice(domain.STYLES)
                template = rng.choice(domain.TEMPLATES)
                word = rng.choice(words)
                text = domain.with_articles(template.format(style=style, colour=c, shape=word))
                cases.append(PromptCase(text, s, c, style if "{style}" in template else None, word))
    return cases


# phrasings that neither eraser sees while fitting (they use domain.TEMPLATES)
HELD_OUT_TEMPLATES = (
    "{shape}",
    "{colour}, {shape}, {style}",
    "the {shape} is {colour}",
    "a {shape} that is {colour}",
    "{COLOUR} {SHAPE}",
    "a {colour} {shape} and a {colour2} {shape2}",
)


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
    """The one prompt-set builder of every figure (training's final metrics, ``erase-diffusion evaluate``, the
    scorecard, the attack suite): {"named" | "paraphrase" | "heldout": {concept: n [PromptCase]}, "retained":
    n_retained [PromptCase]}. ``named`` and ``paraphrase`` use the caption templates erasers may fit on
    (``domain.TEMPLATES``), ``heldout`` the phrasings no eraser fits on (``HELD_OUT_TEMPLATES``), ``retained`` names
    no erased class."""
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


@torch.no_grad()
def generate(pipe, prompts: list[str] | None = None, *, prompt_embeds: torch.Tensor | None = None, seed: int = 0,
             steps: int = 20, guidance: float = 7.5, batch_size: int = 64, desc: str = "generate",
             progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] from prompts or prompt embeddings; prompt i always uses seed ``seed + i``,
    whatever the batching."""
    n = len(prompts) if prompts is not None else len(prompt_embeds)
    out = []
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        j = min(n, i + batch_size)
        gens = [torch.Generator().manual_seed(seed + k) for k in range(i, j)]
        kw = {"prompt": prompts[i:j]} if prompts is not None else {"prompt_embeds": prompt_embeds[i:j]}
        images = pipe(**kw, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out).float().cpu()


def judge_generations(judge, images: torch.Tensor, cases: list[PromptCase], labels: dict | None = None) -> dict:
    """Share of generations whose judged shape / colour / style equals the prompted one (style where named).
    ``labels``: the judge's labels of ``images`` when the caller already has them."""
    labels = judge.label(images) if labels is None else labels
    shapes = [domain.SHAPES[k] for k in labels["shape"].tolist()]
    colours = [list(domain.COLOURS)[k] for k in labels["colour"].tolist()]
    styles = [domain.STYLES[k] for k in labels["style"].tolist()]
    styled = [i for i, c in enumerate(cases) if c.style is not None]
    result = {
        "n": len(cases),
        "shape": sum(s == c.shape for s, c in zip(shapes, cases)) / len(cases),
        "colour": sum(col == c.colour for col, c in zip(colours, cases)) / len(cases),
        "style": sum(styles[i] == cases[i].style for i in styled) / max(1, len(styled)),
        "shape_per_class": {},
    }
    for s in sorted({c.shape for c in cases}):
        idx = [i for i, c in enumerate(cases) if c.shape == s]
        result["shape_per_class"][s] = sum(shapes[i] == s for i in idx) / len(idx)
    return result


def grid_array(images: torch.Tensor, columns: int = 8):
    """Images in [-1, 1] → one uint8 (H, W, 3) array, ``columns`` wide. Not diffusers' ``make_image_grid``: that one
    takes PIL images and refuses a count that is not rows × columns, and a grid here may end on a partial row."""
    rows = (len(images) + columns - 1) // columns
    h, w = images.shape[-2:]
    canvas = torch.zeros(3, rows * h, columns * w)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    return ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 8) -> Path:
    """A PNG grid of images in [-1, 1], written atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid_array(images, columns)).save(tmp)
    return Path(path)



# ------------------------------------------------------------------ the evaluation's metrics (erase_diffusion.evaluate)
def retrieval_recall(text_emb: torch.Tensor, image_emb: torch.Tensor, queries=None, ks=(1, 5, 10)) -> dict:
    """Recall@k for paired data (text i ↔ image i): text→image ranks every image for each query text, image→text
    every text for each query image; a hit is the paired item only. ``queries``: indices to score (default all)."""
    if text_emb.shape[0] != image_emb.shape[0]:
        raise ValueError("retrieval needs as many texts as images (paired data)")
    idx = torch.arange(len(text_emb)) if queries is None else torch.as_tensor(queries, dtype=torch.long)
    if len(idx) == 0:
        raise ValueError("retrieval needs at least one query")
    sim = F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T  # (texts, images)
    out = {}
    for name, s in (("t2i", sim[idx]), ("i2t", sim.T[idx])):
        paired = s.gather(1, idx[:, None])
        rank = (s > paired).sum(1)  # 0 = paired item first (ties favour it)
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return out


def found_mask(labels: dict, targets: list[tuple[str, str]]) -> torch.Tensor:
    n = len(next(iter(labels.values())))
    found = torch.zeros(n, dtype=torch.bool)
    for attribute, value in targets:
        found |= labels[attribute] == classes(attribute).index(value)
    return found


class JudgeFeatures(torch.nn.Module):
    """The judge's penultimate features as a torchmetrics feature extractor (images in [-1, 1])."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.heads["shape"].in_features

    def forward(self, images):
        return self.judge.embed(images).double()


@torch.no_grad()
def judge_fid_kid(judge, real: torch.Tensor, fake: torch.Tensor) -> dict:
    feat = JudgeFeatures(judge).eval()
    fid = FrechetInceptionDistance(feature=feat, normalize=True)
    subset = max(2, min(50, len(real), len(fake)))
    kid = KernelInceptionDistance(feature=feat, normalize=True, subset_size=subset, subsets=20)
    for m in (fid, kid):
        m.update(real.float(), real=True)
        m.update(fake.float(), real=False)
    # KID draws its random subsets from torch's global generator: seeded here, so that the figure does not depend on
    # what ran before it (the same patch gave two KIDs in one session), and the caller's random state is kept
    with torch.random.fork_rng():
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    return {"fid_judge": fid.compute().item(), "kid_judge": kid_mean.item(), "kid_judge_std": kid_std.item(),
            "n_real": len(real), "n_fake": len(fake)}


@torch.no_grad()
def clip_score(clip, tok, images: torch.Tensor, prompts: list[str]) -> float:
    img = F.normalize(features(clip.get_image_features(pixel_values=images.float())), dim=-1)
    t = tok(prompts, padding=True, return_tensors="pt")
    txt = F.normalize(features(clip.get_text_features(**t)), dim=-1)
    return (100 * (img * txt).sum(-1).clamp(min=0)).mean().item()


@torch.no_grad()
def related_classes(attribute: str, value: str, clip=None, tok=None, text_encoder=None, n: int = N_RELATED) -> list:
    """The ``n`` other classes whose prompt-ensemble text embedding is closest to ``value``'s (original model)."""
    names = [c for c in classes(attribute)]
    embs = []
    for c in names:
        prompts = class_prompts(attribute, c)
        if clip is not None:
            e = text_embeddings(clip, tok, prompts)
        else:
            ids = attacks.tokenize(tok, prompts)
            e = F.normalize(text_encoder(ids.to(text_encoder.device))[1], dim=-1)
        embs.append(F.normalize(e.mean(0), dim=-1))
    E = torch.stack(embs)
    sim = E @ E[names.index(value)]
    order = [names[i] for i in sim.argsort(descending=True).tolist() if names[i] != value]
    return [(c, sim[names.index(c)].item()) for c in order[:n]]



@torch.no_grad()
def empty_prompt_states(pipe) -> torch.Tensor:
    """The empty prompt's conditioning (its 77 read states), which classifier-free guidance reads at every step."""
    return attacks.encode_ids(pipe.text_encoder, attacks.tokenize(pipe.tokenizer, [""])).float()


def empty_prompt_change(before: torch.Tensor, after: torch.Tensor) -> dict:
    """How much an erasure moved the empty prompt's conditioning (``empty_prompt_states`` before and after): the
    largest absolute change and the relative (Frobenius) change."""
    delta = after - before
    return {"max_abs": delta.abs().max().item(), "relative": (delta.norm() / before.norm()).item()}



@torch.no_grad()
def miniworld_metrics(patch_path, spec, generations: bool = True, steps: int = 20, seed: int = 0, n: int = 16,
                      n_retained: int = 56) -> dict:
    """Forget / retain figures of a patch on the miniature world: CLIP zero-shot and judged generations of
    ``concept_cases``' sets (``n`` prompts per erased concept named and paraphrased, ``n_retained`` retained prompts).

    ``found_*``: share of generations in which the judge sees the erased attribute value (lower is better).
    ``retained_*``: judged accuracy on prompts that name no erased concept, base vs patched.
    """
    out: dict = {}
    clip, tok = load_clip("miniworld")
    erased_clip = copy.deepcopy(clip)
    apply_to_clip(erased_clip, patch_path)
    data, targets = held_out_dataset(), [miniworld_attribute(c) for c in spec.erase]
    for tag, model in (("before", clip), ("after", erased_clip)):
        for attribute, (forget, retain) in zero_shot_split(model, tok, data, targets).items():
            out[f"zeroshot_{attribute}_forget_{tag}"], out[f"zeroshot_{attribute}_retain_{tag}"] = forget, retain
    if not generations:
        return out

    pipe, judge = load_pipeline("miniworld"), load_judge("miniworld")
    cases = concept_cases(spec, n=n, n_retained=n_retained, seed=1)
    # held-out phrasings are evaluate's and the scorecard's: here they would cost the main command ~25 s
    sets = {name: [c for cs in cases[name].values() for c in cs] for name in ("named", "paraphrase")}
    sets["retained"] = cases["retained"]
    empty = empty_prompt_states(pipe)
    for patched in (False, True):
        if patched:
            load_patches(pipe, [patch_path])
        tag = "after" if patched else "before"
        for name, cases in sets.items():
            if not cases:
                continue
            images = generate(pipe, [c.prompt for c in cases], seed=seed, steps=steps)
            labels = judge.label(images)
            verdict = judge_generations(judge, images, cases, labels)
            if name == "retained":
                out[f"retained_shape_{tag}"] = verdict["shape"]
                out[f"retained_colour_{tag}"] = verdict["colour"]
                continue
            found = found_mask(labels, targets)
            out[f"found_{name}_{tag}"] = found.float().mean().item()
            out[f"found_{name}_{tag}_ci95"] = rate(found)["ci95"]
            if name == "named":
                out[f"named_colour_kept_{tag}"] = verdict["colour"]
    out["generations_per_set"] = {k: len(v) for k, v in sets.items()}
    out["empty_prompt_change"] = empty_prompt_change(empty, empty_prompt_states(pipe))
    return out
