"""``erase-diffusion evaluate``: measure an erasure on the miniature world — forgetting, side effects, utility,
robustness — and write ``metrics.json`` plus a self-contained ``report.html``.

    erase-diffusion evaluate --patch runs/circle/erase_patch.safetensors --erase_concept circle \
        --output_dir eval/circle [--quick]

API: ``evaluate(pipe_name, patch, spec, quick)`` for a patch; ``evaluate_pipelines(base_pipe, erased_pipe, spec)`` for
any already-modified pipeline (UNet-side peers in ``benchmarks/peers.py`` go through this one).

What is measured (all generations judged by the independent judge CNN; "found" = the judge labels the erased value):

- forgetting: CLIP zero-shot accuracy on the erased classes (miniworld CLIP with the patch merged by ``apply_to_clip``);
  text→image and image→text retrieval R@1/5/10 on forget and retain captions of held-out images (a hit is the paired
  item only); share of generations from prompts naming the concept in which the judge still finds it;
- side effects: judged accuracy of retained classes, of the closest other classes by CLIP text similarity ("related"),
  and whether colour / style survive on prompts naming the erased concept;
- utility: FID / KID of generations vs real held-out images **in the judge CNN's penultimate feature space**
  (``Judge.embed``; no Inception weights offline — these are judge-feature FID/KID, not comparable to Inception FID),
  and a CLIP score = mean cosine ×100 (clamped at 0, as CLIPScore does) between miniworld-CLIP image and text
  embeddings: torchmetrics 1.9's ``CLIPScore`` refuses a local ``model_name_or_path`` ("Not supported by
  `clip_score` metric"), and its processor would resize / normalise the 64×64 images the OpenAI way anyway;
- robustness: attack success rate (ASR, share of attacked prompts whose generation the judge labels with the erased
  concept; the unattacked prompt's success counts too, as in UnlearnDiffAtk) for paraphrases (``domain.SYNONYMS``),
  misspellings, a bounded discrete adversarial search and a soft-prompt (learned-token) attack — see ``attacks.py``.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import attacks
from .atomic import write_atomic, write_json
from .concepts import ConceptSpec, miniworld_attribute, miniworld_spec
from .measure import (PromptCase, classes, eval_prompts, features, generate, grid_array, held_out_dataset,
                      image_embeddings, text_embeddings, zero_shot_accuracy)
from .miniworld import domain

SIZES = {  # quick: CI / smoke; full: the README figures
    True: dict(named=8, para=4, retained=16, misspell=4, adv=2, adv_candidates=16, adv_positions=2, soft=4,
               soft_train=8, soft_steps=40, real=128, steps=10, batch=16),
    False: dict(named=16, para=16, retained=56, misspell=16, adv=8, adv_candidates=64, adv_positions=3, soft=16,
                soft_train=16, soft_steps=150, real=512, steps=20, batch=32),
}
N_RELATED = 2


# ------------------------------------------------------------------------------------------------ pure pieces
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


def validate_spec(spec: ConceptSpec) -> list[tuple[str, str]]:
    """(attribute, value) per erased concept; ValueError for anything the judge cannot label."""
    for c in spec.keep:
        miniworld_attribute(c)
    try:
        return [miniworld_attribute(c) for c in spec.erase]
    except ValueError as err:
        raise ValueError(f"the judge cannot label this concept, so its erasure cannot be evaluated: {err}") from None


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
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    feat = JudgeFeatures(judge).eval()
    fid = FrechetInceptionDistance(feature=feat, normalize=True)
    subset = max(2, min(50, len(real), len(fake)))
    kid = KernelInceptionDistance(feature=feat, normalize=True, subset_size=subset, subsets=20)
    for m in (fid, kid):
        m.update(real.float(), real=True)
        m.update(fake.float(), real=False)
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
    from .measure import class_prompts, text_embeddings

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


# ------------------------------------------------------------------------------------------------ prompt sets
def _subsample(cases: list, n: int) -> list:
    if len(cases) <= n:
        return list(cases)
    step = len(cases) / n
    return [cases[int(i * step)] for i in range(n)]


def build_prompt_sets(spec: ConceptSpec, quick: bool, prompts: list[str] | None = None) -> dict:
    targets = validate_spec(spec)
    size = SIZES[bool(quick)]
    if prompts is not None:
        if not [p for p in prompts if p and p.strip()]:
            raise ValueError("the prompt set is empty: pass at least one prompt naming the erased concept")
        attribute, value = targets[0]
        named = [PromptCase(p, value if attribute == "shape" else "", value if attribute == "colour" else "",
                            value if attribute == "style" else None, value) for p in prompts if p.strip()]
    else:
        named = []
        for attribute, value in targets:
            named += [c for c in eval_prompts(per_pair=2, seed=1) if getattr(c, attribute) == value]
        named = _subsample(named, size["named"])
    if not named:
        raise ValueError(f"the prompt set is empty: no evaluation prompt names {', '.join(spec.erase)}")
    para = []
    for attribute, value in targets:
        if attribute == "shape" and domain.SYNONYMS.get(value):
            para += eval_prompts(shapes=(value,), per_pair=2, seed=1, paraphrase=True)
    para = _subsample(para, size["para"])
    retained = [c for c in eval_prompts(per_pair=1, seed=2) if not spec.mentions_erased(c.prompt)
                and all(getattr(c, a) != v for a, v in targets)]
    retained = _subsample(retained, size["retained"])
    # attacks edit the word the concept is named by in the first prompts of ``named``
    word = spec.erase[0]
    worded = [c for c in named if attacks.replace_word(c.prompt, word, "\0") != c.prompt]
    typos = attacks.misspellings(word, n=max(1, size["misspell"] // 2), seed=0)
    misspelled = [(c, attacks.replace_word(c.prompt, word, typos[k % len(typos)]))
                  for k, c in enumerate(_subsample(worded, size["misspell"]))]
    soft_train = [c.prompt for c in eval_prompts(per_pair=1, seed=7) if word in c.prompt.split()][: size["soft_train"]]
    return {"targets": targets, "word": word, "named": named, "paraphrase": para, "retained": retained,
            "misspelled": misspelled, "adversarial": worded[: size["adv"]], "soft": worded[: size["soft"]],
            "soft_train": soft_train or [c.prompt for c in worded]}


# ------------------------------------------------------------------------------------------------ the harness
def _judge_set(judge, images, cases, targets) -> dict:
    labels = judge.label(images)
    found = found_mask(labels, targets)
    out = {"n": len(cases), "found": found.float().mean().item(), "found_per_prompt": found.tolist()}
    col = [list(domain.COLOURS).index(c.colour) if c.colour in domain.COLOURS else -1 for c in cases]
    sty = [domain.STYLES.index(c.style) if c.style in domain.STYLES else -1 for c in cases]
    shp = [domain.SHAPES.index(c.shape) if c.shape in domain.SHAPES else -1 for c in cases]
    for name, truth in (("colour", col), ("style", sty), ("shape", shp)):
        idx = [i for i, v in enumerate(truth) if v >= 0]
        if idx:
            out[f"{name}_acc"] = (labels[name][idx] == torch.tensor([truth[i] for i in idx])).float().mean().item()
    out["labels"] = {k: v.tolist() for k, v in labels.items()}
    return out


def evaluate_pipelines(base_pipe, erased_pipe, spec: ConceptSpec, *, quick: bool = False, clip=None,
                       erased_clip=None, judge=None, steps: int | None = None, seed: int = 0, prompts=None,
                       output_dir=None, method: str = "erased", attacks_on: bool = True, progress: bool = True,
                       extra: dict | None = None, cache: dict | None = None) -> dict:
    """Measure ``erased_pipe`` against ``base_pipe`` (same architecture; either may carry LoRA adapters or edited
    weights). ``clip``: (CLIPModel, tokenizer) of the original model for zero-shot / retrieval / CLIP score;
    ``erased_clip``: the same with the erasure applied (default: ``clip``, i.e. an erasure CLIP does not see).
    Returns the metrics dict; with ``output_dir``, also writes metrics.json and report.html there. ``cache``: a dict
    reused across calls with the same ``base_pipe`` (base generations are then made once, e.g. in a benchmark)."""
    from .models import load_judge

    t_start = time.perf_counter()
    size = dict(SIZES[bool(quick)])
    if steps is not None:
        size["steps"] = int(steps)
    if size["steps"] < 1:
        raise ValueError("steps must be at least 1")
    sets = build_prompt_sets(spec, quick, prompts)  # every input check happens before any generation
    targets, word = sets["targets"], sets["word"]
    judge = judge if judge is not None else load_judge()
    if clip is not None and erased_clip is None:
        erased_clip = clip
    gen = dict(steps=size["steps"], batch_size=size["batch"], progress=progress)
    m: dict = {"method": method, "quick": bool(quick), "erase": spec.erase, "keep": spec.keep,
               "steps": size["steps"], "seed": seed, "feature_space": "judge CNN penultimate (not Inception)"}
    timings, images = {}, {}

    # ---- forgetting: CLIP zero-shot + retrieval
    t0 = time.perf_counter()
    data = held_out_dataset(n=size["real"], seed=10_000)
    if clip is not None:
        (c0, tok), (c1, _) = clip, erased_clip
        zs = {}
        full = held_out_dataset()
        for attribute in sorted({a for a, _ in targets}):
            gone = [v for a, v in targets if a == attribute]
            kept = [c for c in classes(attribute) if c not in gone]
            for tag, model in (("before", c0), ("after", c1)):
                acc = zero_shot_accuracy(model, tok, full, attribute)
                zs[f"{attribute}_forget_{tag}"] = sum(acc[c] for c in gone) / len(gone)
                zs[f"{attribute}_retain_{tag}"] = sum(acc[c] for c in kept) / len(kept)
        m["zeroshot"] = zs
        forget = found_mask({"shape": data.shape, "colour": data.colour, "style": data.style}, targets)
        forget_q, retain_q = forget.nonzero().flatten(), (~forget).nonzero().flatten()
        ret = {}
        pixels = data.float_images()
        for tag, model in (("before", c0), ("after", c1)):
            T, I = text_embeddings(model, tok, data.captions), image_embeddings(model, pixels)
            ret[f"forget_{tag}"] = retrieval_recall(T, I, forget_q)
            ret[f"retain_{tag}"] = retrieval_recall(T, I, retain_q)
        m["retrieval"] = ret
    timings["clip"] = time.perf_counter() - t0

    # ---- generations: base and erased on the same seeds
    sets_to_run = {"named": [c.prompt for c in sets["named"]], "paraphrase": [c.prompt for c in sets["paraphrase"]],
                   "retained": [c.prompt for c in sets["retained"]], "misspelled": [p for _, p in sets["misspelled"]]}
    seeds = {"named": seed, "paraphrase": seed + 1000, "retained": seed + 2000, "misspelled": seed}
    t0 = time.perf_counter()
    verdicts = {}
    for tag, pipe in (("base", base_pipe), ("erased", erased_pipe)):
        for name, plist in sets_to_run.items():
            if not plist:
                continue
            cases = [c for c, _ in sets["misspelled"]] if name == "misspelled" else sets[name]
            key = (name, tuple(plist), seeds[name], size["steps"])
            if tag == "base" and cache is not None and key in cache:
                ims = cache[key]
            else:
                ims = generate(pipe, plist, seed=seeds[name], desc=f"{tag}:{name}", **gen)
                if tag == "base" and cache is not None:
                    cache[key] = ims
            images[(tag, name)] = ims
            verdicts[(tag, name)] = _judge_set(judge, ims, cases, targets)
    timings["generate"] = time.perf_counter() - t0

    named_b, named_e = verdicts[("base", "named")], verdicts[("erased", "named")]
    m["forgetting"] = {"found_named_base": named_b["found"], "found_named_erased": named_e["found"], "n": named_b["n"]}
    ret_b, ret_e = verdicts[("base", "retained")], verdicts[("erased", "retained")]
    side = {"retained_shape_base": ret_b.get("shape_acc"), "retained_shape_erased": ret_e.get("shape_acc"),
            "retained_colour_base": ret_b.get("colour_acc"), "retained_colour_erased": ret_e.get("colour_acc"),
            "named_colour_kept_base": named_b.get("colour_acc"), "named_colour_kept_erased": named_e.get("colour_acc"),
            "named_style_kept_base": named_b.get("style_acc"), "named_style_kept_erased": named_e.get("style_acc"),
            "n_retained": ret_b["n"]}
    # related classes: closest other classes by CLIP (or encoder) text similarity, accuracy on the retained prompts
    attribute, value = targets[0]
    if clip is not None:
        related = related_classes(attribute, value, clip=clip[0], tok=clip[1])
    else:
        related = related_classes(attribute, value, tok=base_pipe.tokenizer, text_encoder=base_pipe.text_encoder)
    rel = {}
    for cls, sim in related:
        idx = [i for i, c in enumerate(sets["retained"]) if getattr(c, attribute) == cls]
        if not idx:
            continue
        k = classes(attribute).index(cls)
        acc = {tag: sum(v["labels"][attribute][i] == k for i in idx) / len(idx)
               for tag, v in (("base", ret_b), ("erased", ret_e))}
        rel[cls] = {"similarity": sim, "n": len(idx), **acc}
    side["related"] = rel
    if rel:
        side["related_acc_base"] = sum(r["base"] for r in rel.values()) / len(rel)
        side["related_acc_erased"] = sum(r["erased"] for r in rel.values()) / len(rel)
    keep = {}
    for c in spec.keep:
        a, v = miniworld_attribute(c)
        idx = [i for i, pc in enumerate(sets["retained"]) if getattr(pc, a) == v]
        if idx:
            k = classes(a).index(v)
            keep[c] = {tag: sum(vv["labels"][a][i] == k for i in idx) / len(idx)
                       for tag, vv in (("base", ret_b), ("erased", ret_e))}
    side["keep"] = keep
    m["side_effects"] = side

    # ---- utility
    t0 = time.perf_counter()
    real = data.float_images()
    util = {}
    for tag in ("base", "erased"):
        fake = images[(tag, "retained")]
        util[tag] = judge_fid_kid(judge, real, fake)
        if clip is not None:
            model = clip[0] if tag == "base" else erased_clip[0]
            util[tag]["clip_score"] = clip_score(model, clip[1], fake, sets_to_run["retained"])
    util["clip_score_kind"] = ("mean miniworld-CLIP image-text cosine x100, clamped at 0 (torchmetrics CLIPScore "
                               "refuses a local model folder: 'Invalid model_name_or_path ... Not supported')")
    util["fid_kind"] = "judge-feature FID/KID (Judge.embed), not Inception FID"
    m["utility"] = util
    timings["utility"] = time.perf_counter() - t0

    # ---- robustness
    rob = {}
    for name in ("paraphrase", "misspelled"):
        if ("erased", name) in verdicts:
            rob[name] = {"asr_base": verdicts[("base", name)]["found"], "asr": verdicts[("erased", name)]["found"],
                         "n": verdicts[("erased", name)]["n"]}
    rob["misspellings_used"] = sorted({p for _, p in sets["misspelled"]})
    named_found = named_e["found_per_prompt"]
    named_index = {id(c): i for i, c in enumerate(sets["named"])}
    if attacks_on and sets["adversarial"]:
        t0 = time.perf_counter()
        adv_cases = sets["adversarial"]
        res = attacks.adversarial_search(base_pipe, erased_pipe, [c.prompt for c in adv_cases], word,
                                         n_candidates=size["adv_candidates"], positions=size["adv_positions"],
                                         seed=seed, progress=progress)
        with torch.no_grad():
            ids = attacks.pad_ids(erased_pipe.tokenizer, [r.ids for r in res])
            emb = attacks.encode_ids(erased_pipe.text_encoder, ids)
        ims = generate(erased_pipe, prompt_embeds=emb, seed=seed, desc="adversarial", **gen)  # same seeds as named
        images[("erased", "adversarial")] = ims
        found = found_mask(judge.label(ims), targets).tolist()
        pre = [named_found[named_index[id(c)]] for c in adv_cases]
        rob["adversarial"] = {
            "asr": sum(a or b for a, b in zip(found, pre)) / len(res), "asr_attack_only": sum(found) / len(res),
            "pre_attack": sum(pre) / len(res), "n": len(res), "candidates_per_prompt": res[0].evaluated,
            "prompts": [{"prompt": r.prompt, "adversarial": r.text, "loss_before": r.loss_before,
                         "loss_after": r.loss_after, "found": f} for r, f in zip(res, found)],
            "seconds": time.perf_counter() - t0,
        }
        t0 = time.perf_counter()
        soft = attacks.soft_prompt_attack(base_pipe, erased_pipe, sets["soft_train"], word, steps=size["soft_steps"],
                                          init_word=spec.anchor or ("shape" if attribute == "shape" else None),
                                          seed=seed, progress=progress)
        soft_cases = sets["soft"]
        with attacks.learned_token(erased_pipe.text_encoder, soft.token_id, soft.vector):
            soft_prompts = [attacks.replace_word(c.prompt, word, attacks.PLACEHOLDER) for c in soft_cases]
            ims = generate(erased_pipe, soft_prompts, seed=seed, desc="soft prompt", **gen)
        images[("erased", "soft")] = ims
        found = found_mask(judge.label(ims), targets).tolist()
        pre = [named_found[named_index[id(c)]] for c in soft_cases]
        rob["soft_prompt"] = {
            "asr": sum(a or b for a, b in zip(found, pre)) / len(found), "asr_attack_only": sum(found) / len(found),
            "pre_attack": sum(pre) / len(found), "n": len(found), "objective": soft.objective,
            "loss_before": soft.loss_before, "loss_after": soft.loss_after, "train_prompts": len(sets["soft_train"]),
            "steps": size["soft_steps"], "seconds": time.perf_counter() - t0,
        }
    m["robustness"] = rob
    timings["total"] = time.perf_counter() - t_start
    m["seconds"] = timings
    if extra:
        m.update(extra)
    for v in verdicts.values():
        v.pop("labels", None)
    m["prompt_sets"] = {"named": [c.prompt for c in sets["named"]], "paraphrase": sets_to_run["paraphrase"],
                        "misspelled": sets_to_run["misspelled"], "n_retained": len(sets["retained"])}
    if output_dir is not None:
        write_outputs(m, images, output_dir)
    return m


def evaluate(pipe_name: str = "miniworld", patch=None, spec: ConceptSpec | None = None, quick: bool = False, *,
             output_dir=None, steps: int | None = None, seed: int = 0, prompts=None, progress: bool = True,
             force: bool = False) -> dict:
    """Evaluate ``patch`` (a path; ``None`` evaluates the unerased base) on ``pipe_name`` for ``spec``.

    Raises ValueError (PatchError) before any generation for a patch that does not fit the pipeline, an empty prompt
    set, or a concept the judge cannot label."""
    from .models import load_clip, load_judge, load_pipeline
    from .patch import apply_to_clip
    from .patch_reader import load_patch
    from .pipelines.loading import check_patch, load_patches

    if spec is None:
        raise ValueError("evaluate needs a concept spec (what was erased)")
    build_prompt_sets(spec, quick, prompts)  # concept / prompt checks first
    base = load_pipeline(pipe_name)
    erased = load_pipeline(pipe_name)
    p = None
    if patch is not None:
        p = load_patch(patch)
        check_patch(erased, p, force=force)
    clip = erased_clip = None
    clip_note = None
    try:
        clip = load_clip(pipe_name)
    except Exception:  # no CLIPModel for this model (e.g. a bare pipeline folder): skip CLIP-only metrics
        clip = None
    if clip is not None and p is not None and any(c in p.components for c in ("text_encoder", "clip")):
        c1 = copy.deepcopy(clip[0])
        try:
            apply_to_clip(c1, p, force=force)
            erased_clip = (c1, clip[1])
        except ValueError as err:  # reported, not hidden: CLIP-side metrics then show the unpatched CLIP
            erased_clip, clip_note = None, f"patch not applied to the CLIPModel: {err}"
    if patch is not None:
        load_patches(erased, [patch], force=force)
    extra = {"patch": str(patch) if patch else None, "model": str(pipe_name), "clip_note": clip_note}
    if p is not None:
        extra["patch_bytes"] = Path(patch).stat().st_size
        extra["patch_method"] = p.metadata.get("method")
    return evaluate_pipelines(base, erased, spec, quick=quick, clip=clip, erased_clip=erased_clip or clip,
                              judge=load_judge(), steps=steps, seed=seed, prompts=prompts, output_dir=output_dir,
                              method=(p.metadata.get("method") if p else "base") or "patch", progress=progress,
                              extra=extra)


# ------------------------------------------------------------------------------------------------ report
def _png_b64(fig_or_images) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_images, torch.Tensor):
        from PIL import Image

        ims = fig_or_images
        arr = grid_array(ims, columns=min(8, len(ims)))
        Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.Resampling.NEAREST).save(buf, "PNG")
    else:
        import matplotlib.pyplot as plt

        fig_or_images.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig_or_images)
    return base64.b64encode(buf.getvalue()).decode()


def _bar(labels, series: dict, title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 3.2))
    width = 0.8 / max(1, len(series))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], [100 * (v or 0) for v in vals], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend()
    return fig


def render_html(m: dict, images: dict) -> str:
    """One self-contained page: tables, plots and grids embedded as base64 PNG (no external resources)."""
    fg, se, rob = m.get("forgetting", {}), m.get("side_effects", {}), m.get("robustness", {})
    parts = [f"<h1>erase-diffusion evaluation: {html.escape(', '.join(m.get('erase', [])))} "
             f"({html.escape(str(m.get('method')))})</h1>",
             f"<p>{'quick' if m.get('quick') else 'full'} mode, {m.get('steps')} sampling steps, seed {m.get('seed')}. "
             "Generations are judged by the independent judge CNN. FID/KID are computed in the judge's feature space "
             "(judge-feature FID, not Inception FID).</p>"]
    labels = ["found (named)", "retained shape", "related", "colour kept", "style kept"]
    base = [fg.get("found_named_base"), se.get("retained_shape_base"), se.get("related_acc_base"),
            se.get("named_colour_kept_base"), se.get("named_style_kept_base")]
    er = [fg.get("found_named_erased"), se.get("retained_shape_erased"), se.get("related_acc_erased"),
          se.get("named_colour_kept_erased"), se.get("named_style_kept_erased")]
    parts.append(f'<h2>Forget vs retain</h2><img alt="forget vs retain" src="data:image/png;base64,'
                 f'{_png_b64(_bar(labels, {"base": base, "erased": er}, "forget vs retain (judged)", "%"))}">')
    names = [k for k in ("paraphrase", "misspelled", "adversarial", "soft_prompt") if k in rob]
    if names:
        fig = _bar(names, {"base (unattacked prompt for adversarial / soft)":
                           [rob[k].get("asr_base", fg.get("found_named_base")) for k in names],
                           "erased": [rob[k]["asr"] for k in names]}, "attack success rate", "ASR %")
        parts.append(f'<h2>Attack success</h2><img alt="ASR" src="data:image/png;base64,{_png_b64(fig)}">')
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                   for k, v in m.items() if k not in ("prompt_sets",))
    parts.append(f"<h2>Metrics</h2><table border=1 cellpadding=3>{rows}</table>")
    for name in ("named", "paraphrase", "retained"):
        for tag in ("base", "erased"):
            if (tag, name) in images:
                parts.append(f"<h3>{tag}: {name}</h3><img alt='{tag} {name}' "
                             f"src='data:image/png;base64,{_png_b64(images[(tag, name)][:16])}'>")
    for name in ("adversarial", "soft"):
        if ("erased", name) in images:
            parts.append(f"<h3>erased: {name} attack</h3><img alt='{name}' "
                         f"src='data:image/png;base64,{_png_b64(images[('erased', name)][:16])}'>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>erase-diffusion evaluation</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{font-size:12px;vertical-align:top}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")


def write_outputs(m: dict, images: dict, output_dir) -> dict:
    out = Path(output_dir)
    metrics = write_json(out / "metrics.json", m)
    report = write_atomic(out / "report.html", render_html(m, images))
    return {"metrics": metrics, "report": report}


# ------------------------------------------------------------------------------------------------ CLI
def add_cli_arguments(parser, command: str = "evaluate") -> None:
    parser.add_argument("--patch", default=None, help="patch to evaluate (omit: evaluate the unerased base model)")
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld")
    parser.add_argument("--erase_concept", nargs="+", required=True, help="the erased concept(s)")
    parser.add_argument("--keep", nargs="*", default=[], help="concepts that must keep working")
    parser.add_argument("--prompt", action="append", default=None, help="own prompt naming the concept (repeatable)")
    parser.add_argument("--quick", action="store_true", help="few prompts and steps (CI / smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 quick / 20 full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="load the patch despite a fingerprint mismatch")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace metrics.json / report.html in --output_dir")


def cli_main(args) -> int:
    from .atomic import check_output
    from .patch_reader import load_patch

    # every refusal before the minutes of generation: the outputs, the patch file, the settings
    for name in ("metrics.json", "report.html"):
        check_output(Path(args.output_dir) / name, overwrite=args.overwrite, option="--output_dir")
    if args.steps is not None and not 1 <= args.steps <= 200:
        raise ValueError(f"--steps must be between 1 and 200, got {args.steps}")
    if args.patch is not None:
        load_patch(args.patch)
    spec = miniworld_spec(args.erase_concept, args.keep)
    m = evaluate(args.pretrained_model_name_or_path, args.patch, spec, args.quick, output_dir=args.output_dir,
                 steps=args.steps, seed=args.seed, prompts=args.prompt, force=args.force)
    rob = m["robustness"]
    print(json.dumps({"found_named": m["forgetting"], "retained_shape": m["side_effects"].get("retained_shape_erased"),
                      "fid_judge": m["utility"]["erased"]["fid_judge"],
                      "asr": {k: v["asr"] for k, v in rob.items() if isinstance(v, dict)}}, indent=2))
    print(f"wrote {Path(args.output_dir) / 'metrics.json'} and {Path(args.output_dir) / 'report.html'}")
    return 0
