"""The patch file format: a small safetensors file of LoRA tensors for the text encoder(s) that plain diffusers loads.

This module holds what a patch is (``PatchError``, ``LoraFactors``, ``Patch``, the format constants) and the rules
its writer (``erase_diffusion.patch.write_patch``) and its reader (``erase_diffusion.patch_reader.load_patch``) share:
module naming, diffusers' rank bookkeeping, the content checksum and the atomic write.

File layout (loads with ``pipe.load_lora_weights(path, adapter_name=...)``)::

    text_encoder.text_model.encoder.layers.3.self_attn.out_proj.lora_A.weight     (r, in)
    text_encoder.text_model.encoder.layers.3.self_attn.out_proj.lora_B.weight     (out, r)
    text_encoder_2.text_model....                                                  SDXL's second encoder
    clip.visual_projection.lora_A.weight / .lora_B.weight                          CLIPModel-only modules

ΔW = B @ A exactly: every module is written with ``lora_alpha == r`` (scale 1); any scale is folded into the factors.
The header holds diffusers' ``lora_adapter_metadata`` (per component: r, lora_alpha, rank_pattern/alpha_pattern for
mixed ranks, layer-specific target_modules) plus our own ``erase_diffusion.*`` keys (``erase_diffusion.kind`` is
always ``lora``).

Component ``clip`` holds modules of a ``CLIPModel`` that diffusers pipelines do not have. diffusers' SD loaders only
read keys that start with ``text_encoder.``/``text_encoder_2.``/``unet.``, so such keys are ignored by plain diffusers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_path

FORMAT_VERSION = 1
META_PREFIX = "erase_diffusion."
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = TEXT_ENCODERS + ("clip",)
# modules diffusers' text-encoder loader can target (rank detection only looks at these suffixes)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


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
class Patch:
    """A validated patch file (``load_patch``): component → module path → factors, the parsed metadata, the path."""

    layers: dict[str, dict[str, LoraFactors]]
    metadata: dict
    path: Path

    @property
    def kind(self) -> str:
        return self.metadata.get("kind", "lora")

    @property
    def components(self) -> list[str]:
        return sorted(self.layers)


def peft_name(component: str, module: str) -> str:
    """Target spelling that matches both CLIPTextModel layouts (and CLIPTextModelWithProjection)."""
    return module.removeprefix("text_model.") if component in TEXT_ENCODERS else module


def check_module_name(component: str, module: str) -> None:
    """Raise ``PatchError`` unless ``component.module`` names a module a patch may change."""
    if component not in COMPONENTS:
        raise PatchError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", module) or "lora" in module:
        raise PatchError(f"bad module path {module!r} in component {component!r}")
    if component in TEXT_ENCODERS:
        if not module.startswith("text_model."):
            raise PatchError(f"text-encoder module paths are spelled with 'text_model.': got {component}.{module}")
        if module.rsplit(".", 1)[-1] not in TEXT_ENCODER_TARGETS:
            raise PatchError(
                f"{component}.{module}: diffusers can only load LoRA on {', '.join(TEXT_ENCODER_TARGETS)} of a text "
                "encoder; put other CLIPModel modules under component 'clip'"
            )


def common_rank(ranks: list[int]) -> int:
    """The most frequent rank (the smaller one on a tie)."""
    return max(set(ranks), key=lambda v: (ranks.count(v), -v))


def has_attention(modules) -> bool:
    """diffusers only recognises a text-encoder LoRA that names at least one attention projection."""
    return any(m.rsplit(".", 1)[-1] in ATTENTION_TARGETS for m in modules)


def content_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in key order: written by write_patch, checked on load."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_atomic(tensors: dict[str, Tensor], path, meta: dict[str, str]) -> Path:
    """safetensors to a temp file beside ``path``, then rename: a reader never sees a half-written file."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return Path(path)
