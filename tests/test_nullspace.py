"""Closed-form nullspace erasure on tiny random models: exact protection, movement toward the target, strength 0 =
identity, the patch loads in plain diffusers and equals the manual edit, the CLIP variant, and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

from erase_diffusion import nullspace as ns
from tiny_models import _text_config, sd_pipeline, sdxl_pipeline, tokenizer

TEMPLATES = ("a photo of a {}", "a red {} on a dark background")
PROMPTS = ns.PromptSet(TEMPLATES)
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
    fc2 = ns.clip_core(te).encoder.layers[edit.layer].mlp.fc2
    with torch.no_grad():
        fc2.weight += edit.delta
    return te


def test_protected_exact_and_concept_reaches_anchor(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    edit = ns.encoder_edit(te, tok, ["circle"], ["square"], prompts=PROMPTS, anchor="star")
    assert edit.stats["protection"] == "exact"
    new = with_delta(te, edit)
    before = ns.conditioning(te, tok, PROTECTED)
    assert (ns.conditioning(new, tok, PROTECTED) - before).abs().max() <= 1e-4
    target = ns.conditioning(te, tok, ANCHORED)
    d0 = (ns.conditioning(te, tok, CONCEPT) - target).norm()
    d1 = (ns.conditioning(new, tok, CONCEPT) - target).norm()
    assert d1 < 0.1 * d0, (d0, d1)  # training prompts: (almost) exactly on the anchor


def test_project_mode_moves_concept(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    edit = ns.encoder_edit(te, tok, ["circle"], ["square"], prompts=PROMPTS, mode="project")
    new = with_delta(te, edit)
    assert (ns.conditioning(new, tok, PROTECTED) - ns.conditioning(te, tok, PROTECTED)).abs().max() <= 1e-4
    assert (ns.conditioning(new, tok, CONCEPT) - ns.conditioning(te, tok, CONCEPT)).abs().max() > 1e-2


def test_strength_scales_linearly_and_zero_is_identity(sd):
    te, tok = sd.text_encoder, sd.tokenizer
    full = ns.encoder_edit(te, tok, ["circle"], ["square"], prompts=PROMPTS, anchor="star")
    half = ns.encoder_edit(te, tok, ["circle"], ["square"], prompts=PROMPTS, anchor="star", strength=0.5)
    zero = ns.encoder_edit(te, tok, ["circle"], ["square"], prompts=PROMPTS, anchor="star", strength=0.0)
    assert torch.allclose(half.delta, 0.5 * full.delta, atol=1e-6)
    assert zero.delta.abs().max() == 0
    assert torch.equal(ns.conditioning(with_delta(te, zero), tok, CONCEPT), ns.conditioning(te, tok, CONCEPT))


def test_patch_loads_in_diffusers_and_equals_manual_edit(sd, tmp_path):
    te, tok = sd.text_encoder, sd.tokenizer
    path = ns.erase("tiny", ["circle"], protect=["square"], anchor="star", templates=list(TEMPLATES),
                    output=tmp_path / "circle.safetensors", pipe=sd)
    manual = with_delta(te, ns.encoder_edit(te, tok, ["circle"], ["square"], prompts=PROMPTS, anchor="star"))
    pipe = copy.deepcopy(sd)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="erase")
    loaded = ns.conditioning(pipe.text_encoder, tok, CONCEPT + PROTECTED)
    assert (loaded - ns.conditioning(manual, tok, CONCEPT + PROTECTED)).abs().max() <= 1e-4
    assert (loaded[2:] - ns.conditioning(te, tok, PROTECTED)).abs().max() <= 1e-4
    pipe.set_adapters("erase", 0.0)  # adapter weight 0 gives back the base model
    assert (ns.conditioning(pipe.text_encoder, tok, CONCEPT) - ns.conditioning(te, tok, CONCEPT)).abs().max() <= 1e-6


def test_sdxl_both_encoders_penultimate(tmp_path):
    pipe = sdxl_pipeline()
    pipe.text_encoder = wide_encoder(layers=5)
    pipe.text_encoder_2 = wide_encoder(layers=5, cls=CLIPTextModelWithProjection, seed=1)
    path = ns.erase("tiny-xl", ["circle"], protect=["square"], anchor="star", templates=list(TEMPLATES),
                    output=tmp_path / "xl.safetensors", pipe=pipe)
    base = [ns.conditioning(te, pipe.tokenizer, CONCEPT + PROTECTED, penultimate=True)
            for te in (pipe.text_encoder, pipe.text_encoder_2)]
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    for te, b in zip((pipe.text_encoder, pipe.text_encoder_2), base):
        after = ns.conditioning(te, pipe.tokenizer, CONCEPT + PROTECTED, penultimate=True)
        assert (after[2:] - b[2:]).abs().max() <= 1e-4
        assert (after[:2] - b[:2]).abs().max() > 1e-2


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


def test_clip_projection_keeps_retained_logits(clip, tmp_path):
    model, tok = clip
    retained = ["square", "star", "heart"]
    U, stats = ns.clip_projection(model, tok, ["circle"], retained, prompts=PROMPTS)
    assert stats["rank"] == 1
    t_r = torch.stack([ns.class_embedding(model, tok, w, PROMPTS) for w in retained])
    t_f = ns.class_embedding(model, tok, "circle", PROMPTS)
    torch.manual_seed(1)
    pixels = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        z0 = model.get_image_features(pixel_values=pixels)
        z0 = z0 if isinstance(z0, torch.Tensor) else z0.pooler_output
        edited = copy.deepcopy(model)
        ns.apply_projection(edited, U, 1.0)
        z1 = edited.get_image_features(pixel_values=pixels)
        z1 = z1 if isinstance(z1, torch.Tensor) else z1.pooler_output
    assert (z1 @ t_r.T - z0 @ t_r.T).abs().max() <= 1e-5  # retained logits (before the image-norm rescale)
    # the forget logit keeps only the part of t_f inside the retained span (variant (a)); the rest is gone
    Q, _ = torch.linalg.qr(t_r.T)
    assert torch.allclose(z1 @ t_f, z0 @ (Q @ (Q.T @ t_f)), atol=1e-5)
    assert ((z1 @ t_f - z0 @ t_f).abs() > 1e-3).all()
    # the patch reproduces the manual edit through patch.apply_to_clip
    from erase_diffusion.patch import apply_to_clip

    path = ns.erase("tiny-clip", ["circle"], protect=retained, target="clip", templates=list(TEMPLATES),
                    output=tmp_path / "clip.safetensors", clip=clip)
    patched = copy.deepcopy(model)
    apply_to_clip(patched, path)
    assert torch.allclose(patched.visual_projection.weight, edited.visual_projection.weight, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("concepts, protect, match", [
    ([], [], "no concept"),
    (["  "], [], "empty concept"),
    (["circle"], ["circle"], "both erased and protected"),
])
def test_bad_inputs(sd, tmp_path, concepts, protect, match):
    with pytest.raises(ValueError, match=match):
        ns.erase("tiny", concepts, protect=protect, output=tmp_path / "x.safetensors", pipe=sd)


def test_bad_strength_and_target(sd, tmp_path):
    with pytest.raises(ValueError, match="strength"):
        ns.erase("tiny", ["circle"], strength=1.5, output=tmp_path / "x.safetensors", pipe=sd)
    with pytest.raises(ValueError, match="target"):
        ns.erase("tiny", ["circle"], target="unet", output=tmp_path / "x.safetensors", pipe=sd)


def test_protected_span_covering_concept_is_refused(clip):
    model, tok = clip
    many = ["square", "star", "heart", "cross", "diamond", "hexagon", "triangle", "red", "blue", "green", "disc",
            "box", "rhombus", "yellow", "white", "cyan", "purple"]  # 17 > projection dim 16: they span everything
    with pytest.raises(ValueError, match="span"):
        ns.clip_projection(model, tok, ["circle"], many, prompts=PROMPTS)


def test_nan_weights_are_refused(sd):
    te = copy.deepcopy(sd.text_encoder)
    with torch.no_grad():
        ns.clip_core(te).encoder.layers[0].mlp.fc1.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        ns.encoder_edit(te, sd.tokenizer, ["circle"], ["square"], prompts=PROMPTS)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from erase_diffusion.cli import main

    assert main(["erase", "circle", "--protect", "circle", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "both erased and protected" in capsys.readouterr().err
