"""diffusers integration (installed as ``erase_diffusion.pipelines``): load, stack, fuse and bake erase patches into
Stable Diffusion pipelines through diffusers' own adapter machinery."""

from .loading import bake, check_patch, fuse, load_patches, set_strengths, unfuse

__all__ = ["bake", "check_patch", "fuse", "load_patches", "set_strengths", "unfuse"]
