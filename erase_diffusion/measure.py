"""Measurements every feature is judged by, on the miniature world:

- ``zero_shot_accuracy``: CLIP zero-shot accuracy per class on held-out images (prompt ensemble);
- ``eval_prompts`` + ``generate`` + ``judge_generations``: a fixed, seeded prompt set, generations from it with
  per-prompt seeds (so base and patched pipelines see identical latents), and the judge's verdict per prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .miniworld import domain

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
    """transformers 5 returns the projected features as ``pooler_output`` of an output object; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


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
    """Images in [-1, 1] → one uint8 (H, W, 3) array, ``columns`` wide."""
    rows = (len(images) + columns - 1) // columns
    h, w = images.shape[-2:]
    canvas = torch.zeros(3, rows * h, columns * w)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    return ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 8) -> Path:
    """A PNG grid of images in [-1, 1], written atomically."""
    from PIL import Image

    from .atomic import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid_array(images, columns)).save(tmp)
    return Path(path)


def add_cli_arguments(parser, command: str) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts (default: the fixed evaluation prompt set)")
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld")
    parser.add_argument("--patch", action="append", default=[], help="patch file(s) to load (repeatable)")
    parser.add_argument("--strength", action="append", type=float, default=[], help="strength per patch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--output", default="outputs/samples.png", help="PNG grid to write")


def cli_main(args) -> int:
    import math

    from .atomic import check_output
    from .models import load_judge, load_pipeline
    from .patch_reader import load_patch
    from .pipelines.loading import check_cli_strengths, load_patches

    # every refusal before the pipeline loads
    if args.steps < 1 or args.steps > 200:
        raise ValueError("--steps must be between 1 and 200")
    if not (math.isfinite(args.guidance) and 0.0 <= args.guidance <= 50.0):
        raise ValueError(f"--guidance must be between 0 and 50, got {args.guidance}")
    strengths = check_cli_strengths(args.strength, len(args.patch)) if args.patch else []
    for p in args.patch:
        load_patch(p)
    check_output(args.output, overwrite=True, option="--output")  # a sample grid is meant to be redrawn
    pipe = load_pipeline(args.pretrained_model_name_or_path)
    if args.patch:
        load_patches(pipe, args.patch, strengths)
    cases = None if args.prompts else eval_prompts(per_pair=1)
    prompts = args.prompts or [c.prompt for c in cases]
    images = generate(pipe, prompts, seed=args.seed, steps=args.steps, guidance=args.guidance)
    print(f"wrote {save_grid(images, args.output)}")
    if cases is not None and args.pretrained_model_name_or_path == "miniworld":
        verdict = judge_generations(load_judge(), images, cases)
        print(json.dumps(verdict, indent=2))
    return 0


def erased_cases(spec, per_pair: int = 2, seed: int = 1) -> tuple[list[PromptCase], list[PromptCase]]:
    """Prompts naming an erased miniworld concept: (by its own name, by a paraphrase — shapes only)."""
    from .concepts import miniworld_attribute

    named, para = [], []
    for concept in spec.erase:
        attribute, value = miniworld_attribute(concept)
        named += [c for c in eval_prompts(per_pair=per_pair, seed=seed) if getattr(c, attribute) == value]
        if attribute == "shape":
            para += eval_prompts(shapes=(value,), per_pair=per_pair, seed=seed, paraphrase=True)
    return named, para


@torch.no_grad()
def miniworld_metrics(patch_path, spec, generations: bool = True, steps: int = 20, seed: int = 0) -> dict:
    """Forget / retain figures of a patch on the miniature world: CLIP zero-shot and judged generations.

    ``found_*``: share of generations in which the judge sees the erased attribute value (lower is better).
    ``retained_*``: judged accuracy on prompts that name no erased concept, base vs patched.
    """
    import copy

    from .concepts import miniworld_attribute
    from .models import load_clip, load_judge, load_pipeline
    from .patch import apply_to_clip

    out: dict = {}
    clip, tok = load_clip("miniworld")
    erased_clip = copy.deepcopy(clip)
    apply_to_clip(erased_clip, patch_path)
    data = held_out_dataset()
    for attribute in sorted({miniworld_attribute(c)[0] for c in spec.erase}):
        before, after = zero_shot_accuracy(clip, tok, data, attribute), zero_shot_accuracy(erased_clip, tok, data, attribute)
        gone = [c for c in spec.erase if miniworld_attribute(c)[0] == attribute]
        kept = [c for c in classes(attribute) if c not in gone]
        out[f"zeroshot_{attribute}_forget_before"] = sum(before[c] for c in gone) / len(gone)
        out[f"zeroshot_{attribute}_forget_after"] = sum(after[c] for c in gone) / len(gone)
        out[f"zeroshot_{attribute}_retain_before"] = sum(before[c] for c in kept) / len(kept)
        out[f"zeroshot_{attribute}_retain_after"] = sum(after[c] for c in kept) / len(kept)
    if not generations:
        return out

    from .pipelines.loading import load_patches

    pipe, judge = load_pipeline("miniworld"), load_judge("miniworld")
    named, para = erased_cases(spec)
    retained = [c for c in eval_prompts(per_pair=1, seed=2) if not spec.mentions_erased(c.prompt)
                and all(getattr(c, miniworld_attribute(e)[0]) != e for e in spec.erase)]
    sets = {"named": named, "paraphrase": para, "retained": retained}
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
            found = torch.zeros(len(cases), dtype=torch.bool)
            for concept in spec.erase:
                attribute, value = miniworld_attribute(concept)
                index = classes(attribute).index(value)
                found |= labels[attribute] == index
            out[f"found_{name}_{tag}"] = found.float().mean().item()
            if name == "named":
                out[f"named_colour_kept_{tag}"] = verdict["colour"]
    out["generations_per_set"] = {k: len(v) for k, v in sets.items()}
    return out
