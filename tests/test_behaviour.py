"""Behaviour on the miniature world: the product erases, and the evaluation tells the truth.

Each test fails when the piece it guards is broken on purpose (issue 17): the sign of CLIPErase's forgetting term
(training would strengthen the concept), the evaluation's found-mask (every forget / attack figure reversed), the
patch strength (a patch that changes nothing). Small prompt sets and few sampling steps keep it to CI time; the
thresholds leave a wide margin to the measured values (noted beside each).

Measured on 2 shared CPU cores: base generations show circle in 15/16 named and 14/16 paraphrase prompts (10 steps);
CLIPErase (`--target clip`) at 100 steps takes zero-shot circle from 99 % to 0 % with the retained classes at 96 % before
and 97 % after.

Checked by breaking a scratch copy: ``forgetting_dot`` with the sign flipped fails the zero-shot test (circle stays
99 %), ``token_forgetting`` flipped failed the generation test (when it was measured); ``found_mask`` and ``miniworld_metrics``' found share
inverted fail the three evaluator tests; ``save_patch`` writing B × 0 (strength 0) fails every test that expects an
erasure.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from erase_diffusion import evaluate as ev
from erase_diffusion import measure
from erase_diffusion.concepts import miniworld_spec
from erase_diffusion.models import load_clip, load_judge, load_pipeline
from erase_diffusion.nullspace import erase
from erase_diffusion.patch import apply_to_clip
from erase_diffusion.patch_reader import load_patch
from erase_diffusion.pipelines.loading import load_patches
from erase_diffusion.training import main

pytestmark = pytest.mark.slow  # generates images with the trained miniature world

CONCEPT = "circle"
RETAINED = [s for s in measure.classes("shape") if s != CONCEPT]
STEPS = 10  # sampling steps for every generation here
CLIPERASE_STEPS = 40  # the pipeline default (generations: 0/16 circle)
CLIP_TARGET_STEPS = 100  # --target clip: 60 steps leave zero-shot circle at 28 %, 100 take it to 0 %

# prompt sets: 16 naming circle, 16 paraphrasing it ("disc", "round shape"), 28 naming the other shapes
NAMED = measure.eval_prompts(shapes=(CONCEPT,), per_pair=2, seed=1)
PARAPHRASE = measure.eval_prompts(shapes=(CONCEPT,), per_pair=2, seed=1, paraphrase=True)
KEPT = [c for c in measure.eval_prompts(per_pair=1, seed=2) if c.shape != CONCEPT][::2]


def _retain(acc: dict) -> float:
    return sum(acc[c] for c in RETAINED) / len(RETAINED)


def judged(pipe, judge) -> dict:
    """Share of generations the judge labels circle (named / paraphrase prompts) and retained shapes judged right."""
    out = {}
    for name, cases in (("named", NAMED), ("paraphrase", PARAPHRASE), ("kept", KEPT)):
        images = measure.generate(pipe, [c.prompt for c in cases], steps=STEPS)
        labels = judge.label(images)
        if name == "kept":
            out["kept_shape"] = measure.judge_generations(judge, images, cases, labels)["shape"]
        else:
            out[f"circle_{name}"] = (labels["shape"] == measure.classes("shape").index(CONCEPT)).float().mean().item()
    return out


@pytest.fixture(scope="module")
def world():
    """The miniworld's CLIP, held-out images, judge, and the base model's zero-shot and judged figures."""
    clip, tok = load_clip("miniworld")
    data = measure.held_out_dataset()
    judge = load_judge("miniworld")
    base_pipe = load_pipeline("miniworld")
    return {"clip": clip, "tok": tok, "data": data, "judge": judge, "base_pipe": base_pipe,
            "zero_shot": measure.zero_shot_accuracy(clip, tok, data), "judged": judged(base_pipe, judge)}


def zero_shot_with(world, patch, strength: float = 1.0) -> dict:
    clip = copy.deepcopy(world["clip"])
    apply_to_clip(clip, patch, strength)
    return measure.zero_shot_accuracy(clip, world["tok"], world["data"])


def judged_with(world, patch) -> dict:
    pipe = load_pipeline("miniworld")
    load_patches(pipe, [patch])
    return judged(pipe, world["judge"])


def test_base_world_shows_the_concept(world):
    """The premise of every test below: the base model knows circle (else "erased" would mean nothing)."""
    zs, g = world["zero_shot"], world["judged"]
    assert zs[CONCEPT] >= 0.95 and _retain(zs) >= 0.9  # measured 99.3 % / 96.1 %
    assert g["circle_named"] >= 0.8 and g["circle_paraphrase"] >= 0.7  # 94 % / 88 %
    assert g["kept_shape"] >= 0.9  # 100 %


# ----------------------------------------------------------------------------------------------------------- CLIPErase
@pytest.fixture(scope="module")
def cliperase_patch(tmp_path_factory):
    out = tmp_path_factory.mktemp("cliperase")
    metrics = main(["--erase_concept", CONCEPT, "--max_train_steps", str(CLIPERASE_STEPS),
                    "--validation_steps", "0", "--report_to", "none", "--eval_generations", "0",
                    "--checkpointing_steps", "1000", "--output_dir", str(out)])
    return Path(metrics["patch"])


@pytest.fixture(scope="module")
def cliperase_clip_patch(tmp_path_factory):
    """CLIPErase for CLIP zero-shot use (``--target clip``): the paper's unbounded forgetting. The pipeline default
    ('anchored') stops at the anchored caption's cosine, so zero-shot there ties circle with its anchor by design."""
    out = tmp_path_factory.mktemp("cliperase_clip")
    metrics = main(["--erase_concept", CONCEPT, "--target", "clip", "--max_train_steps", str(CLIP_TARGET_STEPS),
                    "--report_to", "none", "--eval_generations", "0", "--checkpointing_steps", "1000",
                    "--output_dir", str(out)])
    return Path(metrics["patch"])


def test_cliperase_lowers_zero_shot_of_the_erased_class_only(world, cliperase_clip_patch):
    before, after = world["zero_shot"], zero_shot_with(world, cliperase_clip_patch)
    assert after[CONCEPT] <= 0.2, after  # measured 0 % (base 99 %)
    assert before[CONCEPT] - after[CONCEPT] >= 0.7
    assert _retain(after) >= _retain(before) - 0.05, after  # measured 96.1 % → 96.7 %
    assert min(after[c] for c in RETAINED) >= 0.75  # no retained class collapses (lowest: cross 90 → 83 %)


def test_cliperase_generations_lose_the_concept_and_keep_the_rest(world, cliperase_patch):
    before, after = world["judged"], judged_with(world, cliperase_patch)
    assert after["circle_named"] <= 0.25, after  # measured 0/16 (base 15/16)
    assert after["circle_paraphrase"] <= 0.25, after  # 0/16 (base 14/16)
    assert after["kept_shape"] >= before["kept_shape"] - 0.1, after  # 28/28 → 28/28


# --------------------------------------------------------------------------------------------------------- closed form
@pytest.fixture(scope="module")
def nullspace_patches(tmp_path_factory):
    out = tmp_path_factory.mktemp("nullspace")
    return {s: erase("miniworld", [CONCEPT], strength=s, output=out / f"circle-{s}.safetensors") for s in (0.0, 1.0)}


def test_nullspace_strength_zero_changes_nothing(world, nullspace_patches):
    pipe = load_pipeline("miniworld")
    ids = pipe.tokenizer(["a red circle", "a blue square", ""], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        load_patches(pipe, [nullspace_patches[0.0]])
        after = pipe.text_encoder(ids)[0]
    assert torch.allclose(before, after, atol=1e-6)
    assert zero_shot_with(world, nullspace_patches[0.0]) == pytest.approx(world["zero_shot"], abs=1e-6)


def test_nullspace_strength_one_erases(world, nullspace_patches):
    patch = nullspace_patches[1.0]
    g0, g1 = world["judged"], judged_with(world, patch)
    assert g1["circle_named"] <= 0.1 and g1["circle_paraphrase"] <= 0.1, g1  # measured 0/16, 0/16
    assert g1["kept_shape"] >= g0["kept_shape"] - 0.1, g1  # 28/28 → 27/28
    # the edit moves what the text encoder says about circle: its zero-shot falls, the retained classes stay —
    # except the anchor, whose name circle's text now reads like, so zero-shot confuses the two (by construction)
    anchor = load_patch(patch).metadata["settings"]["anchor"][CONCEPT]
    zs0, zs1 = world["zero_shot"], zero_shot_with(world, patch)
    assert zs1[CONCEPT] <= zs0[CONCEPT] - 0.5, zs1  # measured 99 % → 0 %
    others = [c for c in RETAINED if c != anchor]
    assert sum(zs1[c] for c in others) >= sum(zs0[c] for c in others) - 0.05 * len(others), zs1  # 95.8 → 97.9 %


# ----------------------------------------------------------------------------------------------------------- evaluator
SPEC = miniworld_spec([CONCEPT])


@pytest.fixture(scope="module")
def base_cache():
    return {}  # base generations shared by the evaluator tests (same prompts, seeds and steps)


def test_evaluator_reports_no_change_for_base_vs_base(world, base_cache, monkeypatch):
    # the attacks at their smallest: on an unerased model they only have to report the pre-attack successes
    small = dict(ev.SIZES[True], named=16, retained=32, adv=2, adv_candidates=4, adv_positions=1, soft=2, soft_steps=3)
    monkeypatch.setitem(ev.SIZES, True, small)
    pipe = world["base_pipe"]
    clip = (world["clip"], world["tok"])
    m = ev.evaluate_pipelines(pipe, pipe, SPEC, quick=True, steps=STEPS, clip=clip, judge=world["judge"],
                              progress=False, cache=base_cache)
    f, side, rob, zs = m["forgetting"], m["side_effects"], m["robustness"], m["zeroshot"]
    assert f["found_named_base"] >= 0.75, f  # the base shows circle: the found-mask reads the right class
    assert f["found_named_erased"] == f["found_named_base"]
    assert side["retained_shape_erased"] == side["retained_shape_base"] >= 0.9
    assert side["empty_prompt_change"]["max_abs"] == 0.0
    assert rob["paraphrase"]["asr"] == rob["paraphrase"]["asr_base"] >= 0.5
    assert rob["adversarial"]["asr"] >= 0.5 and rob["soft_prompt"]["asr"] >= 0.5  # nothing erased: attacks "succeed"
    assert zs["shape_forget_after"] == zs["shape_forget_before"] >= 0.95
    assert m["utility"]["erased"]["fid_judge"] == pytest.approx(m["utility"]["base"]["fid_judge"], rel=1e-6)


def test_evaluator_reports_a_large_change_for_an_erasing_patch(world, nullspace_patches, base_cache):
    patch = nullspace_patches[1.0]
    erased = load_pipeline("miniworld")
    load_patches(erased, [patch])
    clip = copy.deepcopy(world["clip"])
    apply_to_clip(clip, patch)
    m = ev.evaluate_pipelines(world["base_pipe"], erased, SPEC, quick=True, steps=STEPS,
                              clip=(world["clip"], world["tok"]), erased_clip=(clip, world["tok"]),
                              judge=world["judge"], progress=False, cache=base_cache, attacks_on=False)
    f, side, rob = m["forgetting"], m["side_effects"], m["robustness"]
    assert f["found_named_base"] >= 0.75 and f["found_named_erased"] <= 0.15, f  # measured 8/8 → 0/8
    assert rob["paraphrase"]["asr_base"] >= 0.5 and rob["paraphrase"]["asr"] <= 0.25, rob
    assert side["retained_shape_erased"] >= side["retained_shape_base"] - 0.15, side
    assert side["empty_prompt_change"]["relative"] <= 1e-4, side  # kept exactly by construction (issue 11)
    assert m["zeroshot"]["shape_forget_after"] <= m["zeroshot"]["shape_forget_before"] - 0.5


def test_miniworld_metrics_reports_the_erasure(nullspace_patches):
    m = measure.miniworld_metrics(nullspace_patches[1.0], SPEC, steps=STEPS)
    assert m["found_named_before"] >= 0.8 and m["found_named_after"] <= 0.1, m  # measured 15/16 → 0/16
    assert m["found_paraphrase_before"] >= 0.7 and m["found_paraphrase_after"] <= 0.15, m  # 14/16 → 0/16
    assert m["retained_shape_after"] >= m["retained_shape_before"] - 0.1, m  # 98.2 % → 96.4 %
    assert m["zeroshot_shape_forget_after"] <= m["zeroshot_shape_forget_before"] - 0.5, m
