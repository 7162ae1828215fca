"""erase-diffusion: erase concepts from the CLIP text encoder of Stable Diffusion pipelines.

The data path, one module per stage: concepts → data / prompts → objective (CLIPErase) or closed-form edit →
weight delta → patch file → pipeline.
"""

__version__ = "0.1.0"

from . import threads as _threads  # noqa: E402,F401  first: sets OMP_WAIT_POLICY=PASSIVE before torch loads
from .concepts import ConceptSpec, miniworld_spec  # noqa: E402
from .config import CLIPEraseConfig  # noqa: E402
from .models import load_clip, load_judge, load_pipeline, resolve  # noqa: E402
from .nullspace import erase  # noqa: E402
from .kohya import export_kohya  # noqa: E402
from .patch import Edit, apply_to_clip, factors_from_delta, fingerprint, save_patch  # noqa: E402
from .patch_format import LoraFactors, Patch, PatchError  # noqa: E402
from .patch_reader import describe_patch, load_patch  # noqa: E402

__all__ = [
    "ConceptSpec", "miniworld_spec", "load_clip", "load_judge", "load_pipeline", "resolve", "erase",
    "CLIPEraseConfig", "train_cliperase", "Edit", "LoraFactors", "Patch", "PatchError", "apply_to_clip",
    "describe_patch", "export_kohya", "factors_from_delta", "fingerprint", "load_patch", "save_patch",
]


def __getattr__(name: str):
    """``train_cliperase`` (``training.train``) on first use: the training stack (Accelerate, peft) adds about 2 s to
    every ``import erase_diffusion``, the command line's included, that only training needs."""
    if name == "train_cliperase":
        from .training import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
