"""The patch: a small safetensors file of LoRA tensors for the text encoder(s) that plain diffusers loads.

Other modules (closed-form nullspace erasure, CLIPErase training) only produce weight changes; this module turns them
into a file, reads it back with validation, describes it, converts it to the kohya/A1111 key format and merges it into
a transformers ``CLIPModel``. Loading into diffusers pipelines lives in ``erase_diffusion.pipelines.loading``.

File layout (``kind = "lora"``, the normal case; loads with ``pipe.load_lora_weights(path, adapter_name=...)``)::

    text_encoder.text_model.encoder.layers.3.self_attn.out_proj.lora_A.weight     (r, in)
    text_encoder.text_model.encoder.layers.3.self_attn.out_proj.lora_B.weight     (out, r)
    text_encoder_2.text_model....                                                  SDXL's second encoder
    clip.visual_projection.lora_A.weight / .lora_B.weight                          CLIPModel-only modules

ΔW = B @ A exactly: every module is written with ``lora_alpha == r`` (scale 1); any scale is folded into the factors.
The header holds diffusers' ``lora_adapter_metadata`` (per component: r, lora_alpha, rank_pattern/alpha_pattern for
mixed ranks, layer-specific target_modules) plus our own ``erase_diffusion.*`` keys.

Component ``clip`` holds modules of a ``CLIPModel`` that diffusers pipelines do not have. diffusers' SD loaders only
read keys that start with ``text_encoder.``/``text_encoder_2.``/``unet.``, so such keys are ignored by plain diffusers.

**Full mode** (``kind = "full"``): dense ΔW tensors for changes that are not low-rank, stored under keys ending in
``.delta`` (``text_encoder.text_model.encoder.layers.3.mlp.fc1.delta``), optionally next to LoRA factors in the same
file. Those keys contain no "lora", so plain ``load_lora_weights`` rejects the file ("Invalid LoRA checkpoint") instead
of silently half-loading it; the metadata says ``erase_diffusion.kind = full``. The project loader
(``erase_diffusion.pipelines.loading.load_patches``) reads it and turns each ΔW into exact full-rank LoRA factors
(an identity on the smaller side), so strengths, stacking, fuse and unfuse still go through diffusers' adapter
machinery. ``apply_to_clip`` merges ΔW directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from . import __version__
from .atomic import atomic_path
from .concepts import ConceptSpec
from .model_card import card_path, write_model_card

FORMAT_VERSION = 1
META_PREFIX = "erase_diffusion."
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = TEXT_ENCODERS + ("clip",)
# modules diffusers' text-encoder loader can target (rank detection only looks at these suffixes)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
KOHYA_PREFIX = {"sd": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
_MAX_HEADER = 100 * 1024 * 1024
_KEY = re.compile(r"^(text_encoder|text_encoder_2|clip)\.([A-Za-z0-9_.]+?)\.(lora_A\.weight|lora_B\.weight|delta)$")


class PatchError(ValueError):
    """A patch file that is not valid, or does not fit the model it is applied to."""


@dataclass
class LoraFactors:
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> Tensor:
        return self.B.float() @ self.A.float()


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


@dataclass
class Patch:
    layers: dict[str, dict[str, LoraFactors]]
    full: dict[str, dict[str, Tensor]]
    metadata: dict
    path: Path

    @property
    def kind(self) -> str:
        return self.metadata.get("kind", "lora")

    @property
    def components(self) -> list[str]:
        return sorted(set(self.layers) | set(self.full))


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


def _peft_name(component: str, module: str) -> str:
    """Target spelling that matches both CLIPTextModel layouts (and CLIPTextModelWithProjection)."""
    return module.removeprefix("text_model.") if component in TEXT_ENCODERS else module


def _check_module_name(component: str, module: str, dense: bool = False) -> None:
    if component not in COMPONENTS:
        raise PatchError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", module) or "lora" in module:
        raise PatchError(f"bad module path {module!r} in component {component!r}")
    if component in TEXT_ENCODERS:
        if not module.startswith("text_model."):
            raise PatchError(f"text-encoder module paths are spelled with 'text_model.': got {component}.{module}")
        if not dense and module.rsplit(".", 1)[-1] not in TEXT_ENCODER_TARGETS:
            raise PatchError(
                f"{component}.{module}: diffusers can only load LoRA on {', '.join(TEXT_ENCODER_TARGETS)} of a text "
                "encoder; put other CLIPModel modules under component 'clip'"
            )


def _common_rank(ranks: list[int]) -> int:
    """The most frequent rank (the smaller one on a tie)."""
    return max(set(ranks), key=lambda v: (ranks.count(v), -v))


def _has_attention(modules) -> bool:
    """diffusers only recognises a text-encoder LoRA that names at least one attention projection."""
    return any(m.rsplit(".", 1)[-1] in ATTENTION_TARGETS for m in modules)


def _lora_config(component: str, mods: dict[str, LoraFactors]) -> dict:
    """diffusers' per-component LoraConfig fields: alpha == r everywhere, mixed ranks via rank/alpha_pattern."""
    ranks = {_peft_name(component, m): f.rank for m, f in mods.items()}
    r = _common_rank(list(ranks.values()))
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "use_dora": False, "lora_bias": False,
    }


def _save_atomic(tensors: dict[str, Tensor], path, meta: dict[str, str]) -> Path:
    """safetensors to a temp file beside ``path``, then rename: a reader never sees a half-written file."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return Path(path)


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
    full: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """The file format: write a patch atomically (temp file + ``os.replace``), no model card; returns its path.
    Methods call ``save_patch``; this is for tools and tests that build a file directly (full mode included).

    ``layers``: component → module path (``text_model.``-spelled for text encoders) → factors. ``full``: component →
    module path → dense ΔW (out, in); a file with any makes a full-mode patch (see the module docstring).
    """

    full = {c: m for c, m in (full or {}).items() if m}
    layers = {c: m for c, m in layers.items() if m}
    if not layers and not full:
        raise PatchError("a patch needs at least one module")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for component, mods in layers.items():
        for module, f in mods.items():
            _check_module_name(component, module)
            A, B = f.A.detach().cpu(), f.B.detach().cpu()
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
                raise PatchError(f"{component}.{module}: A {tuple(A.shape)} and B {tuple(B.shape)} do not form B @ A")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise PatchError(f"{component}.{module}: factors contain NaN or Inf")
            tensors[f"{component}.{module}.lora_A.weight"] = A.contiguous()
            tensors[f"{component}.{module}.lora_B.weight"] = B.contiguous()
            ranks.setdefault(component, {})[module] = int(A.shape[0])
    for component, mods in full.items():
        for module, d in mods.items():
            _check_module_name(component, module, dense=True)
            if d.ndim != 2 or not torch.isfinite(d).all():
                raise PatchError(f"{component}.{module}: a full-mode delta must be a finite matrix")
            if component in layers and module in layers[component]:
                raise PatchError(f"{component}.{module} is both in layers and in full")
            tensors[f"{component}.{module}.delta"] = d.detach().cpu().contiguous()
    for component in TEXT_ENCODERS:
        if component in layers and not _has_attention(layers[component]):
            raise PatchError(
                f"{component}: an MLP-only LoRA does not load in diffusers; include at least one attention projection"
            )

    adapter_meta = {}
    for component, mods in layers.items():
        if component in TEXT_ENCODERS:
            adapter_meta.update({f"{component}.{k}": v for k, v in _lora_config(component, mods).items()})
    meta = {
        "format": "pt",
        f"{META_PREFIX}format_version": str(FORMAT_VERSION),
        f"{META_PREFIX}kind": "full" if full else "lora",
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
    meta[f"{META_PREFIX}sha256"] = _content_sha256(tensors)  # verified by load_patch: catches flipped tensor bytes

    return _save_atomic(tensors, path, meta)


# ---------------------------------------------------------------------------------------------------------------------
# reading
#
# ``load_patch`` is the one validation every reader goes through (pipelines.loading.load_patches, inspect /
# describe_patch, export-kohya, apply_to_clip, evaluate, bake, the app's upload). It never unpickles, touches no model,
# and every failure is a ``PatchError`` with a one-line reason.

# ΔW of a real edit is of the order of the weights it changes (|W| ≲ 10 in CLIP); a factor or ΔW entry beyond this is
# a corrupted or hostile file (1e30-sized factors gave NaN conditioning).
MAX_ABS = 1e3
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_JSON_FIELDS = {"settings": dict, "erased": list, "protected": list, "fingerprints": dict, "ranks": dict,
                "figures": dict}
# the LoraConfig fields write_patch writes (checked one by one in _check_adapter_metadata) ...
_LORA_FIELDS = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "lora_dropout", "bias",
                "use_dora", "lora_bias", "use_rslora"}
# ... and other LoraConfig fields a tool may add, accepted at these values (anything else must be off: None / False /
# empty), because diffusers passes every field to LoraConfig and some (init_lora_weights="pissa", layer_replication)
# change the base weights or the architecture.
_LORA_HARMLESS = {"peft_type": ("LORA",), "init_lora_weights": (True, False), "inference_mode": (True, False),
                  "megatron_core": ("megatron.core",), "qalora_group_size": (16,)}
_LORA_FREE_TEXT = {"peft_version", "base_model_name_or_path", "revision"}


def _content_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in key order: written by write_patch, checked on load."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header by hand (clear errors; nothing is unpickled, ever)."""
    try:
        if not path.exists():
            raise PatchError(f"patch {path} does not exist")
        if not path.is_file():  # directories, FIFOs, devices (a symlink counts as what it points to)
            raise PatchError(f"patch {path} is not a regular file")
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise PatchError(f"{path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise PatchError(f"{path} is not a safetensors file, or it is truncated (header length {n}, size {size})")
            raw = fh.read(n)
    except (OSError, ValueError) as err:  # ValueError: a NUL in the name; PatchError passes through unchanged
        if isinstance(err, PatchError):
            raise
        raise PatchError(f"patch {path} cannot be read: {err}") from None
    if raw[:1] != b"{":  # pickles (torch.save's zip or protocol-2 bytes) and other formats end here
        raise PatchError(f"{path} is not a safetensors file (pickled checkpoints are never loaded)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PatchError(f"{path} has a corrupted safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise PatchError(f"{path} has a corrupted safetensors header")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, IndexError, ValueError):
            raise PatchError(f"{path} has a corrupted safetensors header (entry {key!r})") from None
        if not 0 <= begin <= stop:
            raise PatchError(f"{path} has a corrupted safetensors header (entry {key!r}: offsets {begin}, {stop})")
        end = max(end, stop)
    if 8 + n + end != size:
        raise PatchError(f"{path} is truncated or has trailing data: header promises {8 + n + end} bytes, file has {size}")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or
                             not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise PatchError(f"{path} has a corrupted safetensors header (__metadata__ must map strings to strings)")
    return header


def _parse_metadata(raw: dict[str, str], path: Path) -> dict:
    version_text = raw.get(f"{META_PREFIX}format_version")
    if version_text is None:
        raise PatchError(f"{path} is a safetensors file but not an erase-diffusion patch (no erase_diffusion metadata)")
    if not re.fullmatch(r"[0-9]{1,6}", version_text) or int(version_text) < 1:
        raise PatchError(f"{path}: metadata {META_PREFIX}format_version {version_text!r} is not a format number")
    version = int(version_text)
    if version > FORMAT_VERSION:
        raise PatchError(f"{path} has patch format {version}; this erase-diffusion reads up to {FORMAT_VERSION}")
    out: dict = {}
    for key, value in raw.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key.removeprefix(META_PREFIX)
        if name in _JSON_FIELDS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise PatchError(f"{path}: metadata {key} is not valid JSON") from None
            if not isinstance(value, _JSON_FIELDS[name]):
                raise PatchError(f"{path}: metadata {key} must be a JSON {_JSON_FIELDS[name].__name__}")
        out[name] = value
    out["format_version"] = version
    for name in ("erased", "protected"):
        if not all(isinstance(v, str) for v in out.get(name, [])):
            raise PatchError(f"{path}: metadata {META_PREFIX}{name} must be a list of strings")
    fps = out.get("fingerprints", {})
    if not all(k in COMPONENTS and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v) for k, v in fps.items()):
        raise PatchError(f"{path}: metadata {META_PREFIX}fingerprints must map components to 16 hex digits")
    if out.get("kind", "lora") not in ("lora", "full"):
        raise PatchError(f"{path}: metadata {META_PREFIX}kind must be 'lora' or 'full', got {out['kind']!r}")
    if out.get("lora_alpha", "rank") != "rank":  # every module is written with alpha == r (scale 1)
        raise PatchError(f"{path}: metadata {META_PREFIX}lora_alpha must be 'rank', got {out['lora_alpha']!r}")
    if "sha256" in out and not re.fullmatch(r"[0-9a-f]{64}", out["sha256"]):
        raise PatchError(f"{path}: metadata {META_PREFIX}sha256 is not a sha256 digest")
    if "lora_adapter_metadata" in raw:
        try:
            adapter = json.loads(raw["lora_adapter_metadata"])
        except json.JSONDecodeError:
            raise PatchError(f"{path}: lora_adapter_metadata is not valid JSON") from None
        if not isinstance(adapter, dict):
            raise PatchError(f"{path}: lora_adapter_metadata must be a JSON object")
        out["lora_adapter_metadata"] = adapter
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_adapter_metadata(adapter: dict, layers: dict[str, dict[str, LoraFactors]], path: Path) -> None:
    """diffusers builds each text encoder's LoraConfig from these fields: they must give exactly ΔW = B @ A on exactly
    the modules in the file (alpha == r, no DoRA / rsLoRA, targets == tensors, ranks as stored)."""
    by_component: dict[str, dict] = {}
    for key, value in adapter.items():
        component, _, field = key.partition(".")
        if component not in TEXT_ENCODERS or not field:
            raise PatchError(f"{path}: lora_adapter_metadata key {key!r} is not '<text encoder>.<LoraConfig field>'")
        by_component.setdefault(component, {})[field] = value
    have = {c for c in layers if c in TEXT_ENCODERS}
    if set(by_component) != have:
        raise PatchError(f"{path}: lora_adapter_metadata describes {sorted(by_component) or 'no component'} but the "
                         f"file holds LoRA for {sorted(have) or 'no text encoder'}")
    for component, cfg in by_component.items():
        where = f"{path}: lora_adapter_metadata {component}"
        for field, value in cfg.items():
            if field in _LORA_FIELDS or field in _LORA_FREE_TEXT and (value is None or isinstance(value, str)):
                continue
            if field in _LORA_HARMLESS and value in _LORA_HARMLESS[field] and not isinstance(value, (dict, list)):
                continue
            if value is None or value is False or value == {} or value == []:  # a feature switched off
                continue
            raise PatchError(f"{where}.{field} = {value!r} is not supported (it would change what diffusers loads)")
        for flag in ("use_dora", "use_rslora", "lora_bias"):
            if cfg.get(flag, False) is not False:
                raise PatchError(f"{where}.{flag} must be false: a patch is plain LoRA with ΔW = B @ A")
        if cfg.get("bias", "none") != "none":
            raise PatchError(f"{where}.bias must be 'none'")
        dropout = cfg.get("lora_dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or dropout != 0:
            raise PatchError(f"{where}.lora_dropout must be 0")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not (_is_int(r) and r >= 1):
            raise PatchError(f"{where}.r must be a positive integer, got {r!r}")
        if alpha != r or not _is_int(alpha):
            raise PatchError(f"{where}.lora_alpha is {alpha!r} but must equal r = {r} (scale 1: ΔW = B @ A)")
        ranks = {_peft_name(component, m): f.rank for m, f in layers[component].items()}
        targets = cfg.get("target_modules")
        if not isinstance(targets, list) or sorted(map(str, targets)) != sorted(ranks) or len(targets) != len(ranks):
            raise PatchError(f"{where}.target_modules does not list exactly the {len(ranks)} modules in the file")
        patterns = {}
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = cfg.get(name, {})
            if not isinstance(pattern, dict) or not set(pattern) <= set(ranks) or \
                    not all(_is_int(v) and v >= 1 for v in pattern.values()):
                raise PatchError(f"{where}.{name} must map modules of the file to positive integers")
            patterns[name] = pattern
        for module, rank in ranks.items():
            declared = patterns["rank_pattern"].get(module, r)
            declared_alpha = patterns["alpha_pattern"].get(module, alpha)
            if declared != rank or declared_alpha != rank:
                raise PatchError(f"{where}: {module} has rank {rank} in the file but r {declared}, alpha "
                                 f"{declared_alpha} in the metadata")


def _check_tensor(key: str, t: Tensor, path: Path) -> None:
    if t.dtype not in _DTYPES or t.ndim != 2 or min(t.shape) < 1:
        raise PatchError(f"{path}: {key} must be a non-empty float32/float16/bfloat16 matrix, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise PatchError(f"{path}: {key} contains NaN or Inf")
    biggest = float(t.abs().max())
    if biggest > MAX_ABS:
        raise PatchError(f"{path}: {key} has an entry of magnitude {biggest:.3g} (> {MAX_ABS:g}): not a plausible edit")


def _read_and_check(path) -> Patch:
    """``load_patch`` without its last-resort wrapper."""
    import warnings

    from safetensors import SafetensorError, safe_open

    try:
        path = Path(path)
    except TypeError:
        raise PatchError(f"a patch is a file path, got {type(path).__name__}") from None
    header = _read_header(path)
    metadata = _parse_metadata(header.get("__metadata__") or {}, path)
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PatchError(f"{path} could not be read as safetensors: {reason}") from None

    pieces: dict[tuple[str, str], dict[str, Tensor]] = {}
    full: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise PatchError(f"{path}: key {key!r} does not belong in a patch")
        component, module, what = m.groups()
        _check_module_name(component, module, dense=what == "delta")
        _check_tensor(key, t, path)
        if what == "delta":
            if metadata.get("kind") != "full":
                raise PatchError(f"{path}: dense delta {key} in a patch whose metadata does not say kind=full")
            full.setdefault(component, {})[module] = t
        else:
            pieces.setdefault((component, module), {})[what.split(".")[0]] = t
    layers: dict[str, dict[str, LoraFactors]] = {}
    for (component, module), ab in pieces.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise PatchError(f"{path}: {component}.{module} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.shape[0] != B.shape[1]:
            raise PatchError(f"{path}: {component}.{module} rank mismatch: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")
        if module in full.get(component, {}):
            raise PatchError(f"{path}: {component}.{module} is both LoRA and dense")
        f = LoraFactors(A=A, B=B)
        biggest = float(f.delta().abs().max())
        if not biggest <= MAX_ABS:  # also catches a product that overflows to Inf
            raise PatchError(f"{path}: {component}.{module} has a ΔW entry of magnitude {biggest:.3g} (> {MAX_ABS:g})")
        layers.setdefault(component, {})[module] = f
    if not layers and not full:
        raise PatchError(f"{path} holds no modules")
    if metadata.get("kind") == "full" and not full:
        raise PatchError(f"{path}: metadata says kind=full but the file holds no dense delta")
    for component, mods in layers.items():
        if component in TEXT_ENCODERS and not _has_attention(mods):
            raise PatchError(f"{path}: {component} LoRA is MLP-only, which diffusers cannot load")
    ranks = metadata.get("ranks")
    if ranks is None:
        raise PatchError(f"{path}: metadata {META_PREFIX}ranks is missing")
    declared = {f"{c}.{m}": k for c, mods in ranks.items() if isinstance(mods, dict) for m, k in mods.items()}
    actual = {f"{c}.{m}": f.rank for c, mods in layers.items() for m, f in mods.items()}
    if declared != actual or not all(isinstance(mods, dict) for mods in ranks.values()):
        wrong = sorted(k for k in declared.keys() | actual.keys() if declared.get(k) != actual.get(k))
        detail = f" ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})" if wrong else ""
        raise PatchError(f"{path}: metadata {META_PREFIX}ranks does not match the modules and ranks in the file{detail}")
    if "lora_adapter_metadata" in metadata:
        _check_adapter_metadata(metadata["lora_adapter_metadata"], layers, path)
    # last, so that a structural problem gets its own reason; what is left is silent corruption of the values
    want = metadata.get("sha256")
    if want is None:
        warnings.warn(f"{path.name} has no content checksum (written by erase-diffusion "
                      f"{metadata.get('version', '< 0.1')}): its tensors cannot be verified", stacklevel=3)
    elif _content_sha256(tensors) != want:
        raise PatchError(f"{path}: the tensors do not match the checksum in the metadata (the file is corrupted)")
    return Patch(layers=layers, full=full, metadata=metadata, path=path)


def load_patch(path) -> Patch:
    """Read and validate a patch before anything touches a model. Raises ``PatchError`` (a ``ValueError``).

    Checked: a regular safetensors file (never unpickled), a well-formed header with erase-diffusion metadata, the
    content checksum (a warning for older patches without one), only LoRA / delta keys of known components, finite
    float matrices of plausible magnitude, A and B of each module present with matching ranks, the recorded ranks and
    diffusers' ``lora_adapter_metadata`` (alpha == r, no DoRA / rsLoRA, targets == the tensors present). Whether the
    patch fits a model is checked by the loaders (``check_patch``, ``apply_to_clip``).
    """
    try:
        return _read_and_check(path)
    except PatchError:
        raise
    except Exception as err:  # the contract is one PatchError per bad file; the fuzz test keeps this branch unused
        raise PatchError(f"{path}: not a valid patch ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def describe_patch(path) -> dict:
    """What ``erase-diffusion inspect`` prints."""
    patch = load_patch(path)
    md = patch.metadata
    ranks = sorted({f.rank for mods in patch.layers.values() for f in mods.values()})
    params = sum(f.A.numel() + f.B.numel() for mods in patch.layers.values() for f in mods.values())
    params += sum(d.numel() for mods in patch.full.values() for d in mods.values())
    modules = {c: sorted(set(patch.layers.get(c, {})) | set(patch.full.get(c, {}))) for c in patch.components}
    return {
        "path": str(patch.path),
        "size_bytes": patch.path.stat().st_size,
        "kind": patch.kind,
        "method": md.get("method"),
        "erased": md.get("erased", []),
        "protected": md.get("protected", []),
        "base_model": md.get("base_model"),
        "fingerprints": md.get("fingerprints", {}),
        "components": {c: len(m) for c, m in modules.items()},
        "modules": modules,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "lora_alpha": md.get("lora_alpha", "rank"),
        "parameters": params,
        "settings": md.get("settings", {}),
        "figures": md.get("figures", {}),
        "format_version": md.get("format_version"),
        "erase_diffusion_version": md.get("version"),
    }


# ---------------------------------------------------------------------------------------------------------------------
# kohya export, CLIPModel merge


def _kohya_complete_attention(mods: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    """Zero rank-1 factors for the q/k/v/out projections missing from a layer that has one of them.

    A1111 runs SD 2's and SDXL's second encoder as OpenCLIP, whose q/k/v live in one ``nn.MultiheadAttention``, and
    applies a layer's attention LoRA only when q, k, v and out are all in the file (extensions-builtin/Lora/
    networks.py ``network_apply_weights``); otherwise it silently drops them. Zero factors change nothing in any tool.
    CLIP's attention projections are all hidden × hidden, so one present projection gives the shapes."""
    out = dict(mods)
    for module, f in mods.items():
        layer, _, proj = module.rpartition(".")
        if proj in ATTENTION_TARGETS:
            for p in ATTENTION_TARGETS:
                zero = LoraFactors(f.A.new_zeros(1, f.A.shape[1]), f.B.new_zeros(f.B.shape[0], 1))
                out.setdefault(f"{layer}.{p}", zero)
    return out


def export_kohya(src, dst) -> Path:
    """Convert a patch to kohya / A1111 keys (``lora_te_`` for SD 1/2, ``lora_te1_``/``lora_te2_`` for SDXL).

    ``.lora_down.weight`` = A, ``.lora_up.weight`` = B·r/alpha, one ``.alpha`` value for all modules (kohya scale
    alpha / r), so ΔW = B @ A exactly. A layer with some but not all of q/k/v/out gets zero factors for the rest
    (A1111 needs all four on OpenCLIP encoders). Only text-encoder LoRA modules can be
    expressed; a patch with ``clip`` modules or dense deltas is refused.
    Checked against ComfyUI's, Forge's and A1111's key maps and scale rules in tests/test_tool_keymaps.py.
    """

    patch = load_patch(src)
    if patch.full or "clip" in patch.layers:
        raise PatchError("only text-encoder LoRA patches can be exported to kohya format (no 'clip' modules, no dense deltas)")
    names = KOHYA_PREFIX["sdxl" if "text_encoder_2" in patch.layers else "sd"]
    # One alpha for the whole file: diffusers 0.42's kohya path builds a wrong text-encoder alpha_pattern when alphas
    # differ (it drops the module name), so mixed ranks keep alpha = the most common rank and fold alpha / r into B.
    alpha = _common_rank([f.rank for mods in patch.layers.values() for f in mods.values()])
    tensors = {}
    for component, mods in patch.layers.items():
        for module, f in _kohya_complete_attention(mods).items():
            stem = names[component] + module.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = f.A.contiguous()
            up = f.B if f.rank == alpha else f.B * (f.rank / alpha)
            tensors[f"{stem}.lora_up.weight"] = up.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    meta = {"format": "pt", "ss_network_module": "networks.lora", "erase_diffusion.exported_from": str(patch.path.name)}
    for key in ("method", "base_model"):
        meta[f"{META_PREFIX}{key}"] = str(patch.metadata.get(key))
    meta[f"{META_PREFIX}erased"] = json.dumps(patch.metadata.get("erased", []))
    return _save_atomic(tensors, dst, meta)


def patch_deltas(patch: Patch, component: str) -> dict[str, Tensor]:
    """module path → dense ΔW (float32) for one component, LoRA and full mode together."""
    out = {m: f.delta() for m, f in patch.layers.get(component, {}).items()}
    out.update({m: d.float() for m, d in patch.full.get(component, {}).items()})
    return out


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


def add_cli_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "inspect":
        parser.add_argument("patch", help="patch file (.safetensors)")
    elif command == "export-kohya":
        parser.add_argument("patch", help="patch file (.safetensors)")
        parser.add_argument("output", help="where to write the kohya / A1111 file")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    else:
        raise ValueError(f"erase_diffusion.patch has no command {command!r}")


def cli_main(args) -> int:
    if args.command == "inspect":
        print(json.dumps(describe_patch(args.patch), indent=2, sort_keys=True))
    elif args.command == "export-kohya":
        from .atomic import check_output

        src, dst = Path(args.patch), Path(args.output)
        if dst.exists() and src.exists() and dst.resolve() == src.resolve():
            raise ValueError(f"the output {dst} is the input patch: choose another file")
        check_output(dst, overwrite=args.overwrite)
        print(export_kohya(src, dst))
    return 0
