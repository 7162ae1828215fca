"""erase-diffusion: erase concepts from the CLIP text encoder of Stable Diffusion pipelines.

The data path, one module per stage: concepts → data / prompts → objective (CLIPErase) or closed-form edit →
weight delta → patch file → pipeline.
"""

__version__ = "0.1.0"

from . import threads as _threads  # noqa: E402,F401  first: sets OMP_WAIT_POLICY=PASSIVE before torch loads
from .concepts import ConceptSpec, miniworld_spec  # noqa: E402
from .models import load_clip, load_judge, load_pipeline, resolve  # noqa: E402
from .nullspace import erase  # noqa: E402
from .patch import (  # noqa: E402
    LoraFactors,
    Patch,
    PatchError,
    apply_to_clip,
    describe_patch,
    export_kohya,
    factors_from_delta,
    fingerprint,
    load_patch,
    save_patch,
)

__all__ = [
    "ConceptSpec", "miniworld_spec", "load_clip", "load_judge", "load_pipeline", "resolve", "erase",
    "LoraFactors", "Patch", "PatchError", "apply_to_clip", "describe_patch", "export_kohya", "factors_from_delta",
    "fingerprint", "load_patch", "save_patch",
]
