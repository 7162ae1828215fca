#!/usr/bin/env python
"""Erase concepts from a Stable Diffusion pipeline's CLIP text encoder with CLIPErase; write a patch.

    accelerate launch train_erase.py --erase_concept circle --output_dir runs/circle

Defaults reproduce the README figures on the bundled miniature world. For a real checkpoint:

    accelerate launch train_erase.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --clip_model_name_or_path openai/clip-vit-large-patch14 --erase_concept apple \
        --keep_concepts pear banana --anchor_concept fruit --train_data_dir my_pairs/ --output_dir runs/apple

SDXL has two text encoders: pass the CLIP of each, in order
(openai/clip-vit-large-patch14 laion/CLIP-ViT-bigG-14-laion2B-39B-b160k); one patch changes both.
The flags are the fields of erase_diffusion.config.ConceptArguments and CLIPEraseConfig, which hold the defaults.
"""

import json
import sys

from erase_diffusion.threads import configure_threads
from erase_diffusion.training import main

if __name__ == "__main__":
    configure_threads()  # CPU threads that do not oversubscribe; OMP_NUM_THREADS wins
    try:
        metrics = main(description=__doc__)
    except (ValueError, FloatingPointError, OSError) as err:  # OSError: e.g. an unwritable --output_dir
        print(f"train_erase.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2, default=str))
