"""CLIPErase's settings, each default stated once: ``CLIPEraseConfig`` (what ``training.train`` reads) and
``ConceptArguments`` (how the command line names the concepts), and the ``train_erase.py`` command line generated
from both.

    from erase_diffusion import CLIPEraseConfig
    config = CLIPEraseConfig(output_dir="runs/circle", max_train_steps=200)

The defaults reproduce the README figures on the bundled miniature world.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal

from .concepts import ConceptSpec, miniworld_spec


def _arg(default=MISSING, help: str | None = None, nargs: str | None = None, **kw):  # noqa: A002 - argparse's name
    """A dataclass field whose command-line help (and list ``nargs``) travel in its metadata."""
    metadata = {k: v for k, v in (("help", help), ("nargs", nargs)) if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class ConceptArguments:
    """What to erase, as ``train_erase.py`` takes it; ``spec`` turns it into the ``ConceptSpec`` training reads."""

    erase_concept: list[str] = _arg([], "concept(s) to erase")
    keep_concepts: list[str] = _arg([], "concepts that must keep working", nargs="*")
    anchor_concept: str | None = _arg(
        None, "what erased prompts should read as (token level; default: the empty word, or in the miniature world "
              "the class of the concept's attribute least like it, as the closed form's)")
    concepts_file: str | None = _arg(None, "JSON/TOML with erase, paraphrases, keep, anchor")

    def spec(self, model: str) -> ConceptSpec:
        """From ``--concepts_file``, or the three lists (with the miniature world's own paraphrases on ``model``
        ``miniworld``); an empty, contradictory or (miniature world) unknown concept is refused here."""
        if self.concepts_file:
            return ConceptSpec.from_file(self.concepts_file)
        if model == "miniworld":
            return miniworld_spec(self.erase_concept, self.keep_concepts, self.anchor_concept)
        return ConceptSpec(self.erase_concept, {}, self.keep_concepts, self.anchor_concept)

    @classmethod
    def of(cls, spec: ConceptSpec) -> "ConceptArguments":
        """The arguments that name ``spec``'s concepts (what a patch records when no command line gave them)."""
        return cls(list(spec.erase), list(spec.keep), spec.anchor)


# The default step budget (``CLIPEraseConfig.steps_for``). A batch's forget pairs and forget prompts are spread over the
# erased concepts, so each concept's share of the signal per step falls as 1 / n: a fixed budget that erases one
# concept left striped found in 6.2 % of prompts, with their colour kept 81 -> 47 %, when four were erased at once;
# 400 steps (100 per concept) erased it (0.0 %, colour kept 89 %; n = 64, bench_concepts' scorecard).
MIN_STEPS = 200
STEPS_PER_CONCEPT = 100


@dataclass
class CLIPEraseConfig:
    """Every CLIPErase setting except the concepts (a ``ConceptSpec``); field names are ``train_erase.py``'s flags.

    ``target="clip"`` (CLIP zero-shot use) switches the token-level terms and the validation grids off, as the
    command line always has: CLIP zero-shot reads only the pooled embedding, and there is no pipeline to draw with.
    """

    # model and data
    pretrained_model_name_or_path: str = _arg("miniworld", "pipeline (or CLIP with --target clip)")
    clip_model_name_or_path: list[str] | None = _arg(
        None, "CLIPModel whose text tower is the pipeline's text encoder, one per encoder (SDXL: two); default: same "
              "as --pretrained_model_name_or_path")
    target: Literal["pipeline", "clip"] = _arg(
        "pipeline", "erase for a diffusion pipeline (token-level terms on) or for CLIP zero-shot use only")
    train_data_dir: str | None = _arg(None, "images + metadata.jsonl or .txt captions")
    generate_data: bool = _arg(False, "no data: generate forget/retain images with the pipeline")
    output_dir: str = _arg("runs/erase")
    logging_dir: str = _arg("logs")
    # objective (paper weights: retention 1, forgetting 3, consistency 3; the token terms are this project's)
    forget_loss: Literal["anchored", "dot", "neg_contrastive"] = _arg(
        "anchored", "Forgetting module: 'dot' and 'neg_contrastive' are the paper's; 'anchored' stops where the "
                    "anchored caption's original cosine is (--target clip: 'dot')")
    forget_weight: float = _arg(3.0)
    retain_weight: float = _arg(1.0)
    consistency_weight: float = _arg(3.0)
    token_forget_weight: float = _arg(1.0)
    token_consistency_weight: float = _arg(10.0)
    adversarial_weight: float = _arg(
        0.0, "adversarial CLIPErase: weight of the term that sends attack embeddings, learned against the model at "
             "every step, to the anchor (0: off; the measured recipe: --adversarial_weight 2 "
             "--token_consistency_weight 30 --max_train_steps 400 --rank 4)")
    adversarial_steps: int = _arg(16, "adversarial CLIPErase: inner attack steps per training step (with 8, the "
                                      "evaluation's attacks did not converge on star: README, \"Inner steps\")")
    # what trains
    rank: int = _arg(8, "LoRA rank (and the SVD rank for --full_finetune)")
    lora_alpha: int | None = _arg(None, "default: rank")
    full_finetune: bool = _arg(False, "train the text tower's weights, export by SVD")
    train_vision_tower: bool = _arg(False, "--target clip: train the image side too")
    # optimisation
    max_train_steps: int | None = _arg(
        None, f"default: {MIN_STEPS}, and {STEPS_PER_CONCEPT} per erased concept when more than two are erased")
    learning_rate: float = _arg(1e-3)
    train_batch_size: int = _arg(32)
    gradient_accumulation_steps: int = _arg(1)
    adam_beta1: float = _arg(0.9)
    adam_beta2: float = _arg(0.98)
    adam_weight_decay: float = _arg(0.0)
    max_grad_norm: float = _arg(1.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = _arg("no")
    gradient_checkpointing: bool = _arg(False, "recompute activations in backward (less memory)")
    seed: int = _arg(0)
    # checkpoints, logs, validation
    checkpointing_steps: int = _arg(100)
    checkpoints_total_limit: int = _arg(2)
    resume_from_checkpoint: str | None = _arg(
        None, "a checkpoint folder, or 'latest' (the newest complete one; none yet: start from scratch)")
    overwrite: bool = _arg(False, "replace another run in --output_dir (its patch and checkpoints) instead of refusing")
    report_to: str = _arg("tensorboard", "tensorboard, wandb, ... or none")
    validation_prompts: list[str] | None = _arg(None, nargs="*")
    validation_steps: int = _arg(100, "0 disables the before/after grids")
    eval_generations: int = _arg(1, "miniworld: judge generations at the end (0/1)")

    def __post_init__(self):
        if self.target == "clip":
            self.token_forget_weight = self.token_consistency_weight = self.adversarial_weight = 0.0
            if self.forget_loss == "anchored":  # zero-shot must rank the erased caption below the others: the paper's
                self.forget_loss = "dot"
            self.validation_steps = 0

    @property
    def miniworld(self) -> bool:
        return self.pretrained_model_name_or_path == "miniworld"

    def steps_for(self, spec: ConceptSpec) -> int:
        """``max_train_steps``, or by default ``MIN_STEPS`` and at least ``STEPS_PER_CONCEPT`` per erased concept."""
        return self.max_train_steps or max(MIN_STEPS, STEPS_PER_CONCEPT * len(spec.erase))

    def settings(self) -> dict:
        """Every field, as the patch records it."""
        return asdict(self)

    def check(self, spec: ConceptSpec) -> None:
        """Cheap refusals, before any model loads, of settings that would crash late (ZeroDivisionError) or silently
        write a useless patch."""
        for name in ("train_batch_size", "max_train_steps", "checkpointing_steps", "gradient_accumulation_steps",
                     "rank", "adversarial_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("validation_steps", "checkpoints_total_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be a positive number, got {self.learning_rate}")
        if not (math.isfinite(self.adversarial_weight) and self.adversarial_weight >= 0):
            raise ValueError(f"--adversarial_weight must be 0 (off) or a positive number, got {self.adversarial_weight}")
        erased = [c.strip().lower() for c in spec.erase]
        for anchor in (spec.anchor.values() if isinstance(spec.anchor, dict) else [spec.anchor or ""]):
            if anchor.strip().lower() in erased:
                raise ValueError(f"--anchor_concept {anchor!r} is a concept to erase: erased prompts would be pulled "
                                 "toward themselves")
        if not self.miniworld and not self.train_data_dir and not self.generate_data:
            raise ValueError("a model other than the miniature world needs --train_data_dir, or --generate_data")
        if self.forget_loss not in ("anchored", "dot", "neg_contrastive"):
            raise ValueError("--forget_loss must be 'anchored', 'dot' or 'neg_contrastive'")
        if self.generate_data and (self.target != "pipeline" or not spec.keep):
            raise ValueError("--generate_data generates forget and retain images with the pipeline: it needs "
                             "--target pipeline and concepts to keep (--keep_concepts)")
        if self.train_vision_tower and self.target != "clip":
            raise ValueError("--train_vision_tower changes CLIP's image side, which a pipeline never reads: "
                             "use it with --target clip")


def add_dataclass_arguments(parser: argparse.ArgumentParser, dtype) -> None:
    """One ``--<field>`` per field of ``dtype``: bools are ``store_true`` flags, lists take ``nargs`` from the field
    (default "+"), ``Literal`` types are choices. Generated here rather than by transformers' ``HfArgumentParser``,
    which forces lists to nargs="+" (``--keep_concepts`` with no value would be refused) and turns flags into
    ``--flag [bool]`` options: the command line stays exactly what it was."""
    hints = typing.get_type_hints(dtype)
    for f in fields(dtype):
        kind, kw = hints[f.name], {"help": f.metadata.get("help")}
        kw["default"] = f.default_factory() if f.default_factory is not MISSING else f.default
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", **kw)
            continue
        args = [a for a in typing.get_args(kind) if a is not type(None)]  # X | None → X
        if typing.get_origin(kind) is Literal:
            kw["choices"] = list(typing.get_args(kind))
        elif typing.get_origin(kind) is list or (args and typing.get_origin(args[0]) is list):
            kw["nargs"] = f.metadata.get("nargs", "+")
            kw["type"] = typing.get_args(kind if typing.get_origin(kind) is list else args[0])[0]
        else:
            kw["type"] = args[0] if args else kind
        parser.add_argument(f"--{f.name}", **kw)


def parse_args(argv=None, description: str | None = None) -> tuple[ConceptArguments, CLIPEraseConfig]:
    """``train_erase.py``'s command line (``argv``, default ``sys.argv[1:]``) → (concepts, config)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for dtype in (ConceptArguments, CLIPEraseConfig):
        add_dataclass_arguments(parser, dtype)
    ns = vars(parser.parse_args(argv))
    return tuple(dtype(**{f.name: ns[f.name] for f in fields(dtype)}) for dtype in (ConceptArguments, CLIPEraseConfig))
