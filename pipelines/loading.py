"""Load erase patches into diffusers pipelines, through diffusers' own adapter machinery.

Everything here validates first and then calls diffusers: ``load_lora_weights`` (one adapter per patch),
``set_adapters`` (strengths / stacking), ``fuse_lora`` / ``unfuse_lora`` / ``unload_lora_weights``. Plain diffusers
calls work on a loaded pipeline too, for example::

    pipe.disable_lora(); pipe.enable_lora()                      # A/B without unloading
    pipe.set_adapters(["erase_a", "erase_b"], adapter_weights=[1.0, 0.5])
    pipe.delete_adapters("erase_a"); pipe.get_list_adapters()

``set_strengths`` / ``fuse`` / ``unfuse`` below only add checks (names exist, strengths are finite numbers) and pick
the text-encoder components for ``fuse_lora``/``unfuse_lora`` (diffusers' SD default is unet + text_encoder).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from erase_diffusion.atomic import atomic_dir, check_output
from erase_diffusion.models import load_pipeline
from erase_diffusion.patch import fingerprint
from erase_diffusion.patch_format import TEXT_ENCODERS, Patch, PatchError
from erase_diffusion.patch_reader import load_patch




def text_encoder_components(pipe) -> list[str]:
    """The text encoders this pipeline has and diffusers can put LoRA on."""
    loadable = getattr(pipe, "_lora_loadable_modules", [])
    return [c for c in TEXT_ENCODERS if c in loadable and getattr(pipe, c, None) is not None]


def _as_list(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{len(value)} {what} given for {n} patch(es)")
        return list(value)
    return [value] * n


def _check_strengths(strengths) -> list[float]:
    out = []
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
            raise ValueError(f"strength must be a finite number, got {s!r}")
        out.append(float(s))
    return out


def loaded_adapters(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def find_linear(te, module: str):
    """The nn.Linear a text-encoder module path names, in either CLIPTextModel layout (None if absent)."""
    name = module if hasattr(te, "text_model") else module.removeprefix("text_model.")
    try:
        mod = te.get_submodule(name)
    except AttributeError:
        return None
    mod = getattr(mod, "base_layer", mod)  # already wrapped by peft for another adapter
    return mod if isinstance(mod, torch.nn.Linear) else None


def check_patch(pipe, patch: Patch, *, force: bool = False) -> None:
    """Raise ``PatchError`` unless ``patch`` fits this pipeline's text encoder(s) (shapes always; fingerprint unless
    ``force``)."""
    available = text_encoder_components(pipe)
    name = patch.path.name
    te_parts = [c for c in patch.components if c in TEXT_ENCODERS]
    if not te_parts:
        raise PatchError(f"patch {name} only changes CLIPModel modules ({', '.join(patch.components)}); "
                         "use erase_diffusion.patch.apply_to_clip for a CLIPModel")
    for component in te_parts:
        if component not in available:
            kind = "an SDXL patch (it changes text_encoder_2)" if component == "text_encoder_2" else f"a {component} patch"
            raise PatchError(f"patch {name} is {kind}, but this {type(pipe).__name__} has no {component}: "
                             f"it has {', '.join(available) or 'no text encoder diffusers can patch'}")
    for component in te_parts:
        te = getattr(pipe, component)
        mods = {m: (f.B.shape[0], f.A.shape[1]) for m, f in patch.layers.get(component, {}).items()}
        for module, (out_f, in_f) in mods.items():
            lin = find_linear(te, module)
            if lin is None:
                raise PatchError(f"patch {name}: {component} of this pipeline has no linear layer {module} "
                                 "(a patch for another architecture?)")
            if (lin.out_features, lin.in_features) != (out_f, in_f):
                raise PatchError(f"patch {name}: {component}.{module} is {out_f}x{in_f} in the patch but "
                                 f"{lin.out_features}x{lin.in_features} in this pipeline (made for another base model)")
        if not force:
            want = patch.metadata.get("fingerprints", {}).get(component)
            have = fingerprint(te)
            if want is None:
                raise PatchError(f"patch {name} records no fingerprint for {component}; pass force=True to load it anyway")
            if want != have:
                raise PatchError(
                    f"patch {name} was made for a {component} with fingerprint {want} (base model "
                    f"{patch.metadata.get('base_model')!r}); this pipeline's is {have}. Pass force=True (--force) to "
                    "load it anyway"
                )


def _lora_state_dict(patch: Patch, components: list[str]) -> dict[str, torch.Tensor]:
    """In-memory diffusers state dict of the LoRA factors of ``components`` (the text encoders).

    No metadata goes with an in-memory dict, so diffusers infers alpha = r per module (scale 1, ΔW = B @ A).
    """
    sd = {}
    for component in components:
        for module, f in patch.layers.get(component, {}).items():
            sd[f"{component}.{module}.lora_A.weight"] = f.A
            sd[f"{component}.{module}.lora_B.weight"] = f.B
    return sd


def _lora_components(pipe) -> dict[str, torch.nn.Module]:
    return {c: m for c in getattr(pipe, "_lora_loadable_modules", [])
            if isinstance(m := getattr(pipe, c, None), torch.nn.Module)}


def _snapshot(pipe) -> dict:
    """What ``_restore`` needs to undo a half-done load: per component its module objects, its tensors (references,
    not copies: loading adds wrappers and adapter weights but never writes into the base weights), the adapter state
    of every peft layer and the peft bookkeeping."""
    snap = {}
    for c, model in _lora_components(pipe).items():
        modules = dict(model.named_modules())
        snap[c] = {
            "modules": modules,
            "tensors": model.state_dict(keep_vars=True),
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "layers": {n: (copy.copy(m._active_adapter), m._disable_adapters) for n, m in modules.items()
                       if isinstance(m, BaseTunerLayer)},
            "peft_config": dict(model.peft_config) if hasattr(model, "peft_config") else None,
            "loaded": getattr(model, "_hf_peft_config_loaded", None),
        }
    return snap


def _restore(pipe, snap: dict) -> None:
    """Put every component back as ``_snapshot`` saw it: new peft wrappers replaced by the original modules, adapters
    added to existing wrappers deleted, the old active adapters and peft config back. Checks the result is the very
    same tensors under the same names (raises RuntimeError otherwise: the pipeline must not be used)."""
    for c, model in _lora_components(pipe).items():
        s = snap.get(c)
        if s is None:
            continue
        for name in sorted((n for n in s["modules"] if n), key=lambda n: n.count(".")):  # parents first
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if parent._modules.get(child) is not s["modules"][name]:
                parent._modules[child] = s["modules"][name]
        for name, (active, disabled) in s["layers"].items():
            layer = s["modules"][name]
            known = set((s["peft_config"] or {}).keys())
            with warnings.catch_warnings():  # "adapter X was active which is now deleted": restored just below
                warnings.simplefilter("ignore")
                for adapter in set(layer._all_available_adapter_names()) - known:
                    layer.delete_adapter(adapter)
            layer._active_adapter, layer._disable_adapters = active, disabled
        if s["peft_config"] is None:
            if hasattr(model, "peft_config"):
                del model.peft_config
        else:
            model.peft_config = dict(s["peft_config"])
        if s["loaded"] is not None:
            model._hf_peft_config_loaded = s["loaded"]
        for n, p in model.named_parameters():
            p.requires_grad_(s["requires_grad"].get(n, p.requires_grad))
        now = model.state_dict(keep_vars=True)
        if now.keys() != s["tensors"].keys() or any(now[k] is not v for k, v in s["tensors"].items()):
            raise RuntimeError(f"could not restore the pipeline's {c} after a failed load: do not use this pipeline")


def load_patches(pipe, patches, strengths=1.0, adapter_names=None, force: bool = False) -> list[str]:
    """Validate every patch, then load each as one diffusers adapter and activate them with their strengths.

    Returns the adapter names (default ``erase_<file stem>``). Exactly the adapters of this call are active afterwards
    (adapters loaded earlier stay loaded but inactive; ``set_strengths`` re-activates any set). All or nothing: every
    patch is validated (``load_patch``, ``check_patch``) before the first is loaded, and if diffusers still fails half-way
    every wrapper and adapter this call added is removed again, leaving the text encoders exactly as before (the same
    modules and tensors). ``force`` skips the fingerprint check, never the shape checks.
    """
    if isinstance(patches, (str, os.PathLike)):
        patches = [patches]
    patches = list(patches)
    if not patches:
        raise ValueError("no patches given")
    strengths = _check_strengths(_as_list(strengths, len(patches), "strengths"))
    existing = loaded_adapters(pipe)
    if adapter_names is None:
        adapter_names = []
        for p in patches:
            stem = "erase_" + "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in Path(p).stem)
            name, k = stem, 2
            while name in existing or name in adapter_names:
                name, k = f"{stem}_{k}", k + 1
            adapter_names.append(name)
    else:
        adapter_names = _as_list(adapter_names, len(patches), "adapter names")
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"adapter names must be distinct: {adapter_names}")
        taken = [n for n in adapter_names if n in existing]
        if taken:
            raise ValueError(f"adapter name(s) already loaded in this pipeline: {', '.join(taken)}")

    loaded_patches = [load_patch(p) for p in patches]  # validation of the files
    for patch in loaded_patches:  # ... and of their fit, before anything is loaded
        check_patch(pipe, patch, force=force)

    snap = _snapshot(pipe)  # all or nothing: on any failure below, every wrapper and adapter of this call goes again
    try:
        for patch, name in zip(loaded_patches, adapter_names):
            components = [c for c in patch.components if c in TEXT_ENCODERS]
            try:
                if "clip" not in patch.components:
                    pipe.load_lora_weights(str(patch.path), adapter_name=name)  # exactly what a user would call
                else:  # CLIPModel-only modules too: our loader hands diffusers the text encoders' LoRA in memory
                    pipe.load_lora_weights(_lora_state_dict(patch, components), adapter_name=name)
            except Exception as err:  # validated, yet diffusers / peft refused it: still the patch's fault
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise PatchError(f"patch {patch.path.name} could not be loaded by diffusers: {reason}") from err
        pipe.set_adapters(adapter_names, adapter_weights=strengths)
    except BaseException:
        _restore(pipe, snap)
        raise
    return adapter_names


def set_strengths(pipe, names, strengths) -> None:
    """``pipe.set_adapters(names, adapter_weights=strengths)`` after checking the names are loaded."""
    names = [names] if isinstance(names, str) else list(names)
    strengths = _check_strengths(_as_list(strengths, len(names), "strengths"))
    missing = sorted(set(names) - loaded_adapters(pipe))
    if missing:
        raise ValueError(f"adapter(s) not loaded: {', '.join(missing)}; loaded: {sorted(loaded_adapters(pipe))}")
    pipe.set_adapters(names, adapter_weights=strengths)


def fuse(pipe, names=None, strengths=None, lora_scale: float = 1.0) -> None:
    """Merge the active (or named) adapters into the text-encoder weights: ``fuse_lora(components=[text encoders])``.

    With ``strengths``, ``set_strengths(names, strengths)`` first (the fused ΔW honours adapter weights)."""
    if strengths is not None:
        if names is None:
            raise ValueError("strengths need adapter names")
        set_strengths(pipe, names, strengths)
    names = [names] if isinstance(names, str) else names
    pipe.fuse_lora(components=text_encoder_components(pipe), lora_scale=float(lora_scale), adapter_names=names)


def unfuse(pipe) -> None:
    """``unfuse_lora`` on the text encoders: subtract fused deltas again (adapters stay loaded)."""
    pipe.unfuse_lora(components=text_encoder_components(pipe))


def bake(model: str, patches, strengths=1.0, output_dir=None, force: bool = False, overwrite: bool = False) -> Path:
    """Load ``model``, load and fuse the patches into its text encoder(s), save the result as a new pipeline folder.

    Written to a temporary folder beside ``output_dir`` and renamed into place; an existing non-empty ``output_dir``
    is refused unless ``overwrite``. The output and the patch files are checked before the model loads.
    """
    if output_dir is None:
        raise ValueError("bake needs an output_dir")
    output_dir = check_output(output_dir, overwrite=overwrite, folder=True, option="output_dir")
    patches = [patches] if isinstance(patches, (str, os.PathLike)) else list(patches)
    _check_strengths(_as_list(strengths, len(patches), "strengths"))
    for p in patches:
        load_patch(p)
    pipe = load_pipeline(model)
    names = load_patches(pipe, patches, strengths, force=force)
    fuse(pipe, names)
    pipe.unload_lora_weights()  # drop the LoRA layers: the fused deltas stay in the weights
    with atomic_dir(output_dir) as tmp:
        pipe.save_pretrained(tmp)
    return output_dir
