"""erase_diffusion.pipelines.loading on tiny random SD 1 / SD 2-like / SDXL pipelines (CPU, offline)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sd2_pipeline, sd_pipeline, sdxl_pipeline

from erase_diffusion.patch import fingerprint, write_patch
from erase_diffusion.patch_format import LoraFactors, PatchError
from erase_diffusion.pipelines.loading import bake, load_patches, set_strengths, unfuse

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 0]])


def random_factors(te, component, rank=2, seed=0, layers=None, targets=("self_attn.q_proj", "self_attn.out_proj")):
    g = torch.Generator().manual_seed(seed)
    core = getattr(te, "text_model", te)
    n = len(core.encoder.layers)
    out = {}
    for i in layers if layers is not None else range(n):
        for t in targets:
            lin = core.encoder.layers[i].get_submodule(t)
            r = rank + (i % 2)  # mixed ranks
            out[f"text_model.encoder.layers.{i}.{t}"] = LoraFactors(
                A=torch.randn(r, lin.in_features, generator=g) * 0.2, B=torch.randn(lin.out_features, r, generator=g) * 0.2
            )
    return out


def make_patch(pipe, path, seed=0, components=None, **kw):
    components = components or [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    layers = {c: random_factors(getattr(pipe, c), c, seed=seed + k, **kw) for k, c in enumerate(components)}
    fps = {c: fingerprint(getattr(pipe, c)) for c in components}
    write_patch(path, layers, method="test", settings={"seed": seed}, erased=["cat"], protected=["dog"],
                base_model="tiny", fingerprints=fps)
    return layers


def te_out(pipe):
    with torch.no_grad():
        out = {"text_encoder": pipe.text_encoder(IDS)[0].clone()}
        if getattr(pipe, "text_encoder_2", None) is not None:
            out["text_encoder_2"] = pipe.text_encoder_2(IDS)[0].clone()
    return out


def manual(pipe, layers_list, strengths):
    """Reference: W + Σ s·B@A merged by hand into a copy."""
    ref = {}
    for comp in te_out(pipe):
        te = copy.deepcopy(getattr(pipe, comp))
        with torch.no_grad():
            for layers, s in zip(layers_list, strengths):
                for m, f in layers.get(comp, {}).items():
                    name = m if hasattr(te, "text_model") else m.removeprefix("text_model.")
                    te.get_submodule(name).weight += s * f.delta()
            ref[comp] = te(IDS)[0]
    return ref


def maxdiff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


SUBPROCESS = textwrap.dedent("""
    import json, sys, torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file
    jobs = json.loads(sys.argv[1])
    assert not any(m.startswith("erase_diffusion") for m in sys.modules)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 0]])
    for name, job in jobs.items():
        pipe = DiffusionPipeline.from_pretrained(job["pipe"])
        pipe.load_lora_weights(job["patch"], adapter_name="erase")
        out = {}
        with torch.no_grad():
            for comp in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, comp, None) is not None:
                    out[comp] = pipe.__getattribute__(comp)(ids)[0].contiguous()
        save_file(out, job["out"])
    assert not any(m.startswith("erase_diffusion") for m in sys.modules)
    print("ok")
""")


def test_plain_diffusers_in_separate_process_matches_loader(tmp_path):
    jobs, ours = {}, {}
    for name, build in (("sd", sd_pipeline), ("sd2", sd2_pipeline), ("sdxl", sdxl_pipeline)):
        pipe = build()
        pipe.save_pretrained(tmp_path / name)
        patch = tmp_path / f"{name}.safetensors"
        layers = make_patch(pipe, patch, seed=3)
        base, want = te_out(pipe), manual(pipe, [layers], [1.0])
        load_patches(pipe, patch)
        ours[name] = te_out(pipe)
        assert maxdiff(ours[name], want) <= 1e-5
        assert maxdiff(ours[name], base) > 1e-2  # the patch really changes every encoder
        assert min((ours[name][k] - base[k]).abs().max().item() for k in base) > 1e-2
        jobs[name] = {"pipe": str(tmp_path / name), "patch": str(patch), "out": str(tmp_path / f"{name}_plain.st")}
    res = subprocess.run([sys.executable, "-c", SUBPROCESS, json.dumps(jobs)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, job in jobs.items():
        plain = load_file(job["out"])
        assert set(plain) == set(ours[name])
        assert maxdiff(plain, ours[name]) <= 1e-5, name


def test_strength_zero_one_and_fuse_equivalence(tmp_path):
    pipe = sd_pipeline()
    base = te_out(pipe)
    patch = tmp_path / "p.safetensors"
    layers = make_patch(pipe, patch)
    want = manual(pipe, [layers], [0.6])
    (name,) = load_patches(pipe, patch, strengths=0.0)
    assert maxdiff(te_out(pipe), base) == 0.0
    set_strengths(pipe, name, 0.6)
    at_06 = te_out(pipe)
    assert maxdiff(at_06, want) <= 1e-5
    other = sd_pipeline()
    load_patches(other, patch)
    other.fuse_lora(components=["text_encoder"], lora_scale=0.6)
    assert maxdiff(te_out(other), at_06) <= 1e-5
    unfuse(other)
    other.set_adapters(other.get_list_adapters()["text_encoder"], 0.0)
    assert maxdiff(te_out(other), base) <= 1e-5


def test_stacking_two_patches(tmp_path):
    pipe = sdxl_pipeline()
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    l1 = make_patch(pipe, p1, seed=1)
    l2 = make_patch(pipe, p2, seed=7, components=["text_encoder"], layers=[0])  # te1 only, one layer
    want_both, want_2 = manual(pipe, [l1, l2], [1.0, 0.5]), manual(pipe, [l2], [1.0])
    names = load_patches(pipe, [p1, p2], strengths=[1.0, 0.5])
    assert names == ["erase_a", "erase_b"]
    assert maxdiff(te_out(pipe), want_both) <= 1e-5
    set_strengths(pipe, names, [0.0, 1.0])
    assert maxdiff(te_out(pipe), want_2) <= 1e-5


def test_clip_modules_are_skipped_by_the_project_loader(tmp_path):
    """A patch that also changes CLIPModel-only modules (component ``clip``) loads its text-encoder LoRA only."""
    pipe = sd_pipeline()
    te = pipe.text_encoder
    layers = {"text_encoder": random_factors(te, "text_encoder"),
              "clip": {"visual_projection": LoraFactors(torch.ones(1, 32), torch.ones(16, 1))}}
    patch = tmp_path / "clip.safetensors"
    write_patch(patch, layers, method="test", settings={}, erased=["cat"], protected=[], base_model="tiny",
                fingerprints={"text_encoder": fingerprint(te)})
    want = manual(pipe, [{"text_encoder": layers["text_encoder"]}], [0.5])
    load_patches(pipe, patch, strengths=0.5)
    assert maxdiff(te_out(pipe), want) <= 1e-5


def assert_untouched(pipe, base):
    assert maxdiff(te_out(pipe), base) == 0.0
    assert pipe.get_list_adapters() == {}


def test_fingerprint_mismatch_refused_and_force_loads(tmp_path):
    pipe = sd_pipeline()
    patch = tmp_path / "p.safetensors"
    other = sd_pipeline()
    with torch.no_grad():
        other.text_encoder.encoder.layers[0].mlp.fc2.weight.mul_(1.01)  # same architecture, other weights
    make_patch(other, patch)
    base = te_out(pipe)
    with pytest.raises(PatchError, match="fingerprint"):
        load_patches(pipe, patch)
    assert_untouched(pipe, base)
    load_patches(pipe, patch, force=True)
    assert maxdiff(te_out(pipe), base) > 1e-3


def test_incompatible_patches_refused_cleanly(tmp_path):
    sd, sd2, xl = sd_pipeline(), sd2_pipeline(), sdxl_pipeline()
    xl_patch, sd_patch = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    make_patch(xl, xl_patch)
    make_patch(sd, sd_patch)
    base_sd, base_sd2 = te_out(sd), te_out(sd2)
    with pytest.raises(ValueError, match="SDXL patch"):
        load_patches(sd, xl_patch, force=True)
    assert_untouched(sd, base_sd)
    with pytest.raises(ValueError, match="in the patch but"):
        load_patches(sd2, sd_patch, force=True)  # SD1 shapes on the SD2-like encoder: force never skips shapes
    assert_untouched(sd2, base_sd2)
    # a valid patch followed by a bad one: nothing at all is loaded
    with pytest.raises(ValueError):
        load_patches(sd, [sd_patch, xl_patch])
    assert_untouched(sd, base_sd)
    # a bad file on disk
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(sd_patch.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_patches(sd, [sd_patch, bad])
    assert_untouched(sd, base_sd)


def test_failure_mid_load_rolls_back(tmp_path, monkeypatch):
    pipe = sd_pipeline()
    base = te_out(pipe)
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make_patch(pipe, p1, seed=1)
    make_patch(pipe, p2, seed=2)

    def boom(*a, **k):
        raise RuntimeError("simulated failure after loading")

    monkeypatch.setattr(pipe, "set_adapters", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        load_patches(pipe, [p1, p2])
    monkeypatch.undo()
    assert_untouched(pipe, base)
    assert load_patches(pipe, [p1, p2]) == ["erase_a", "erase_b"]  # still usable, names free again


def state(pipe):
    """Every text-encoder tensor by name, copied: the bit-identical comparison after a refused load."""
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for c in before:
        assert before[c].keys() == after[c].keys(), c  # no leftover lora_* tensors or base_layer renames
        assert all(torch.equal(before[c][k], after[c][k]) for k in before[c]), c


@pytest.mark.parametrize("earlier_adapter", [False, True])
def test_diffusers_failing_half_way_leaves_the_encoders_bit_identical(tmp_path, monkeypatch, earlier_adapter):
    """SDXL: text_encoder is already wrapped and loaded when loading into text_encoder_2 fails; with an adapter loaded
    before, its wrappers must stay and keep their active adapter."""
    pipe = sdxl_pipeline()
    p0, p1 = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    make_patch(pipe, p0, seed=5)
    make_patch(pipe, p1, seed=6)
    if earlier_adapter:
        load_patches(pipe, p0)
    before, out_before, adapters = state(pipe), te_out(pipe), pipe.get_list_adapters()
    real, calls = pipe.load_lora_into_text_encoder, []

    def second_fails(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(kwargs.get("prefix"))
        if len(calls) == 2:
            raise RuntimeError("simulated peft failure in text_encoder_2")

    monkeypatch.setattr(pipe, "load_lora_into_text_encoder", second_fails)
    with pytest.raises(PatchError, match="could not be loaded by diffusers: simulated"):
        load_patches(pipe, p1)
    monkeypatch.undo()
    assert len(calls) == 2
    assert_same_state(before, state(pipe))
    assert maxdiff(te_out(pipe), out_before) == 0.0 and pipe.get_list_adapters() == adapters
    # still usable: the same patch loads afterwards and gives its B @ A
    load_patches(pipe, p1, adapter_names=["again"])
    assert pipe.get_list_adapters()["text_encoder_2"][-1] == "again"


def test_bake_and_cli(tmp_path):
    pipe = sd_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    patch = tmp_path / "p.safetensors"
    layers = make_patch(pipe, patch)
    want = manual(pipe, [layers], [0.5])
    out = bake(str(tmp_path / "base"), [patch], [0.5], tmp_path / "baked")
    from diffusers import DiffusionPipeline

    baked = DiffusionPipeline.from_pretrained(out)
    assert maxdiff(te_out(baked), want) <= 1e-5
    assert not any("lora" in k for k in baked.text_encoder.state_dict())
    assert not list(tmp_path.glob(".baked*"))
    from erase_diffusion.cli import main

    assert main(["bake", "--pretrained_model_name_or_path", str(tmp_path / "base"), "--patch", str(patch),
                 "--output_dir", str(tmp_path / "baked")]) == 2  # exists: refused
    assert main(["bake", "--pretrained_model_name_or_path", str(tmp_path / "base"), "--patch", str(patch),
                 "--strength", "0.5", "--output_dir", str(tmp_path / "baked2")]) == 0
    assert maxdiff(te_out(DiffusionPipeline.from_pretrained(tmp_path / "baked2")), want) <= 1e-5
