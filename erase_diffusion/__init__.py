"""erase-diffusion: erase concepts from the CLIP text encoder of Stable Diffusion pipelines."""

__version__ = "0.1.0"
