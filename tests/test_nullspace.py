"""Closed-form nullspace erasure on tiny random models: exact protection of given prompts (and its refusals), soft
protection of concepts, movement toward the target, strength 0 = identity, the patch loads in plain diffusers and equals
the manual edit, the CLIP variant, and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

from erase_diffusion import clip_projection as cp, nullspace as ns
from erase_diffusion.concepts import ConceptSpec
from erase_diffusion.encoder_states import conditioning
from erase_diffusion.patch import clip_core
from erase_diffusion.prompts import PromptSet
from tiny_models import _text_config, sd_pipeline, sdxl_pipeline, tokenizer

TEMPLATES = ("a photo of a {}", "a red {} on a dark background")
PROMPTS = PromptSet(TEMPLATES)
PROTECTED = ["a photo of a square", "a red square on a dark background"]
CONCEPT = ["a photo of a circle", "a red circle on a dark background"]
ANCHORED = ["a photo of a star", "a red star on a dark background"]


def wide_encoder(hidden=32, layers=2, cls=CLIPTextModel, seed=0):
    """fc2 input (intermediate) wider than 77 tokens × the protected prompts, so exact protection has room."""
    tok = tokenizer()
    torch.manual_seed(seed)
    return cls(_text_config(tok, hidden, layers, 4, 512, projection_dim=hidden)).eval()


@pytest.fixture(scope="module")
def sd():
    pipe = sd_pipeline()
    pipe.text_encoder = wide_encoder()
    return pipe


def with_delta(te, edit):
    te = copy.deepcopy(te)
    fc2 = clip_core(te).encoder.layers[edit.layer].mlp.fc2
    with torch.no_grad():
        fc2.weight += edit.delta
    return te


def test_protected_prompts_exact_and_concept_reaches_anchor(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    edit = ns.encoder_edit(te, tok, ["circle"], ["square"], protect_prompts=PROTECTED, prompts=PROMPTS, anchor="star")
    assert 0 < edit.stats["exact_protected_rank"] <= 3 * 77  # the two prompts and the empty one
    new = with_delta(te, edit)
    before = conditioning(te, tok, PROTECTED + [""])
    assert (conditioning(new, tok, PROTECTED + [""]) - before).abs().max() <= 1e-4  # "" always: CFG reads it
    target = conditioning(te, tok, ANCHORED)
    d0 = (conditioning(te, tok, CONCEPT) - target).norm()
    d1 = (conditioning(new, tok, CONCEPT) - target).norm()
    assert d1 < 0.2 * d0, (d0, d1)  # training prompts: close to the anchor


def test_soft_protection_reduces_protected_change(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    kept = ["a photo of a heart", "a red heart on a dark background"]  # softly protected, not exact
    base = conditioning(te, tok, kept)
    change = {}
    for weight in (0.0, 1.0, 10.0):
        edit = ns.encoder_edit(te, tok, ["circle"], ["heart"], prompts=PROMPTS, anchor="star", protect_weight=weight)
        change[weight] = float((conditioning(with_delta(te, edit), tok, kept) - base).norm())
        assert 0 < edit.stats["exact_protected_rank"] <= 77  # only the empty prompt
    assert change[1.0] < 0.5 * change[0.0] and change[10.0] < change[1.0], change


def test_project_mode_moves_concept(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    edit = ns.encoder_edit(te, tok, ["circle"], ["square"], protect_prompts=PROTECTED, prompts=PROMPTS, mode="project")
    new = with_delta(te, edit)
    assert (conditioning(new, tok, PROTECTED) - conditioning(te, tok, PROTECTED)).abs().max() <= 1e-4
    assert (conditioning(new, tok, CONCEPT) - conditioning(te, tok, CONCEPT)).abs().max() > 1e-2


def test_strength_scales_linearly_and_zero_is_identity(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    kw = dict(protect_prompts=PROTECTED, prompts=PROMPTS, anchor="star")
    full = ns.encoder_edit(te, tok, ["circle"], ["square"], **kw)
    half = ns.encoder_edit(te, tok, ["circle"], ["square"], strength=0.5, **kw)
    zero = ns.encoder_edit(te, tok, ["circle"], ["square"], strength=0.0, **kw)
    assert torch.allclose(half.delta, 0.5 * full.delta, atol=1e-6)
    assert zero.delta.abs().max() == 0
    assert torch.equal(conditioning(with_delta(te, zero), tok, CONCEPT), conditioning(te, tok, CONCEPT))


def test_unprotected_empty_prompt_moves_and_protected_one_does_not(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    change = {}
    for keep in (False, True):
        edit = ns.encoder_edit(te, tok, ["circle"], [], prompts=PROMPTS, anchor="star", protect_empty=keep)
        change[keep] = float((conditioning(with_delta(te, edit), tok, [""]) - conditioning(te, tok, [""])).abs().max())
    assert change[True] <= 1e-4 < change[False], change


def test_multi_layer_edit_keeps_protection_and_reaches_the_anchor(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    layers = ns.edit_layers(te, penultimate=False, depth=2)
    assert layers == [0, 1]
    before = {k: v.clone() for k, v in te.state_dict().items()}
    edits = ns.encoder_edits(te, tok, ["circle"], ["square"], layers=layers, protect_prompts=PROTECTED,
                             prompts=PROMPTS, anchor="star")
    new = copy.deepcopy(te)
    for edit in edits:
        with torch.no_grad():
            clip_core(new).encoder.layers[edit.layer].mlp.fc2.weight += edit.delta
    assert (conditioning(new, tok, PROTECTED + [""]) - conditioning(te, tok, PROTECTED + [""])).abs().max() <= 1e-4
    target = conditioning(te, tok, ANCHORED)
    d0 = (conditioning(te, tok, CONCEPT) - target).norm()
    assert (conditioning(new, tok, CONCEPT) - target).norm() < 0.2 * d0
    assert all(torch.equal(v, before[k]) for k, v in te.state_dict().items())  # the encoder is left bit for bit
    with pytest.raises(ValueError, match="depth must lie"):
        ns.edit_layers(te, penultimate=False, depth=3)


def test_too_many_protected_prompts_or_naming_the_concept_is_refused(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    many = [f"a {c} {s} on a dark background" for c in ("red", "green", "blue") for s in ("square", "star", "heart")]
    with pytest.raises(ValueError, match=r"at most \d+ such prompts fit"):
        ns.encoder_edit(te, tok, ["circle"], [], protect_prompts=many, prompts=PROMPTS)
    with pytest.raises(ValueError, match="names an erased concept"):
        ns.encoder_edit(te, tok, ["circle"], [], protect_prompts=["a red circle"], prompts=PROMPTS)
    with pytest.raises(ValueError, match="names an erased concept"):
        ns.encoder_edit(te, tok, ["circle"], [], protect_prompts=["a red disc"], synonyms={"circle": ("disc",)},
                        prompts=PROMPTS)


def test_patch_loads_in_diffusers_and_equals_manual_edit(sd, tmp_path):
    te, tok = sd.text_encoder, sd.tokenizer
    spec = ConceptSpec(["circle"], keep=["square"], protect_prompts=PROTECTED, anchor="star")
    path = ns.erase("tiny", spec, templates=list(TEMPLATES), output=tmp_path / "circle.safetensors", pipe=sd)
    manual = with_delta(te, ns.encoder_edit(te, tok, ["circle"], ["square"], protect_prompts=PROTECTED,
                                            prompts=PROMPTS, anchor="star"))
    pipe = copy.deepcopy(sd)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="erase")
    loaded = conditioning(pipe.text_encoder, tok, CONCEPT + PROTECTED)
    assert (loaded - conditioning(manual, tok, CONCEPT + PROTECTED)).abs().max() <= 1e-4
    assert (loaded[2:] - conditioning(te, tok, PROTECTED)).abs().max() <= 1e-4
    pipe.set_adapters("erase", 0.0)  # adapter weight 0 gives back the base model
    assert (conditioning(pipe.text_encoder, tok, CONCEPT) - conditioning(te, tok, CONCEPT)).abs().max() <= 1e-6


def test_sdxl_both_encoders_penultimate(tmp_path):
    pipe = sdxl_pipeline()
    pipe.text_encoder = wide_encoder(layers=5)
    pipe.text_encoder_2 = wide_encoder(layers=5, cls=CLIPTextModelWithProjection, seed=1)
    spec = ConceptSpec(["circle"], keep=["square"], protect_prompts=PROTECTED, anchor="star")
    path = ns.erase("tiny-xl", spec, templates=list(TEMPLATES), output=tmp_path / "xl.safetensors", pipe=pipe)
    base = [conditioning(te, pipe.tokenizer, CONCEPT + PROTECTED, penultimate=True)
            for te in (pipe.text_encoder, pipe.text_encoder_2)]
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    for te, b in zip((pipe.text_encoder, pipe.text_encoder_2), base):
        after = conditioning(te, pipe.tokenizer, CONCEPT + PROTECTED, penultimate=True)
        assert (after[2:] - b[2:]).abs().max() <= 1e-4
        assert (after[:2] - b[:2]).abs().max() > 1e-2


def test_miniworld_defaults():
    from erase_diffusion.concepts import miniworld_keep, with_miniworld_defaults

    assert miniworld_keep(["circle"]) == ["square", "triangle", "star", "heart", "cross", "diamond", "hexagon"]
    assert miniworld_keep(["striped"]) == ["solid", "outlined"]  # every attribute has siblings to keep
    assert miniworld_keep(["circle", "red"]) == [
        "square", "triangle", "star", "heart", "cross", "diamond", "hexagon",
        "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
    spec = with_miniworld_defaults(ConceptSpec(["red"], keep=["green"]))
    assert spec.keep == ["green"] and spec.protect_prompts == ["a blue triangle"]  # "a red square" names red
    assert spec.paraphrases == {"red": [], "green": []}
    with pytest.raises(ValueError, match="vocabulary"):
        with_miniworld_defaults(ConceptSpec(["dog"]))
    prompts = PromptSet(miniworld=True)
    assert len(prompts.frames("circle")) == 48
    # the word goes into the slot of its own attribute, the others vary: a colour is never put where a shape goes
    from erase_diffusion.miniworld.domain import COLOURS, SHAPES, STYLES

    for word, own, varied in (("red", COLOURS, SHAPES), ("striped", STYLES, COLOURS)):
        texts = [b + word + a for b, a in prompts.frames(word)]
        assert len(set(texts)) == len(texts)
        for t in texts:
            words = t.replace(",", " ").split()
            assert [w for w in words if w in own] == [word]  # no second colour / style beside the erased one
        assert {w for t in texts for w in t.replace(",", " ").split() if w in varied} == set(varied)


# ------------------------------------------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip():
    tok = tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(cfg).eval(), tok


def _project(clip_model, D):
    """visual_projection ← (I − D) W, what erase(..., target="clip") ships as LoRA factors."""
    W = clip_model.visual_projection.weight
    with torch.no_grad():
        W -= D.to(W) @ W


def test_clip_projection_forgets_and_keeps_retained_logits(clip, tmp_path):
    model, tok = clip
    retained = ["square", "star", "heart"]
    D, stats = cp.clip_projection(model, tok, ["circle"], retained, prompts=PROMPTS, retain_weight=1.0)
    assert stats["rank"] == 1 and stats["forget_left"] < 0.2
    t_r = torch.stack([cp.class_embedding(model, tok, w, PROMPTS) for w in retained])
    t_f = cp.class_embedding(model, tok, "circle", PROMPTS)
    torch.manual_seed(1)
    pixels = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        z0 = model.get_image_features(pixel_values=pixels)
        z0 = z0 if isinstance(z0, torch.Tensor) else z0.pooler_output
        edited = copy.deepcopy(model)
        _project(edited, D)
        z1 = edited.get_image_features(pixel_values=pixels)
        z1 = z1 if isinstance(z1, torch.Tensor) else z1.pooler_output
    # the forget logit (before the image-norm rescale) shrinks far more than the retained ones move
    forget_left = (z1 @ t_f).norm() / (z0 @ t_f).norm()
    retain_moved = (z1 @ t_r.T - z0 @ t_r.T).norm() / (z0 @ t_r.T).norm()
    assert forget_left < 0.3 and retain_moved < 0.5 * (1 - forget_left), (forget_left, retain_moved)
    # stronger retain weight: retained logits move less
    D10, _ = cp.clip_projection(model, tok, ["circle"], retained, prompts=PROMPTS, retain_weight=10.0)
    edited10 = copy.deepcopy(model)
    _project(edited10, D10)
    with torch.no_grad():
        z10 = edited10.get_image_features(pixel_values=pixels)
        z10 = z10 if isinstance(z10, torch.Tensor) else z10.pooler_output
    assert (z10 @ t_r.T - z0 @ t_r.T).norm() < (z1 @ t_r.T - z0 @ t_r.T).norm()
    # the patch reproduces the manual edit through patch.apply_to_clip
    from erase_diffusion.patch import apply_to_clip

    path = ns.erase("tiny-clip", ConceptSpec(["circle"], keep=retained), target="clip", templates=list(TEMPLATES),
                    output=tmp_path / "clip.safetensors", clip=clip)  # the default retain weight is 10
    patched = copy.deepcopy(model)
    apply_to_clip(patched, path)
    assert torch.allclose(patched.visual_projection.weight, edited10.visual_projection.weight, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("concepts, protect, match", [
    ([], [], "no concept"),
    (["  "], [], "no concept"),
    (["circle"], ["circle"], "both to erase and to keep"),
])
def test_bad_inputs(sd, tmp_path, concepts, protect, match):
    with pytest.raises(ValueError, match=match):
        ns.erase("tiny", ConceptSpec(concepts, keep=protect), output=tmp_path / "x.safetensors", pipe=sd)


def test_bad_strength_and_target(sd, tmp_path):
    with pytest.raises(ValueError, match="strength"):
        ns.erase("tiny", ["circle"], strength=1.5, output=tmp_path / "x.safetensors", pipe=sd)
    with pytest.raises(ValueError, match="target"):
        ns.erase("tiny", ["circle"], target="unet", output=tmp_path / "x.safetensors", pipe=sd)


def test_protected_span_covering_concept_is_refused(clip):
    model, tok = clip
    many = ["square", "star", "heart", "cross", "diamond", "hexagon", "triangle", "red", "blue", "green", "disc",
            "box", "rhombus", "yellow", "white", "cyan", "purple"]  # 17 > projection dim 16: they span everything
    with pytest.raises(ValueError, match="span the erased"):  # weighted this strongly, they keep circle too
        cp.clip_projection(model, tok, ["circle"], many, prompts=PROMPTS, retain_weight=1000.0)


def test_nan_weights_are_refused(sd):
    te = copy.deepcopy(sd.text_encoder)
    with torch.no_grad():
        clip_core(te).encoder.layers[0].mlp.fc1.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        ns.encoder_edit(te, sd.tokenizer, ["circle"], ["square"], prompts=PROMPTS)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from erase_diffusion.cli import main

    assert main(["erase", "circle", "--protect", "circle", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "both to erase and to keep" in capsys.readouterr().err
