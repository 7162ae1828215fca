"""diffusers integration: load erase patches into Stable Diffusion pipelines (installed as erase_diffusion.pipelines)."""
