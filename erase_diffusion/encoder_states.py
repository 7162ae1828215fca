"""What a text encoder computes at one layer, read for the closed-form edit: the fc2 inputs (the keys the edit acts
on) and the residual stream after the layer (what the next layer, or the pipeline, reads), and the conditioning a
pipeline reads (``conditioning``).
"""

from __future__ import annotations

import torch

from .patch import clip_core
from .prompts import tokenize


def finite(*tensors: torch.Tensor) -> bool:
    """All entries finite, checked on sums (a NaN / inf entry makes the sum NaN / inf; 50× cheaper than isfinite)."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float64))) for t in tensors)


class _Stop(Exception):
    """Raised by a forward hook to end an encoder pass once the layer of interest has run."""


@torch.no_grad()
def run_encoder(text_encoder, input_ids: torch.Tensor, layer: int, batch: int = 256):
    """(fc2 inputs of ``layer``, read hidden states after ``layer``) for every token: (N, T, inter), (N, T, hidden).

    The read state is the residual stream right after ``layer`` (before any final LayerNorm). The pass stops there:
    the layers above are not needed."""
    block = clip_core(text_encoder).encoder.layers[layer]
    keys, reads, grab = [], [], {}

    def stop(module, inp, out):
        grab["h"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    handles = [block.mlp.fc2.register_forward_hook(lambda m, inp, out: grab.__setitem__("k", inp[0])),
               block.register_forward_hook(stop)]
    try:
        for i in range(0, len(input_ids), batch):
            try:
                text_encoder(input_ids[i : i + batch].to(text_encoder.device))
            except _Stop:
                pass
            keys.append(grab["k"].float().cpu())
            reads.append(grab["h"].float().cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(keys), torch.cat(reads)


def read_layer_index(text_encoder, penultimate: bool) -> int:
    n = text_encoder.config.num_hidden_layers
    return n - 2 if penultimate else n - 1


@torch.no_grad()
def conditioning(text_encoder, tokenizer, prompts: list[str], penultimate: bool = False) -> torch.Tensor:
    """The token states a pipeline reads: last layer + final LayerNorm (SD 1.x/2.x) or the penultimate layer (SDXL)."""
    out = text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2] if penultimate else out.last_hidden_state
