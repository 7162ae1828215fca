"""Making and applying patches: weight changes → a patch file (``save_patch``), a patch → a ``CLIPModel``.

Other modules (closed-form nullspace erasure, CLIPErase training) only produce weight changes (an ``Edit``); this
module turns them into a file with its model card, fingerprints the text encoder a patch is made for, and merges a
patch into a transformers ``CLIPModel`` (``apply_to_clip``). The file format is ``erase_diffusion.patch_format``;
reading it back with validation is ``erase_diffusion.patch_reader``; the kohya / A1111 export is
``erase_diffusion.kohya``; loading into diffusers pipelines is ``erase_diffusion.pipelines.loading``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import __version__
from .concepts import ConceptSpec
from .model_card import card_path, write_model_card
from .patch_format import (
    FORMAT_VERSION,
    META_PREFIX,
    TEXT_ENCODERS,
    LoraFactors,
    Patch,
    PatchError,
    check_module_name,
    common_rank,
    content_sha256,
    has_attention,
    peft_name,
    save_atomic,
)
from .patch_reader import describe_patch, load_patch


@dataclass
class Edit:
    """What an erasure method returns: the weight change, and what the patch and its model card should record.

    ``layers``: component (``text_encoder``, ``text_encoder_2``, ``clip``) → module path (``text_model.``-spelled for
    text encoders) → LoRA factors with ΔW = B @ A. ``settings``: the method's settings, stored in the patch header.
    ``fingerprints``: component → ``fingerprint`` of the original module the change applies to. ``figures``: this
    run's measurements (timings, final loss, …), written to the model card only, so that the patch's bytes depend on
    the weights and settings alone.
    """

    method: str
    layers: dict[str, dict[str, LoraFactors]]
    settings: dict = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# factors and fingerprints


def factors_from_delta(delta: Tensor, rank: int | None = None, rtol: float = 1e-6) -> tuple[LoraFactors, float]:
    """Exact low-rank export of ΔW (out, in) by SVD: B = U√S, A = √S Vᵀ.

    ``rank=None`` keeps the numerical rank (singular values above ``rtol`` × the largest); a given rank truncates.
    Returns the factors (float32) and the relative Frobenius residual ‖ΔW − BA‖ / ‖ΔW‖ (0 for a zero ΔW, which
    exports as rank-1 zero factors).
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix (out, in), got shape {tuple(delta.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta contains NaN or Inf")
    d = delta.detach().to("cpu", torch.float64)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    if rank is None:
        rank = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    if rank < 0 or rank > S.numel():
        raise ValueError(f"rank must be between 1 and {S.numel()}, got {rank}")
    if rank == 0:  # a zero change: rank-1 zero factors keep the file loadable
        out_f, in_f = d.shape
        return LoraFactors(A=torch.zeros(1, in_f), B=torch.zeros(out_f, 1)), 0.0
    root = S[:rank].sqrt()
    B = (U[:, :rank] * root).float().contiguous()
    A = (root[:, None] * Vh[:rank]).float().contiguous()
    norm = torch.linalg.matrix_norm(d)
    residual = float(torch.linalg.matrix_norm(d - B.double() @ A.double()) / norm) if norm > 0 else 0.0
    return LoraFactors(A=A, B=B), residual


def clip_core(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The module that owns embeddings / encoder / final_layer_norm, in either CLIPTextModel layout (and CLIPModel)."""
    return getattr(text_encoder, "text_model", text_encoder)


def fingerprint(module: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A short, stable hash of a text encoder's weights (16 hex digits).

    Hashes, for every floating-point tensor of the text tower (``clip_core``: so a ``CLIPModel``, an old-layout and a
    flattened ``CLIPTextModel`` holding the same weights agree), its name, shape and a deterministic strided subsample
    of its values rounded to float16 (so a pipeline loaded in fp16 matches its fp32 base). Loaded-but-unfused LoRA
    layers are ignored (``lora_*`` parameters are skipped, ``.base_layer`` is removed from names); fused changes count.
    """
    core = clip_core(module)
    h = hashlib.sha256()
    items = []
    for name, t in core.state_dict().items():
        if not torch.is_floating_point(t) or "lora_" in name:
            continue
        items.append((name.replace(".base_layer", ""), t))
    for name, t in sorted(items, key=lambda x: x[0]):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float16).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _lora_config(component: str, mods: dict[str, LoraFactors]) -> dict:
    """diffusers' per-component LoraConfig fields: alpha == r everywhere, mixed ranks via rank/alpha_pattern."""
    ranks = {peft_name(component, m): f.rank for m, f in mods.items()}
    r = common_rank(list(ranks.values()))
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "use_dora": False, "lora_bias": False,
    }


def save_patch(edit: Edit, spec: ConceptSpec, base_model: str, path) -> Path:
    """Write ``edit`` as a patch for ``base_model`` to ``path`` and its model card beside it (``<patch>.md``), each
    atomically; returns the patch's path. ``spec`` names what was erased and protected (``spec.erase``,
    ``spec.keep``). This is what every method's result goes through."""
    path = write_patch(path, edit.layers, method=edit.method, settings=edit.settings, erased=spec.erase,
                       protected=spec.keep, base_model=base_model, fingerprints=edit.fingerprints)
    write_card(path, edit.figures)
    return path


def write_card(path, figures: dict | None = None) -> Path:
    """(Re)write the model card beside the patch at ``path`` from the patch's own metadata plus ``figures``."""
    return write_model_card(describe_patch(path), card_path(path), figures)


def _lora_tensors(layers: dict[str, dict[str, LoraFactors]]) -> tuple[dict[str, Tensor], dict[str, dict[str, int]]]:
    """The file's tensors (``<component>.<module>.lora_A/B.weight``) and component → module → rank, each module
    checked: a name diffusers can load, factors that form a finite B @ A, at least one attention projection."""
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for component, mods in layers.items():
        for module, f in mods.items():
            check_module_name(component, module)
            A, B = f.A.detach().cpu(), f.B.detach().cpu()
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
                raise PatchError(f"{component}.{module}: A {tuple(A.shape)} and B {tuple(B.shape)} do not form B @ A")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise PatchError(f"{component}.{module}: factors contain NaN or Inf")
            tensors[f"{component}.{module}.lora_A.weight"] = A.contiguous()
            tensors[f"{component}.{module}.lora_B.weight"] = B.contiguous()
            ranks.setdefault(component, {})[module] = int(A.shape[0])
    for component in TEXT_ENCODERS:
        if component in layers and not has_attention(layers[component]):
            raise PatchError(
                f"{component}: an MLP-only LoRA does not load in diffusers; include at least one attention projection"
            )
    return tensors, ranks


def _header(layers: dict[str, dict[str, LoraFactors]], ranks: dict[str, dict[str, int]], *, method: str,
            settings: dict, erased: list[str], protected: list[str], base_model: str,
            fingerprints: dict[str, str]) -> dict[str, str]:
    """The safetensors metadata: ours (``erase_diffusion.*``) and diffusers' ``lora_adapter_metadata``."""
    adapter_meta = {}
    for component, mods in layers.items():
        if component in TEXT_ENCODERS:
            adapter_meta.update({f"{component}.{k}": v for k, v in _lora_config(component, mods).items()})
    meta = {
        "format": "pt",
        f"{META_PREFIX}format_version": str(FORMAT_VERSION),
        f"{META_PREFIX}kind": "lora",
        f"{META_PREFIX}method": str(method),
        f"{META_PREFIX}settings": json.dumps(settings, sort_keys=True, default=str),
        f"{META_PREFIX}erased": json.dumps(list(erased)),
        f"{META_PREFIX}protected": json.dumps(list(protected)),
        f"{META_PREFIX}base_model": str(base_model),
        f"{META_PREFIX}fingerprints": json.dumps(dict(fingerprints), sort_keys=True),
        f"{META_PREFIX}ranks": json.dumps(ranks, sort_keys=True),
        f"{META_PREFIX}lora_alpha": "rank",  # alpha == r for every module: scale 1, ΔW = B @ A
        f"{META_PREFIX}version": __version__,
    }
    if adapter_meta:
        meta["lora_adapter_metadata"] = json.dumps(adapter_meta, indent=2, sort_keys=True)
    return meta


def write_patch(
    path,
    layers: dict[str, dict[str, LoraFactors]],
    *,
    method: str,
    settings: dict,
    erased: list[str],
    protected: list[str],
    base_model: str,
    fingerprints: dict[str, str],
) -> Path:
    """The file format: write a patch atomically (temp file + ``os.replace``), no model card; returns its path.
    Methods call ``save_patch``; this is for tools and tests that build a file directly.

    ``layers``: component → module path (``text_model.``-spelled for text encoders) → factors.
    """
    layers = {c: m for c, m in layers.items() if m}
    if not layers:
        raise PatchError("a patch needs at least one module")
    tensors, ranks = _lora_tensors(layers)
    meta = _header(layers, ranks, method=method, settings=settings, erased=erased, protected=protected,
                   base_model=base_model, fingerprints=fingerprints)
    meta[f"{META_PREFIX}sha256"] = content_sha256(tensors)  # verified by load_patch: catches flipped tensor bytes
    return save_atomic(tensors, path, meta)


# ---------------------------------------------------------------------------------------------------------------------
# CLIPModel merge


def patch_deltas(patch: Patch, component: str) -> dict[str, Tensor]:
    """module path → dense ΔW = B @ A (float32) for one component."""
    return {m: f.delta() for m, f in patch.layers.get(component, {}).items()}


def apply_to_clip(model, patch, strength: float = 1.0, *, force: bool = False) -> None:
    """Merge a patch's ΔW (× strength) into a transformers ``CLIPModel`` **in place** (callers copy first).

    Component ``text_encoder`` and ``clip`` module paths are used as-is inside the CLIPModel. All shapes (and, unless
    ``force``, the text-tower fingerprint) are checked before any weight changes. ``text_encoder_2`` (SDXL's OpenCLIP
    encoder) has no counterpart in a CLIP-L CLIPModel and is refused.
    """
    if not isinstance(patch, Patch):
        patch = load_patch(patch)
    if "text_encoder_2" in patch.components:
        raise PatchError("this patch changes text_encoder_2 (SDXL), which a CLIPModel does not have")
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise PatchError(f"strength must be a number, got {strength!r}") from None
    if not math.isfinite(strength):
        raise PatchError(f"strength must be finite, got {strength}")
    if not force:
        expected = patch.metadata.get("fingerprints", {})
        want = expected.get("text_encoder") or expected.get("clip")
        if want is None:  # as load_patches: a patch that does not say what it was made for needs force
            raise PatchError(f"patch {patch.path.name} records no fingerprint; pass force=True to apply it anyway")
        have = fingerprint(model)
        if have != want:
            raise PatchError(
                f"patch {patch.path.name} was made for a text encoder with fingerprint {want}, this CLIPModel's text "
                f"tower has {have} (pass force=True to apply anyway)"
            )
    modules = dict(model.named_modules())
    plan = []
    for component in ("text_encoder", "clip"):
        for name, delta in patch_deltas(patch, component).items():
            mod = modules.get(name)
            weight = getattr(mod, "weight", None)
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(delta.shape):
                got = "missing" if mod is None else tuple(weight.shape) if isinstance(weight, torch.Tensor) else "no weight"
                raise PatchError(f"{component}.{name}: patch ΔW {tuple(delta.shape)} does not fit this CLIPModel ({got})")
            plan.append((weight, delta))
    with torch.no_grad():
        for weight, delta in plan:
            weight.add_(delta.to(weight.device, weight.dtype), alpha=float(strength))


# ---------------------------------------------------------------------------------------------------------------------
# command line
