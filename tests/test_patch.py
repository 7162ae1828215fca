"""erase_diffusion.patch, .patch_format, .patch_reader, .kohya: factors, file format, validation, fingerprints, kohya
export, CLIPModel merge."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from test_pipelines_loading import IDS, maxdiff, make_patch, manual, random_factors, te_out
from tiny_models import sd_pipeline, sdxl_pipeline
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from erase_diffusion.kohya import export_kohya
from erase_diffusion.patch import apply_to_clip, factors_from_delta, fingerprint, write_patch
from erase_diffusion.patch_format import LoraFactors, PatchError, content_sha256
from erase_diffusion.patch_reader import describe_patch, load_patch


def test_factors_from_delta_exact_and_truncated():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)
    f, res = factors_from_delta(low)
    assert f.rank == 3 and f.A.shape == (3, 24) and f.B.shape == (40, 3)
    assert res < 1e-6
    assert torch.linalg.matrix_norm(f.delta() - low) / torch.linalg.matrix_norm(low) < 1e-6
    full = torch.randn(20, 16, generator=g)
    S = torch.linalg.svdvals(full.double())
    f4, res4 = factors_from_delta(full, rank=4)
    assert f4.rank == 4
    assert res4 == pytest.approx(float(S[4:].norm() / S.norm()), rel=1e-4)
    exact = float(torch.linalg.matrix_norm(full.double() - f4.delta().double()) / torch.linalg.matrix_norm(full.double()))
    assert res4 == pytest.approx(exact, rel=1e-6)
    _, res_all = factors_from_delta(full)
    assert res_all < 1e-6
    fz, rz = factors_from_delta(torch.zeros(5, 7))
    assert fz.rank == 1 and rz == 0.0 and not fz.delta().any()
    with pytest.raises(ValueError):
        factors_from_delta(torch.full((3, 3), float("nan")))


def test_save_load_roundtrip_and_metadata(tmp_path):
    pipe = sd_pipeline()
    path = tmp_path / "p.safetensors"
    layers = make_patch(pipe, path)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left
    patch = load_patch(path)
    assert patch.kind == "lora" and patch.components == ["text_encoder"]
    for m, f in layers["text_encoder"].items():
        assert torch.equal(patch.layers["text_encoder"][m].A, f.A) and torch.equal(patch.layers["text_encoder"][m].B, f.B)
    md = patch.metadata
    assert md["erased"] == ["cat"] and md["protected"] == ["dog"] and md["method"] == "test"
    assert md["fingerprints"] == {"text_encoder": fingerprint(pipe.text_encoder)}
    lam = md["lora_adapter_metadata"]
    assert lam["text_encoder.r"] == lam["text_encoder.lora_alpha"]
    assert "encoder.layers.1.self_attn.q_proj" in lam["text_encoder.target_modules"]  # layer-specific targets
    assert lam["text_encoder.rank_pattern"] == lam["text_encoder.alpha_pattern"] != {}  # mixed ranks
    d = describe_patch(path)
    assert d["size_bytes"] == os.path.getsize(path) and d["rank"] == [2, 3] and d["components"] == {"text_encoder": 4}


def test_inspect_cli(tmp_path, capsys):
    from erase_diffusion.cli import main

    path = tmp_path / "p.safetensors"
    make_patch(sd_pipeline(), path)
    assert main(["inspect", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["erased"] == ["cat"]
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _rewrite(path, tensors, meta):
    save_file(tensors, path, metadata=meta)
    return path


def test_bad_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    make_patch(sd_pipeline(), good)
    data = good.read_bytes()
    patch = load_patch(good)
    meta = {k: v for k, v in json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"].items()}
    tensors = {f"text_encoder.{m}.lora_{x}.weight": getattr(f, x)
               for m, f in patch.layers["text_encoder"].items() for x in "AB"}
    cases = {}
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    cases["trunc.safetensors"] = "truncated"
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    cases["random.safetensors"] = "not a safetensors file"
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    cases["tiny.safetensors"] = "not a safetensors file"
    corrupt = bytearray(data)
    corrupt[10:20] = b"\xff" * 10
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    cases["corrupt.safetensors"] = "corrupted"

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"x": Evil()}))
    cases["pickle.safetensors"] = "not a safetensors file"
    torch.save({"text_encoder.a.lora_A.weight": torch.zeros(1)}, tmp_path / "torch.safetensors")
    cases["torch.safetensors"] = "not a safetensors file"
    _rewrite(tmp_path / "extra.safetensors", dict(tensors, **{"text_encoder.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}), meta)
    cases["extra.safetensors"] = "does not belong"
    _rewrite(tmp_path / "unet.safetensors", dict(tensors, **{"unet.x.lora_A.weight": torch.zeros(2, 2)}), meta)
    cases["unet.safetensors"] = "does not belong"
    nan = dict(tensors)
    k = next(iter(nan))
    nan[k] = nan[k].clone()
    nan[k][0, 0] = float("nan")
    _rewrite(tmp_path / "nan.safetensors", nan, meta)
    cases["nan.safetensors"] = "NaN or Inf"
    mism = dict(tensors)
    kA = next(k for k in mism if k.endswith("lora_A.weight"))
    mism[kA] = torch.zeros(mism[kA].shape[0] + 1, mism[kA].shape[1])
    _rewrite(tmp_path / "rank.safetensors", mism, meta)
    cases["rank.safetensors"] = "rank mismatch"
    _rewrite(tmp_path / "half.safetensors", {k: v for k, v in tensors.items() if k != kA}, meta)
    cases["half.safetensors"] = "needs both lora_A and lora_B"
    _rewrite(tmp_path / "foreign.safetensors", tensors, {"format": "pt"})
    cases["foreign.safetensors"] = "not an erase-diffusion patch"
    _rewrite(tmp_path / "delta.safetensors", dict(tensors, **{"text_encoder.text_model.encoder.layers.0.mlp.fc1.delta": torch.zeros(2, 2)}), meta)
    cases["delta.safetensors"] = "dense ΔW .* not supported"  # the dense 'full' mode is gone: refused, clearly
    _rewrite(tmp_path / "kind.safetensors", tensors, dict(meta, **{"erase_diffusion.kind": "full"}))
    cases["kind.safetensors"] = "kind must be 'lora'"
    (tmp_path / "dir.safetensors").mkdir()
    cases["dir.safetensors"] = "not a regular file"
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_patch(tmp_path / name)
    with pytest.raises(PatchError):
        load_patch(tmp_path / "trunc.safetensors")
    assert not (tmp_path / "PWNED").exists()


def _good(tmp_path):
    good = tmp_path / "good.safetensors"
    make_patch(sd_pipeline(), good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as fh:
        return good, {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", 256, "must equal r"), ("lora_alpha", -128, "must equal r"), ("lora_alpha", 0, "must equal r"),
    ("use_rslora", True, "use_rslora must be false"), ("use_dora", True, "use_dora must be false"),
    ("target_modules", "shorter", "target_modules"), ("rank_pattern", {}, "rank"),
    ("init_lora_weights", "pissa", "not supported"), ("lora_dropout", 0.1, "lora_dropout"),
])
def test_adapter_metadata_must_give_exactly_b_at_a(tmp_path, field, value, message):
    """One-field edits of diffusers' header that would silently change the strength or drop modules."""
    good, tensors, meta = _good(tmp_path)
    adapter = json.loads(meta["lora_adapter_metadata"])
    key = f"text_encoder.{field}"
    adapter[key] = adapter[key][:-1] if value == "shorter" else value
    bad = _rewrite(tmp_path / "bad.safetensors", tensors, {**meta, "lora_adapter_metadata": json.dumps(adapter)})
    with pytest.raises(PatchError, match=message):
        load_patch(bad)


def test_checksum_catches_flipped_tensor_bytes_and_old_patches_warn(tmp_path):
    good, tensors, meta = _good(tmp_path)
    assert len(meta["erase_diffusion.sha256"]) == 64
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data: still finite, still plausible
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(PatchError, match="checksum"):
        load_patch(flipped)
    old = _rewrite(tmp_path / "old.safetensors", tensors, {k: v for k, v in meta.items() if not k.endswith("sha256")})
    with pytest.warns(UserWarning, match="no content checksum"):
        assert load_patch(old).layers.keys() == load_patch(good).layers.keys()


def test_missing_modules_and_huge_factors_are_refused(tmp_path):
    good, tensors, meta = _good(tmp_path)
    first = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0].removesuffix(".lora_A.weight")
    fewer = {k: v for k, v in tensors.items() if not k.startswith(first + ".")}  # declared, but not in the file
    bad = _rewrite(tmp_path / "fewer.safetensors", fewer, {**meta, "erase_diffusion.sha256": content_sha256(fewer)})
    with pytest.raises(PatchError, match="ranks does not match"):
        load_patch(bad)
    huge = dict(tensors, **{f"{first}.lora_B.weight": tensors[f"{first}.lora_B.weight"] * 1e6})
    bad = _rewrite(tmp_path / "huge.safetensors", huge, {**meta, "erase_diffusion.sha256": content_sha256(huge)})
    with pytest.raises(PatchError, match="magnitude"):
        load_patch(bad)


def test_save_patch_refuses_bad_layers(tmp_path):
    te = sd_pipeline().text_encoder
    ok = random_factors(te, "text_encoder")
    kw = dict(method="t", settings={}, erased=[], protected=[], base_model="b", fingerprints={})
    with pytest.raises(PatchError, match="MLP-only"):
        write_patch(tmp_path / "a.safetensors", {"text_encoder": random_factors(te, "te", targets=("mlp.fc1",))}, **kw)
    with pytest.raises(PatchError, match="text_model"):
        write_patch(tmp_path / "a.safetensors", {"text_encoder": {k.removeprefix("text_model."): v for k, v in ok.items()}}, **kw)
    with pytest.raises(PatchError, match="do not form"):
        write_patch(tmp_path / "a.safetensors", {"text_encoder": {next(iter(ok)): LoraFactors(torch.zeros(2, 4), torch.zeros(4, 3))}}, **kw)
    with pytest.raises(PatchError, match="component 'clip'"):
        write_patch(tmp_path / "a.safetensors", {"text_encoder": dict(ok, **{"text_model.final_layer_norm": LoraFactors(torch.zeros(1, 2), torch.zeros(2, 1))})}, **kw)
    assert not list(tmp_path.iterdir())


def _tiny_clip():
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=99,
                projection_dim=16)
    cfg = CLIPConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_hidden_layers=1, image_size=16, patch_size=8, projection_dim=16), projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(cfg).eval()
    te = CLIPTextModel(CLIPTextConfig(**text)).eval()
    info = te.load_state_dict(getattr(clip.text_model, "state_dict")(), strict=False)
    assert not info.unexpected_keys and not [k for k in info.missing_keys if "position_ids" not in k]
    return clip, te


def test_fingerprint_layout_and_dtype_independent():
    clip, te = _tiny_clip()
    fp = fingerprint(te)
    assert len(fp) == 16 and fingerprint(clip) == fp == fingerprint(clip.text_model)
    assert fingerprint(te.half()) == fp
    te.float()
    with torch.no_grad():
        te.encoder.layers[1].self_attn.q_proj.weight[0, 0] += 0.5
    assert fingerprint(te) != fp


def test_apply_to_clip_matches_pipeline_loader(tmp_path):
    clip, te = _tiny_clip()
    g = torch.Generator().manual_seed(0)
    layers = {"text_encoder": random_factors(te, "text_encoder"),
              "clip": {"visual_projection": LoraFactors(torch.randn(1, 32, generator=g), torch.randn(16, 1, generator=g))}}
    path = tmp_path / "c.safetensors"
    write_patch(path, layers, method="t", settings={}, erased=[], protected=[], base_model="b",
                fingerprints={"text_encoder": fingerprint(te)})
    vis = clip.visual_projection.weight.clone()
    with torch.no_grad():
        for m, f in layers["text_encoder"].items():
            te.get_submodule(m.removeprefix("text_model.")).weight += 0.5 * f.delta()
        want = te(IDS)[0]
    apply_to_clip(clip, path, strength=0.5)
    with torch.no_grad():
        assert (clip.text_model(IDS)[0] - want).abs().max() <= 1e-5
    assert torch.allclose(clip.visual_projection.weight, vis + 0.5 * layers["clip"]["visual_projection"].delta())
    # fingerprint now differs (the weights changed): refused unless forced; shapes are always checked
    with pytest.raises(PatchError, match="fingerprint"):
        apply_to_clip(clip, path)
    other, _ = _tiny_clip()
    sd_patch = tmp_path / "sd.safetensors"
    make_patch(sd_pipeline(hidden=48, layers=2), sd_patch)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PatchError, match="does not fit"):
        apply_to_clip(other, sd_patch, force=True)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("build", [sd_pipeline, sdxl_pipeline])
def test_export_kohya_roundtrip_through_diffusers(tmp_path, build):
    pipe = build()
    path = tmp_path / "p.safetensors"
    layers = make_patch(pipe, path)
    want = manual(pipe, [layers], [1.0])
    out = export_kohya(path, tmp_path / "kohya.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        keys = list(fh.keys())
    prefixes = ("lora_te1_", "lora_te2_") if build is sdxl_pipeline else ("lora_te_",)
    assert all(k.startswith(prefixes) for k in keys) and any(k.endswith(".alpha") for k in keys)
    pipe.load_lora_weights(str(out), adapter_name="kohya")
    assert maxdiff(te_out(pipe), want) <= 1e-5


def test_export_kohya_refuses_clip_modules(tmp_path):
    te = sd_pipeline().text_encoder
    path = tmp_path / "c.safetensors"
    layers = {"text_encoder": random_factors(te, "text_encoder"),
              "clip": {"visual_projection": LoraFactors(torch.zeros(1, 32), torch.zeros(16, 1))}}
    write_patch(path, layers, method="t", settings={}, erased=[], protected=[], base_model="b",
                fingerprints={"text_encoder": fingerprint(te)})
    with pytest.raises(PatchError, match="kohya"):
        export_kohya(path, tmp_path / "k.safetensors")


def test_model_card(tmp_path):
    from huggingface_hub import ModelCard

    from erase_diffusion.patch import write_card

    path = tmp_path / "p.safetensors"
    make_patch(sd_pipeline(), path)
    card_path = write_card(path, figures={"forgetting_accuracy_drop": 0.91, "terms": {"forget": -0.5},
                                          "grid": "not/a/figure.png"})
    text = card_path.read_text()
    assert card_path == tmp_path / "p.md"
    assert "| terms.forget | -0.5 |" in text and "not/a/figure.png" not in text
    assert "cat" in text and "dog" in text and "forgetting_accuracy_drop" in text and "textual-inversion" in text
    assert load_patch(path).metadata["fingerprints"]["text_encoder"] in text
    assert ModelCard.load(card_path).data.license == "apache-2.0"


def test_save_patch_writes_the_edit_and_its_model_card(tmp_path):
    """The one writer every method goes through: an ``Edit`` and a ``ConceptSpec`` → the patch and, beside it, the
    model card (atomically, no temp file left) with the edit's figures."""
    from erase_diffusion.concepts import ConceptSpec
    from erase_diffusion.patch import Edit, save_patch

    pipe = sd_pipeline()
    edit = Edit("test", {"text_encoder": random_factors(pipe.text_encoder, "text_encoder")}, settings={"seed": 1},
                fingerprints={"text_encoder": fingerprint(pipe.text_encoder)}, figures={"train_seconds": 1.5})
    path = save_patch(edit, ConceptSpec(["cat"], keep=["dog"]), "tiny", tmp_path / "p.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.md", "p.safetensors"]
    md = load_patch(path).metadata
    assert (md["method"], md["settings"], md["erased"], md["protected"], md["base_model"]) == (
        "test", {"seed": 1}, ["cat"], ["dog"], "tiny")
    assert "figures" not in md  # run measurements go to the card, not the header
    card = (tmp_path / "p.md").read_text()
    assert "| train_seconds | 1.5 |" in card and md["fingerprints"]["text_encoder"] in card
