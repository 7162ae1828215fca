"""Export of a patch to the kohya / A1111 LoRA key format (``erase-diffusion export-kohya``).

The key maps and scale rules of ComfyUI, Forge and A1111 that this export is checked against are described and
reproduced in ``tests/test_tool_keymaps.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .patch_format import ATTENTION_TARGETS, META_PREFIX, LoraFactors, PatchError, common_rank, save_atomic
from .patch_reader import load_patch

KOHYA_PREFIX = {"sd": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}


def _kohya_complete_attention(mods: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    """Zero rank-1 factors for the q/k/v/out projections missing from a layer that has one of them.

    A1111 runs SD 2's and SDXL's second encoder as OpenCLIP, whose q/k/v live in one ``nn.MultiheadAttention``, and
    applies a layer's attention LoRA only when q, k, v and out are all in the file (``network_apply_weights``, as
    reproduced in tests/test_tool_keymaps.py); otherwise it silently drops them. Zero factors change nothing in any
    tool. CLIP's attention projections are all hidden × hidden, so one present projection gives the shapes."""
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
    (A1111 needs all four on OpenCLIP encoders). Only text-encoder modules can be expressed; a patch with ``clip``
    modules is refused. Checked against ComfyUI's, Forge's and A1111's key maps and scale rules in
    tests/test_tool_keymaps.py.
    """

    patch = load_patch(src)
    if "clip" in patch.layers:
        raise PatchError("only text-encoder LoRA patches can be exported to kohya format (no 'clip' modules)")
    names = KOHYA_PREFIX["sdxl" if "text_encoder_2" in patch.layers else "sd"]
    # One alpha for the whole file: diffusers 0.42's kohya path builds a wrong text-encoder alpha_pattern when alphas
    # differ (it drops the module name), so mixed ranks keep alpha = the most common rank and fold alpha / r into B.
    alpha = common_rank([f.rank for mods in patch.layers.values() for f in mods.values()])
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
    return save_atomic(tensors, dst, meta)
