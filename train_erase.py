#!/usr/bin/env python
"""Erase concepts from a Stable Diffusion pipeline's CLIP text encoder with CLIPErase; write a patch.

    accelerate launch train_erase.py --erase_concept circle --output_dir runs/circle

Defaults reproduce the README figures on the bundled miniature world. For a real checkpoint:

    accelerate launch train_erase.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --clip_model_name_or_path openai/clip-vit-large-patch14 --erase_concept apple \
        --keep_concepts pear banana --anchor_concept fruit --train_data_dir my_pairs/ --output_dir runs/apple

SDXL has two text encoders: pass the CLIP of each, in order
(openai/clip-vit-large-patch14 laion/CLIP-ViT-bigG-14-laion2B-39B-b160k); one patch changes both.
"""

import argparse
import json
import sys

from erase_diffusion.training import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    p.add_argument("--pretrained_model_name_or_path", default="miniworld", help="pipeline (or CLIP with --target clip)")
    p.add_argument("--clip_model_name_or_path", nargs="+", default=None,
                   help="CLIPModel whose text tower is the pipeline's text encoder, one per encoder (SDXL: two); "
                        "default: same as --pretrained_model_name_or_path")
    p.add_argument("--target", choices=["pipeline", "clip"], default="pipeline",
                   help="erase for a diffusion pipeline (token-level terms on) or for CLIP zero-shot use only")
    p.add_argument("--erase_concept", nargs="+", default=[], help="concept(s) to erase")
    p.add_argument("--keep_concepts", nargs="*", default=[], help="concepts that must keep working")
    p.add_argument("--anchor_concept", default="object", help="what erased prompts should read as (token level)")
    p.add_argument("--concepts_file", default=None, help="JSON/TOML with erase, paraphrases, keep, anchor")
    p.add_argument("--train_data_dir", default=None, help="images + metadata.jsonl or .txt captions")
    p.add_argument("--generate_data", action="store_true", help="no data: generate forget/retain images with the pipeline")
    p.add_argument("--output_dir", default="runs/erase")
    p.add_argument("--logging_dir", default="logs")
    # objective (paper weights: retention 1, forgetting 3, consistency 3)
    p.add_argument("--forget_loss", choices=["dot", "neg_contrastive"], default="dot")
    p.add_argument("--forget_weight", type=float, default=3.0)
    p.add_argument("--retain_weight", type=float, default=1.0)
    p.add_argument("--consistency_weight", type=float, default=3.0)
    p.add_argument("--token_forget_weight", type=float, default=1.0)
    p.add_argument("--token_consistency_weight", type=float, default=10.0)
    # what trains
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (and the SVD rank for --full_finetune)")
    p.add_argument("--lora_alpha", type=int, default=None, help="default: rank")
    p.add_argument("--full_finetune", action="store_true", help="train the text tower's weights, export by SVD")
    p.add_argument("--train_vision_tower", action="store_true", help="--target clip: train the image side too")
    # optimisation
    p.add_argument("--max_train_steps", type=int, default=200)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.98)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--seed", type=int, default=0)
    # checkpoints, logs, validation
    p.add_argument("--checkpointing_steps", type=int, default=100)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint folder, or 'latest' (the newest complete one; none yet: start from scratch)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run in --output_dir (its patch and checkpoints) instead of refusing")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, ... or none")
    p.add_argument("--validation_prompts", nargs="*", default=None)
    p.add_argument("--validation_steps", type=int, default=100, help="0 disables the before/after grids")
    p.add_argument("--eval_generations", type=int, default=1, help="miniworld: judge generations at the end (0/1)")
    args = p.parse_args(argv)
    if args.target == "clip":
        args.token_forget_weight = args.token_consistency_weight = 0.0  # CLIP zero-shot reads the pooled embedding
        args.validation_steps = 0
    return args


if __name__ == "__main__":
    from erase_diffusion.threads import configure_threads

    configure_threads()  # CPU threads that do not oversubscribe; OMP_NUM_THREADS wins
    args = parse_args()
    try:
        metrics = train(args)
    except (ValueError, FloatingPointError, OSError) as err:  # OSError: e.g. an unwritable --output_dir
        print(f"train_erase.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2, default=str))
