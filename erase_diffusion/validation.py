"""Validation grids of a CLIPErase run: the original pipeline beside the pipeline with the current patch merged into
its text encoders, same prompts and seeds (``<output_dir>/validation/step-<step>.png``)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .concepts import ConceptSpec
from .measure import save_grid
from .patch_format import TEXT_ENCODERS
from .pipelines.loading import find_linear


@contextmanager
def merged(pipe, layers: dict):
    """The pipeline with a patch's ``layers`` ({component: {module: LoraFactors}}) merged into its text encoders, the
    original weights restored on exit: validation images come from the pipeline's own prompt encoding, guidance and
    SDXL pooling, with exactly the weights the patch will hold."""
    saved = []
    try:
        with torch.no_grad():
            for component, modules in layers.items():
                if component in TEXT_ENCODERS:
                    for module, factors in modules.items():
                        weight = find_linear(getattr(pipe, component), module).weight
                        saved.append((weight, weight.clone()))
                        weight.add_(factors.delta().to(weight))
        yield pipe
    finally:
        with torch.no_grad():
            for weight, before in reversed(saved):
                weight.copy_(before)


@torch.no_grad()
def save_validation(pipe, layers: dict, config, spec: ConceptSpec, step: int) -> Path:
    """Before/after grid: row 1 the original pipeline, row 2 with the current patch merged; same seeds."""
    prompts = config.validation_prompts or [f"a {w}" for w in spec.all_erase_words()] + [f"a {k}" for k in spec.keep[:2]]
    rows = []
    for erased in (False, True):
        images = []
        with merged(pipe, layers) if erased else nullcontext():
            for i, p in enumerate(prompts):
                g = torch.Generator().manual_seed(config.seed + i)
                images.append(pipe(p, generator=g, output_type="pt", num_inference_steps=20).images[0] * 2 - 1)
        rows.append(torch.stack(images))
    return save_grid(torch.cat(rows), Path(config.output_dir) / "validation" / f"step-{step:06d}.png", columns=len(prompts))
