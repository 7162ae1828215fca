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
  misspellings, a bounded discrete adversarial search and the soft-prompt (learned-token) attack suite — see
  ``attacks.py`` and ``robustness.py`` (its ``strongest``: any attack of the suite, per prompt).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from . import attacks, robustness
from .concepts import ConceptSpec, miniworld_attribute
from .measure import (PromptCase, classes, clip_score, concept_cases, empty_prompt_change, empty_prompt_states,
                      found_mask, generate, held_out_dataset, image_embeddings, judge_fid_kid, related_classes,
                      retrieval_recall, text_embeddings, zero_shot_split)
from .miniworld import domain
from .models import load_clip, load_judge, load_pipeline
from .patch import apply_to_clip
from .patch_reader import load_patch
from .pipelines.loading import check_patch, load_patches
from .report import write_outputs
from .stats import mcnemar, rate

SIZES = {  # quick: CI / smoke; full: the README figures. named / paraphrase / heldout / retained: prompts per set
    True: dict(named=64, retained=64, misspell=8, adv=2, adv_candidates=16, adv_positions=2, soft=4, soft_steps=40,
               soft_restarts=1, real=128, steps=10, batch=64),
    False: dict(named=128, retained=128, misspell=16, adv=8, adv_candidates=64, adv_positions=3, soft=64,
                soft_steps=robustness.BUDGET["steps"], soft_restarts=robustness.BUDGET["restarts"], real=512,
                steps=20, batch=64),
}


# ------------------------------------------------------------------------------------------------ pure pieces
def validate_spec(spec: ConceptSpec) -> list[tuple[str, str]]:
    """(attribute, value) per erased concept; ValueError for anything the judge cannot label."""
    for c in spec.keep:
        miniworld_attribute(c)
    try:
        return [miniworld_attribute(c) for c in spec.erase]
    except ValueError as err:
        raise ValueError(f"the judge cannot label this concept, so its erasure cannot be evaluated: {err}") from None


# ------------------------------------------------------------------------------------------------ prompt sets
def build_prompt_sets(spec: ConceptSpec, quick: bool, prompts: list[str] | None = None) -> dict:
    """The evaluation's prompt sets, from the one builder (``measure.concept_cases``): ``named`` (or the caller's
    ``prompts``), ``paraphrase``, ``heldout`` (phrasings no eraser fits on), ``retained``; the misspelled and
    attacked prompts edit the word the concept is named by in the named prompts."""
    targets = validate_spec(spec)
    size = SIZES[bool(quick)]
    cases = concept_cases(spec, n=size["named"], n_retained=size["retained"], seed=1)
    if prompts is not None:
        if not [p for p in prompts if p and p.strip()]:
            raise ValueError("the prompt set is empty: pass at least one prompt naming the erased concept")
        attribute, value = targets[0]
        named = [PromptCase(p, value if attribute == "shape" else "", value if attribute == "colour" else "",
                            value if attribute == "style" else None, value) for p in prompts if p.strip()]
    else:
        named = [c for concept in spec.erase for c in cases["named"][concept]]
    word = spec.erase[0]
    worded = [c for c in named if attacks.contains_word(c.prompt, word)]
    typos = attacks.misspellings(word, n=max(1, size["misspell"] // 2), seed=0)
    misspelled = [(c, attacks.replace_word(c.prompt, word, typos[k % len(typos)]))
                  for k, c in enumerate(worded[: size["misspell"]])]
    return {"targets": targets, "word": word, "named": named,
            "paraphrase": [c for cs in cases["paraphrase"].values() for c in cs],
            "heldout": [c for cs in cases["heldout"].values() for c in cs], "retained": cases["retained"],
            "misspelled": misspelled, "adversarial": worded[: size["adv"]]}


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
            correct = labels[name][idx] == torch.tensor([truth[i] for i in idx])
            out[f"{name}_acc"], out[f"{name}_acc_ci95"] = correct.float().mean().item(), rate(correct)["ci95"]
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
    reused across calls with the same ``base_pipe`` (base generations are then made once, e.g. in a benchmark).

    Six numbered steps, each a call of a named helper below, kept in one function so the order of the measurements
    (and of the random state the attacks draw) reads top to bottom."""
    # 1. Every input check happens before any generation.
    t_start = time.perf_counter()
    size = dict(SIZES[bool(quick)])
    if steps is not None:
        size["steps"] = int(steps)
    if size["steps"] < 1:
        raise ValueError("steps must be at least 1")
    sets = build_prompt_sets(spec, quick, prompts)
    if attacks_on and sets["adversarial"]:
        attacks.check_attack(base_pipe, erased_pipe, [c.prompt for c in sets["adversarial"]], sets["word"],
                             n_candidates=size["adv_candidates"], positions=size["adv_positions"],
                             steps=size["soft_steps"], restarts=size["soft_restarts"])
    judge = judge if judge is not None else load_judge()
    erased_clip = erased_clip if erased_clip is not None else clip
    gen = dict(steps=size["steps"], batch_size=size["batch"], progress=progress)
    m: dict = {"method": method, "quick": bool(quick), "erase": spec.erase, "keep": spec.keep,
               "steps": size["steps"], "seed": seed, "feature_space": "judge CNN penultimate (not Inception)"}
    timings = {}

    # 2. Forgetting as CLIP sees it: zero-shot and retrieval on held-out images.
    t0 = time.perf_counter()
    data = held_out_dataset(n=size["real"], seed=10_000)
    if clip is not None:
        m["zeroshot"], m["retrieval"] = clip_metrics(clip, erased_clip, data, sets["targets"])
    timings["clip"] = time.perf_counter() - t0

    # 3. Generations: base and erased on the same seeds, judged.
    t0 = time.perf_counter()
    images, verdicts = generate_and_judge(base_pipe, erased_pipe, sets, judge, seed, gen, cache)
    timings["generate"] = time.perf_counter() - t0
    named_b, named_e = verdicts[("base", "named")], verdicts[("erased", "named")]
    m["forgetting"] = {"found_named_base": named_b["found"], "found_named_erased": named_e["found"], "n": named_b["n"],
                       "found_named_base_ci95": rate(named_b["found_per_prompt"])["ci95"],
                       "found_named_erased_ci95": rate(named_e["found_per_prompt"])["ci95"],
                       "paired": mcnemar(named_b["found_per_prompt"], named_e["found_per_prompt"])}
    if ("erased", "heldout") in verdicts:  # phrasings no eraser fits on, reported apart from the named set
        held_b, held_e = verdicts[("base", "heldout")], verdicts[("erased", "heldout")]
        m["forgetting"]["heldout"] = {"found_base": rate(held_b["found_per_prompt"]),
                                      "found_erased": rate(held_e["found_per_prompt"]),
                                      "paired": mcnemar(held_b["found_per_prompt"], held_e["found_per_prompt"])}
    m["side_effects"] = side_effects(verdicts, sets, spec, clip, base_pipe)
    m["side_effects"]["empty_prompt_change"] = empty_prompt_change(empty_prompt_states(base_pipe),
                                                                   empty_prompt_states(erased_pipe))

    # 4. Utility: judge-feature FID / KID and CLIP score of the retained prompts' generations.
    t0 = time.perf_counter()
    m["utility"] = utility(judge, data, images, sets, clip, erased_clip)
    timings["utility"] = time.perf_counter() - t0

    # 5. Robustness: paraphrases and misspellings (generated above), then the attacks.
    rob = {name: {"asr_base": verdicts[("base", name)]["found"], "asr": verdicts[("erased", name)]["found"],
                  "n": verdicts[("erased", name)]["n"],
                  "asr_ci95": rate(verdicts[("erased", name)]["found_per_prompt"])["ci95"]}
           for name in ("paraphrase", "misspelled") if ("erased", name) in verdicts}
    rob["misspellings_used"] = sorted({p for _, p in sets["misspelled"]})
    if attacks_on and sets["adversarial"]:
        rob.update(run_attacks(base_pipe, erased_pipe, sets, judge, named_e["found_per_prompt"], size, seed, gen,
                               images, progress))
    m["robustness"] = rob

    # 6. Record and report.
    timings["total"] = time.perf_counter() - t_start
    m["seconds"] = timings
    if extra:
        m.update(extra)
    m["prompt_sets"] = {name: [c.prompt for c in sets[name]] for name in ("named", "paraphrase", "heldout", "retained")}
    m["prompt_sets"]["misspelled"] = [p for _, p in sets["misspelled"]]
    if output_dir is not None:
        write_outputs(m, images, output_dir)
    return m


def clip_metrics(clip, erased_clip, data, targets) -> tuple[dict, dict]:
    """(zero-shot accuracy of the erased / other classes, retrieval recall on forget / retain captions), before and
    after, on the held-out images (zero-shot on the full held-out set, retrieval on ``data``)."""
    (c0, tok), (c1, _) = clip, erased_clip
    zs = {}
    full = held_out_dataset()
    for tag, model in (("before", c0), ("after", c1)):
        for attribute, (forget, retain) in zero_shot_split(model, tok, full, targets).items():
            zs[f"{attribute}_forget_{tag}"], zs[f"{attribute}_retain_{tag}"] = forget, retain
    forget = found_mask({"shape": data.shape, "colour": data.colour, "style": data.style}, targets)
    forget_q, retain_q = forget.nonzero().flatten(), (~forget).nonzero().flatten()
    ret = {}
    pixels = data.float_images()
    for tag, model in (("before", c0), ("after", c1)):
        T, I = text_embeddings(model, tok, data.captions), image_embeddings(model, pixels)
        ret[f"forget_{tag}"] = retrieval_recall(T, I, forget_q)
        ret[f"retain_{tag}"] = retrieval_recall(T, I, retain_q)
    return zs, ret


def generate_and_judge(base_pipe, erased_pipe, sets: dict, judge, seed: int, gen: dict, cache: dict | None):
    """Generations of the named / paraphrase / retained / misspelled sets by both pipelines with shared seeds, and
    their judged verdicts: ({(tag, set): images}, {(tag, set): verdict}). Base generations come from ``cache`` when
    it holds them."""
    prompts = {name: [c.prompt for c in sets[name]] for name in ("named", "paraphrase", "heldout", "retained")}
    prompts["misspelled"] = [p for _, p in sets["misspelled"]]
    seeds = {"named": seed, "paraphrase": seed + 1000, "retained": seed + 2000, "heldout": seed + 3000,
             "misspelled": seed}
    images, verdicts = {}, {}
    for tag, pipe in (("base", base_pipe), ("erased", erased_pipe)):
        for name, plist in prompts.items():
            if not plist:
                continue
            cases = [c for c, _ in sets["misspelled"]] if name == "misspelled" else sets[name]
            key = (name, tuple(plist), seeds[name], gen["steps"])
            if tag == "base" and cache is not None and key in cache:
                ims = cache[key]
            else:
                ims = generate(pipe, plist, seed=seeds[name], desc=f"{tag}:{name}", **gen)
                if tag == "base" and cache is not None:
                    cache[key] = ims
            images[(tag, name)] = ims
            verdicts[(tag, name)] = _judge_set(judge, ims, cases, sets["targets"])
    return images, verdicts


def _accuracy_on(verdicts: dict, cases: list, attribute: str, value: str) -> dict | None:
    """Judged accuracy, base and erased, on the retained prompts whose ``attribute`` is ``value`` (None: none)."""
    idx = [i for i, c in enumerate(cases) if getattr(c, attribute) == value]
    if not idx:
        return None
    k = classes(attribute).index(value)
    return {"n": len(idx), **{tag: sum(verdicts[(tag, "retained")]["labels"][attribute][i] == k for i in idx) / len(idx)
                              for tag in ("base", "erased")}}


def side_effects(verdicts: dict, sets: dict, spec: ConceptSpec, clip, base_pipe) -> dict:
    """Retained accuracy, the erased prompts' other attributes, the closest other classes ("related", by CLIP or
    text-encoder similarity) and the kept concepts, base vs erased."""
    named_b, named_e = verdicts[("base", "named")], verdicts[("erased", "named")]
    ret_b, ret_e = verdicts[("base", "retained")], verdicts[("erased", "retained")]
    side = {"retained_shape_base": ret_b.get("shape_acc"), "retained_shape_erased": ret_e.get("shape_acc"),
            "retained_colour_base": ret_b.get("colour_acc"), "retained_colour_erased": ret_e.get("colour_acc"),
            "named_colour_kept_base": named_b.get("colour_acc"), "named_colour_kept_erased": named_e.get("colour_acc"),
            "named_style_kept_base": named_b.get("style_acc"), "named_style_kept_erased": named_e.get("style_acc"),
            "retained_shape_erased_ci95": ret_e.get("shape_acc_ci95"),
            "named_colour_kept_erased_ci95": named_e.get("colour_acc_ci95"), "n_retained": ret_b["n"]}
    attribute, value = sets["targets"][0]
    if clip is not None:
        related = related_classes(attribute, value, clip=clip[0], tok=clip[1])
    else:
        related = related_classes(attribute, value, tok=base_pipe.tokenizer, text_encoder=base_pipe.text_encoder)
    rel = {}
    for cls, sim in related:
        acc = _accuracy_on(verdicts, sets["retained"], attribute, cls)
        if acc is not None:
            rel[cls] = {"similarity": sim, **acc}
    side["related"] = rel
    if rel:
        side["related_acc_base"] = sum(r["base"] for r in rel.values()) / len(rel)
        side["related_acc_erased"] = sum(r["erased"] for r in rel.values()) / len(rel)
    keep = {}
    for c in spec.keep:
        acc = _accuracy_on(verdicts, sets["retained"], *miniworld_attribute(c))
        if acc is not None:
            keep[c] = {"base": acc["base"], "erased": acc["erased"]}
    side["keep"] = keep
    return side


def utility(judge, data, images: dict, sets: dict, clip, erased_clip) -> dict:
    real = data.float_images()
    util = {}
    for tag in ("base", "erased"):
        fake = images[(tag, "retained")]
        util[tag] = judge_fid_kid(judge, real, fake)
        if clip is not None:
            model = clip[0] if tag == "base" else erased_clip[0]
            util[tag]["clip_score"] = clip_score(model, clip[1], fake, [c.prompt for c in sets["retained"]])
    util["clip_score_kind"] = ("mean miniworld-CLIP image-text cosine x100, clamped at 0 (torchmetrics CLIPScore "
                               "refuses a local model folder: 'Invalid model_name_or_path ... Not supported')")
    util["fid_kind"] = "judge-feature FID/KID (Judge.embed), not Inception FID"
    return util


def _attack_asr(found: list[bool], pre: list[bool]) -> dict:
    """An attack's success rate: the unattacked prompt's success counts too (UnlearnDiffAtk's rule)."""
    n, success = len(found), [a or b for a, b in zip(found, pre)]
    return {"asr": sum(success) / n, "asr_ci95": rate(success)["ci95"], "asr_attack_only": sum(found) / n,
            "pre_attack": sum(pre) / n, "n": n}


def run_attacks(base_pipe, erased_pipe, sets: dict, judge, named_found: list[bool], size: dict, seed: int, gen: dict,
                images: dict, progress: bool) -> dict:
    """The discrete adversarial search on the first named prompts (each with its named prompt's seed, so its
    pre-attack success is known) and the soft-prompt attack suite; their generations are added to ``images``."""
    word, targets = sets["word"], sets["targets"]
    named_index = {id(c): i for i, c in enumerate(sets["named"])}
    out = {}
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
    out["adversarial"] = {
        **_attack_asr(found, [named_found[named_index[id(c)]] for c in adv_cases]),
        "candidates_per_prompt": res[0].evaluated,
        "prompts": [{"prompt": r.prompt, "adversarial": r.text, "loss_before": r.loss_before,
                     "loss_after": r.loss_after, "found": f} for r, f in zip(res, found)],
        "seconds": time.perf_counter() - t0,
    }
    # the soft-prompt attacks: the whole suite, on its own prompts naming the concept (robustness.py)
    budget = dict(steps=size["soft_steps"], lr=5e-2, restarts=size["soft_restarts"])
    suite = robustness.attack_suite(base_pipe, erased_pipe, word, judge, n=size["soft"], budget=budget,
                                    steps=gen["steps"], seed=seed, images=images, progress=progress)
    out["soft_prompt"] = {"asr": suite["strongest"]["rate"], "asr_ci95": suite["strongest"]["ci95"],
                          "n": suite["strongest"]["n"], "suite": suite}
    return out


def evaluate(pipe_name: str = "miniworld", patch=None, spec: ConceptSpec | None = None, quick: bool = False, *,
             output_dir=None, steps: int | None = None, seed: int = 0, prompts=None, progress: bool = True,
             force: bool = False) -> dict:
    """Evaluate ``patch`` (a path; ``None`` evaluates the unerased base) on ``pipe_name`` for ``spec``.

    Raises ValueError (PatchError) before any generation for a patch that does not fit the pipeline, an empty prompt
    set, or a concept the judge cannot label."""
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
