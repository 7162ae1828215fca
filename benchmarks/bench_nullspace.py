"""Benchmark of closed-form nullspace erasure (issue 5). Prints a table; writes benchmarks/results/nullspace.json and
benchmarks/results/nullspace_alpha_sweep.png.

    python benchmarks/bench_nullspace.py [--concept circle] [--anchor shape] [--steps 20] [--no-generations]

Measures: time for one concept on the miniature world (target ≤ 1 s) and on a CLIP-L-sized random text encoder
(target ≤ 20 s); CLIP zero-shot accuracy of the erased / retained classes (α = 1 and a sweep); generations judged by
the miniature world's judge (erased class named directly and by paraphrase, retained classes); the protected prompts'
text-encoder output change.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from erase_diffusion import measure, nullspace as ns  # noqa: E402
from erase_diffusion.miniworld import domain  # noqa: E402
from erase_diffusion.models import load_clip, load_judge, load_pipeline  # noqa: E402
from erase_diffusion.patch import apply_to_clip, load_patch, patch_deltas  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def apply_pipeline_patch(pipe, path, strength=1.0):
    """Merge the patch into a copy of the pipeline's text encoder(s) (equal to diffusers' load; see the tests)."""
    pipe = copy.copy(pipe)
    patch = load_patch(path)
    for comp in patch.components:
        te = copy.deepcopy(getattr(pipe, comp))
        modules = dict(ns.clip_core(te).named_modules())
        for name, delta in patch_deltas(patch, comp).items():
            key = name.removeprefix("text_model.")  # path inside clip_core(te), on both layouts
            with torch.no_grad():
                modules[key].weight += strength * delta.to(modules[key].weight)
        setattr(pipe, comp, te)
    return pipe


def time_clip_l(tok, repeats=1):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    te = CLIPTextModel(cfg).eval()
    t0 = time.perf_counter()
    edit = ns.encoder_edit(te, tok, ["circle"], ["square", "star", "heart"], synonyms={"circle": ("disc",)},
                           prompts=ns.PromptSet(), anchor="")
    seconds = time.perf_counter() - t0
    frames = ns.PromptSet().frames()
    prot = [b + w + a for w in ("square", "star", "heart") for b, a in frames]
    base = ns.conditioning(te, tok, prot)
    fc2 = ns.clip_core(te).encoder.layers[edit.layer].mlp.fc2
    with torch.no_grad():
        fc2.weight += edit.delta
    diff = float((ns.conditioning(te, tok, prot) - base).abs().max())
    return {"seconds": seconds, "protected_max_abs_diff": diff, **{k: edit.stats[k] for k in
            ("protected_rank", "protected_exact_rank", "protection", "target_residual", "n_concept_prompts")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--anchor", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-generations", action="store_true")
    ap.add_argument("--skip-clip-l", action="store_true")
    args = ap.parse_args(argv)
    concept = args.concept
    retained = [s for s in domain.SHAPES if s != concept]
    out = {"concept": concept, "retained": retained}
    tmp = Path(tempfile.mkdtemp(prefix="bench-ns-"))
    from erase_diffusion.models import ModelNotFoundError, resolve

    try:
        resolve("miniworld", "pipeline"), resolve("miniworld", "clip")
    except ModelNotFoundError as err:  # the miniature world is not built: only the CLIP-L-sized timing runs
        from tiny_models import tokenizer

        out["miniworld"] = f"missing: {err}"
        out["clip_l"] = time_clip_l(tokenizer())
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "nullspace.json").write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
        return 1

    # --- pipeline erasure: time, protected prompts
    pipe = load_pipeline("miniworld")
    protect = [s for s in retained if s != args.anchor]
    t0 = time.perf_counter()
    path = ns.erase("miniworld", [concept], protect=protect, anchor=args.anchor, output=tmp / "p.safetensors",
                    pipe=pipe)
    out["time_miniworld_s"] = time.perf_counter() - t0
    settings = load_patch(path).metadata.get("settings", {})
    out["pipeline_stats"] = settings.get("stats", {})
    edited = apply_pipeline_patch(pipe, path)
    syn = ns.default_synonyms(protect, True)
    prot_prompts = [b + w + a for p in protect for w in (p, *syn[p]) for b, a in ns.PromptSet(miniworld=True).frames()]
    base_c = ns.conditioning(pipe.text_encoder, pipe.tokenizer, prot_prompts)
    new_c = ns.conditioning(edited.text_encoder, pipe.tokenizer, prot_prompts)
    out["protected_prompts"] = len(prot_prompts)
    out["protected_max_abs_diff"] = float((new_c - base_c).abs().max())
    out["protected_mean_abs_diff"] = float((new_c - base_c).abs().mean())
    out["protected_rel_norm_diff"] = float((new_c - base_c).norm() / base_c.norm())

    # --- CLIP zero-shot (target "clip"), α sweep
    clip_model, clip_tok = load_clip("miniworld")
    data = measure.held_out_dataset(n=576)
    t0 = time.perf_counter()
    cpath = ns.erase("miniworld", [concept], protect=retained, target="clip", output=tmp / "c.safetensors",
                     clip=(clip_model, clip_tok))
    out["time_clip_miniworld_s"] = time.perf_counter() - t0
    base_acc = measure.zero_shot_accuracy(clip_model, clip_tok, data)
    sweep = []
    for a in ALPHAS:
        m = copy.deepcopy(clip_model)
        apply_to_clip(m, cpath, strength=a)  # ΔW is linear in α: strength a == erase(..., strength=a)
        acc = measure.zero_shot_accuracy(m, clip_tok, data)
        sweep.append({"alpha": a, "forget": acc[concept], "retain": sum(acc[s] for s in retained) / len(retained),
                      "retain_max_drop": max(base_acc[s] - acc[s] for s in retained)})
    out["clip_base"] = base_acc
    out["clip_sweep"] = sweep

    # --- pipeline α sweep on the text-encoder side (cheap): distance of concept conditioning to the anchor's
    anchor_word = settings.get("anchor", "shape")
    cases = measure.eval_prompts(shapes=[concept], per_pair=1)
    cprompts = [c.prompt for c in cases]
    aprompts = [c.prompt.replace(concept, anchor_word) for c in cases]
    target = ns.conditioning(pipe.text_encoder, pipe.tokenizer, aprompts)
    d0 = (ns.conditioning(pipe.text_encoder, pipe.tokenizer, cprompts) - target).norm()
    out["pipeline_sweep"] = []
    for a in ALPHAS:
        e = apply_pipeline_patch(pipe, path, strength=a)
        d = (ns.conditioning(e.text_encoder, pipe.tokenizer, cprompts) - target).norm()
        out["pipeline_sweep"].append({"alpha": a, "dist_to_anchor_rel": float(d / d0)})

    # --- generations judged
    if not args.no_generations:
        judge = load_judge("miniworld")
        all_cases = measure.eval_prompts(per_pair=1)  # 8 shapes × 8 colours
        para = measure.eval_prompts(shapes=[concept], per_pair=1, paraphrase=True)
        gens = {}
        for name, p in (("base", pipe), ("erased", edited)):
            t0 = time.perf_counter()
            imgs = measure.generate(p, [c.prompt for c in all_cases + para], steps=args.steps)
            r_all = measure.judge_generations(judge, imgs[: len(all_cases)], all_cases)
            r_para = measure.judge_generations(judge, imgs[len(all_cases):], para)
            gens[name] = {"erased_shape_found": r_all["shape_per_class"][concept],
                          "retained_shape_found": sum(r_all["shape_per_class"][s] for s in retained) / len(retained),
                          "retained_per_class": {s: r_all["shape_per_class"][s] for s in retained},
                          "paraphrase_shape_found": r_para["shape"], "colour": r_all["colour"],
                          "seconds": time.perf_counter() - t0}
            measure.save_grid(imgs, RESULTS / f"nullspace_{name}.png")
        out["generations"] = gens

    if not args.skip_clip_l:
        out["clip_l"] = time_clip_l(pipe.tokenizer)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nullspace.json").write_text(json.dumps(out, indent=2))
    plot(out)
    table(out)
    return 0


def plot(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    a = [r["alpha"] for r in out["clip_sweep"]]
    ax[0].plot(a, [100 * r["forget"] for r in out["clip_sweep"]], "o-", label=f"erased ({out['concept']})")
    ax[0].plot(a, [100 * r["retain"] for r in out["clip_sweep"]], "s-", label="retained (mean)")
    ax[0].set(xlabel="α", ylabel="CLIP zero-shot accuracy (%)", title="CLIP (visual_projection)")
    ax[0].legend()
    ax[1].plot(a, [r["dist_to_anchor_rel"] for r in out["pipeline_sweep"]], "o-", label="concept → anchor distance")
    ax[1].axhline(out["protected_rel_norm_diff"], color="gray", ls="--", label="protected change (α=1)")
    ax[1].set(xlabel="α", ylabel="relative", title="pipeline (text encoder fc2)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "nullspace_alpha_sweep.png", dpi=100)


def table(out):
    rows = [("time, one concept, miniworld pipeline (s)", out["time_miniworld_s"], "≤ 1"),
            ("time, one concept, miniworld CLIP (s)", out["time_clip_miniworld_s"], "≤ 1")]
    if "clip_l" in out:
        rows.append(("time, one concept, CLIP-L-sized encoder (s)", out["clip_l"]["seconds"], "≤ 20"))
        rows.append(("CLIP-L-sized: protected max |Δ|", out["clip_l"]["protected_max_abs_diff"], "≤ 1e-4"))
    s1 = out["clip_sweep"][-1]
    rows += [("CLIP zero-shot erased class, α=1 (%)", 100 * s1["forget"], "≤ 5"),
             ("CLIP zero-shot erased class, base (%)", 100 * out["clip_base"][out["concept"]], ""),
             ("CLIP retained mean, α=1 (%)", 100 * s1["retain"], ""),
             ("CLIP retained max drop, α=1 (points)", 100 * s1["retain_max_drop"], "≤ 1"),
             ("protected prompts max |Δ| (final states)", out["protected_max_abs_diff"], "≤ 1e-4"),
             ("protected prompts rel ‖Δ‖", out["protected_rel_norm_diff"], "")]
    if "generations" in out:
        g = out["generations"]
        rows += [("gen: erased shape found, base → erased (%)",
                  f"{100 * g['base']['erased_shape_found']:.1f} → {100 * g['erased']['erased_shape_found']:.1f}", "≤ 5"),
                 ("gen: paraphrase shape found (%)",
                  f"{100 * g['base']['paraphrase_shape_found']:.1f} → {100 * g['erased']['paraphrase_shape_found']:.1f}", "≤ 5"),
                 ("gen: retained shapes found (%)",
                  f"{100 * g['base']['retained_shape_found']:.1f} → {100 * g['erased']['retained_shape_found']:.1f}",
                  "within 2")]
    print(f"{'metric':50s} {'value':>22s}  target")
    for name, v, tgt in rows:
        print(f"{name:50s} {v if isinstance(v, str) else f'{v:.4g}':>22s}  {tgt}")


if __name__ == "__main__":
    sys.exit(main())
