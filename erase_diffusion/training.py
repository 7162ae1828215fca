"""CLIPErase training with Accelerate: concepts → data → objective → LoRA on the text tower(s) → patch.

``train(args)`` is what ``accelerate launch train_erase.py`` runs; ``args`` are the script's parsed arguments
(names as in diffusers' training examples). The loop follows diffusers' ``train_text_to_image_lora.py``: one
``Accelerator``, the original model read as the student with its LoRA switched off (``original``), checkpoints
through ``save_state`` with hooks that store only the trainable weights, and the whole objective visible in
``EraseObjective``. SDXL trains both text encoders (one ``TextTower`` each) into one patch.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor

from . import cliperase, data as pair_data
from .atomic import check_output, write_json
from .concepts import ConceptSpec, miniworld_spec
from .measure import features, image_embeddings
from .models import load_clip, load_pipeline, resolve

logger = logging.getLogger(__name__)
PATCH_NAME = "erase_patch.safetensors"
# the token terms run every TOKEN_SUBSAMPLE-th prompt of a batch at the later (padding) positions too
TOKEN_SUBSAMPLE = 8
# the text tower only: the vision tower shares these module names
TEXT_TARGETS = r".*text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)"


def concept_spec(args) -> ConceptSpec:
    """The concepts from ``--concepts_file`` or ``--erase_concept``/``--keep_concepts``/``--anchor_concept``."""
    if args.concepts_file:
        return ConceptSpec.from_file(args.concepts_file)
    if args.pretrained_model_name_or_path == "miniworld":
        return miniworld_spec(args.erase_concept, args.keep_concepts, args.anchor_concept)
    return ConceptSpec(args.erase_concept, {}, args.keep_concepts, args.anchor_concept)


def check_arguments(args) -> None:
    """Cheap refusals of settings that would crash late (ZeroDivisionError) or silently write a useless patch."""
    for name in ("train_batch_size", "max_train_steps", "checkpointing_steps", "gradient_accumulation_steps", "rank"):
        value = getattr(args, name, 1)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    for name in ("validation_steps", "checkpoints_total_limit"):
        value = getattr(args, name, 0)
        if value is not None and value < 0:
            raise ValueError(f"--{name} must be 0 or more, got {value}")
    lr = getattr(args, "learning_rate", 1.0)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--learning_rate must be a positive number, got {lr}")
    anchor = (getattr(args, "anchor_concept", None) or "").strip().lower()
    if anchor and anchor in [c.strip().lower() for c in getattr(args, "erase_concept", None) or []]:
        raise ValueError(f"--anchor_concept {anchor!r} is a concept to erase: erased prompts would be pulled toward "
                         "themselves")


def check_output_dir(args) -> None:
    out = Path(args.output_dir)
    # a parent that is a file, or a file where the folder goes; what an existing folder may hold is decided below
    check_output(out, folder=True, overwrite=True, option="--output_dir")
    if args.resume_from_checkpoint or not out.exists() or getattr(args, "overwrite", False):
        return
    if (out / PATCH_NAME).exists() or any(out.glob("checkpoint-*")):
        raise ValueError(
            f"{out} already holds another run ({PATCH_NAME} or checkpoints); pass --resume_from_checkpoint latest to "
            "continue it, --overwrite to replace it, or choose another --output_dir"
        )


def resume_checkpoint(args) -> Path | None:
    """The checkpoint to resume from, decided before any model loads: ``latest`` is the newest complete one, or none
    (then the run starts from scratch, said in one line, as diffusers' training examples do)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = checkpoints(Path(args.output_dir))
        if not found:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting from scratch",
                           args.output_dir)
        return found[-1] if found else None
    path = Path(args.resume_from_checkpoint)
    if not _checkpoint_step(path) or not _complete(path):
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint folder (checkpoint-<step> "
                         f"holding {', '.join(CHECKPOINT_FILES)})")
    return path


def prepare_output_dir(args) -> None:
    """After every refusal: remove what killed runs left behind (temp checkpoint folders, partial atomic writes) and,
    with --overwrite, the previous run's checkpoints (so ``latest`` and pruning never mix two runs)."""
    from .atomic import remove_stale_temps

    out = Path(args.output_dir)
    for stale in remove_stale_temps(out) + remove_stale_temps(out / "validation"):
        logger.warning("removed %s, left by an interrupted write", stale)
    if getattr(args, "overwrite", False) and not args.resume_from_checkpoint:
        for old in out.glob("checkpoint-*"):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)  # every process of a launch runs this


@dataclass
class TextTower:
    """One text encoder of the pipeline, with the CLIP whose text tower it is (its vision tower embeds the images).

    ``layer``/``pooled`` say what the pipeline reads: SD 1/2 the last hidden state; SDXL the penultimate layer of
    both encoders and, from the second, the projected pooled embedding too.
    """

    name: str  # patch component: "text_encoder" or "text_encoder_2"
    clip: str  # the CLIP model it belongs to (name, folder or Hub id)
    tokenizer: object
    fingerprint: str  # of the original text tower, recorded in the patch
    teacher: torch.nn.Module | None = None  # frozen copy of the original, needed only by full fine-tuning
    layer: int = -1
    pooled: bool = False
    forget_img: torch.Tensor | None = None  # image embeddings by the frozen vision tower
    retain_img: torch.Tensor | None = None
    retain_txt: torch.Tensor | None = None  # the original's pooled embeddings of every retain caption (consistency)
    targets: dict | None = None  # the original's read states of the anchor / retain prompts: {set: (states, pooled)}
    fit: int = 77  # token positions every prompt of the token terms runs at (the rest: a subsample, TOKEN_SUBSAMPLE)
    forget_pixels: torch.Tensor | None = None  # kept only when the vision tower trains
    retain_pixels: torch.Tensor | None = None
    clip_difference: float = 0.0  # relative weight difference between the CLIP's text tower and the pipeline's encoder


@contextmanager
def original(student, tower: TextTower):
    """The original model: the frozen copy when there is one (full fine-tuning), else the student with its LoRA
    scaled to zero — base outputs exactly (+0.0), without a second copy of the weights in memory."""
    if tower.teacher is not None:
        yield tower.teacher
        return
    layers = [m for m in student.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.scale_layer(0.0)
    try:
        yield student
    finally:
        for m in layers:
            m.unscale_layer()  # back to lora_alpha / r


def encode_pooled(model, tokenizer, texts: list[str], device) -> torch.Tensor:
    """CLIP's projected pooled embedding (what the CLIPErase losses and zero-shot use).

    It sits at the end-of-text token, which the causal mask shields from padding, so padding to the longest prompt
    gives the same value as padding to 77 with 4-6x fewer positions.
    """
    ids = tokenizer(texts, padding="longest", truncation=True, return_tensors="pt").input_ids.to(device)
    return model.text_projection(model.text_model(input_ids=ids).pooler_output)


def encode_read(model, tokenizer, texts: list[str], device, layer: int = -1, pooled: bool = False,
                length: int | None = None):
    """What a pipeline reads from this text encoder, computed as diffusers' ``encode_prompt`` does (padded to 77, no
    attention mask): per-token states of ``layer`` (-1: after the final layer norm), and with ``pooled`` the projected
    pooled embedding (SDXL's second encoder). ``length`` < 77: only the first positions, which the causal encoder
    computes exactly from the shorter pass (every prompt must fit, end token included)."""
    ids = tokenizer(texts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = model.text_model(input_ids=ids, output_hidden_states=layer != -1)
    states = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    return states, (model.text_projection(out.pooler_output) if pooled else None)


class EraseObjective(torch.nn.Module):
    """The trainable CLIPs (one per text encoder) and the whole objective in ``forward``.

    The loss is computed inside ``forward`` so that Accelerate's DDP wrapper sees one forward per backward and
    all-reduces the gradients; calling the unwrapped model would silently train each replica on its own.
    The original model's outputs come from ``original`` (no gradients), so nothing frozen is wrapped or checkpointed.
    """

    def __init__(self, students: dict, towers: list[TextTower], weights: cliperase.LossWeights, forget_loss: str,
                 train_vision: bool = False):
        super().__init__()
        self.students = torch.nn.ModuleDict(students)
        self.towers, self.weights, self.forget_loss, self.train_vision = towers, weights, forget_loss, train_vision

    def forward(self, batch: dict):
        total, terms = 0.0, {}
        for tower in self.towers:
            loss, parts = self.tower_loss(self.students[tower.name], tower, batch)
            total = total + loss
            prefix = "" if len(self.towers) == 1 else f"{tower.name}/"
            terms.update({prefix + k: v.detach() for k, v in parts.items()})
        return total, terms

    def image_side(self, student, tower: TextTower, which: str, idx: torch.Tensor) -> torch.Tensor:
        if self.train_vision:
            pixels = getattr(tower, f"{which}_pixels")[idx.cpu()].to(idx.device)
            return features(student.get_image_features(pixel_values=pixels))
        return getattr(tower, f"{which}_img")[idx]

    def tower_loss(self, student, tower: TextTower, batch: dict):
        """CLIPErase's three modules on image–text pairs, plus the token-level terms on what the pipeline reads."""
        w, tok = self.weights, tower.tokenizer
        device = batch["fi"].device
        scale = student.logit_scale.exp().detach()  # never trained
        terms = {}
        if w.forget:
            f_img = self.image_side(student, tower, "forget", batch["fi"])
            f_txt = encode_pooled(student, tok, batch["forget_captions"], device)
            terms["forget"] = (cliperase.forgetting_dot(f_img, f_txt) if self.forget_loss == "dot"
                               else cliperase.forgetting_neg_contrastive(f_img, f_txt, scale))
        if w.retain or w.consistency:
            r_img = self.image_side(student, tower, "retain", batch["ri"])
            r_txt = encode_pooled(student, tok, batch["retain_captions"], device)
            if w.retain:
                terms["retain"] = cliperase.retention(r_img, r_txt, scale)
            if w.consistency:
                ref_txt = tower.retain_txt[batch["ri"]]
                terms["consistency"] = cliperase.consistency(r_img, r_txt, tower.retain_img[batch["ri"]], ref_txt, scale)
        for name, prompts, idx, targets in (("token_forget", "forget_prompts", "pi", "anchor"),
                                            ("token_consistency", "retain_prompts", "qi", "retain")):
            if getattr(w, name):
                term = cliperase.token_forgetting if name == "token_forget" else cliperase.token_consistency
                terms[name] = self.token_term(student, tower, term, batch[prompts], batch[idx], *tower.targets[targets])
        return sum(getattr(w, name) * value for name, value in terms.items()), terms

    def token_term(self, student, tower: TextTower, term, prompts: list[str], idx: torch.Tensor, ref_states, ref_pooled):
        """``term`` over the 77 positions the pipeline reads, against the original's precomputed states: every prompt
        at the first ``tower.fit`` positions (words, end token, first padding), every ``TOKEN_SUBSAMPLE``-th prompt
        also at the later (padding) positions; each part weighted by its share of the positions, so the estimate's
        expectation is the full-length term at a fraction of the cost."""
        tok, device, full = tower.tokenizer, idx.device, ref_states.shape[1]
        ref = ref_states[idx]
        states, pooled = encode_read(student, tok, prompts, device, tower.layer, tower.pooled, length=tower.fit)
        loss = term(states, ref[:, : tower.fit]) * (tower.fit / full)
        if tower.fit < full:
            late, _ = encode_read(student, tok, prompts[::TOKEN_SUBSAMPLE], device, tower.layer)
            loss = loss + term(late[:, tower.fit :], ref[::TOKEN_SUBSAMPLE, tower.fit :]) * ((full - tower.fit) / full)
        if tower.pooled:
            loss = loss + term(pooled, ref_pooled[idx])
        return loss


@torch.no_grad()
def original_outputs(ref, tower: TextTower, texts: list[str], device, pooled_only: bool = False, batch: int = 64):
    """The original model's pooled embeddings of ``texts`` (``pooled_only``), or its read states and pooled
    embeddings (None unless the tower reads it) at all 77 positions, in batches."""
    outs = []
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        outs.append(encode_pooled(ref, tower.tokenizer, chunk, device) if pooled_only
                    else encode_read(ref, tower.tokenizer, chunk, device, tower.layer, tower.pooled))
    if pooled_only:
        return torch.cat(outs)
    return torch.cat([s for s, _ in outs]), (torch.cat([p for _, p in outs]) if tower.pooled else None)


def lora_layers(model) -> dict:
    """peft's LoRA state dict → {module path: LoraFactors} with the LoRA scale folded into B."""
    from .patch import LoraFactors

    sd = get_peft_model_state_dict(model)
    cfg = model.peft_config["default"]
    scale = cfg.lora_alpha / cfg.r
    layers = {}
    for key, a in sd.items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = sd[f"{module}.lora_B.weight"]
            layers[module] = LoraFactors(A=a.detach().float().cpu().contiguous(),
                                         B=(b.detach().float() * scale).cpu().contiguous())
    return layers


def full_finetune_layers(model, reference, rank: int | None) -> tuple[dict, float]:
    """Dense weight changes of every changed Linear → low-rank factors by SVD (worst residual reported)."""
    from .patch import factors_from_delta

    ref = dict(reference.named_modules())
    layers, worst = {}, 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            delta = module.weight.detach().float().cpu() - ref[name].weight.detach().float().cpu()
            if delta.abs().max() > 0:
                layers[name], residual = factors_from_delta(delta, rank=rank)
                worst = max(worst, residual)
    return layers, worst


def patch_layers(student, tower: TextTower, args) -> tuple[dict, float]:
    """{component: {module: LoraFactors}}: text-tower layers under the tower's component; vision-tower layers (only
    with --train_vision_tower) under ``clip``, which ``apply_to_clip`` merges and pipelines ignore."""
    layers, residual = (full_finetune_layers(student, tower.teacher, args.rank) if args.full_finetune
                        else (lora_layers(student), 0.0))
    out = {tower.name: {m: f for m, f in layers.items() if m.startswith("text_model.")}}
    vision = {m: f for m, f in layers.items() if not m.startswith("text_model.")}
    if vision:
        out["clip"] = vision
    return out, residual


def all_patch_layers(students: dict, towers: list[TextTower], args) -> tuple[dict, float]:
    layers, residual = {}, 0.0
    for tower in towers:
        parts, r = patch_layers(students[tower.name], tower, args)
        layers.update(parts)
        residual = max(residual, r)
    return layers, residual


def adopt_encoder(student, encoder, what: str, tolerance: float = 1e-2) -> float:
    """Make the CLIP's text tower exactly the pipeline's text encoder and return their largest relative difference.

    Pipelines often ship their encoder rounded to fp16 (SDXL's original checkpoint is fp16) while the Hub CLIP is fp32,
    so bit equality is too strict; a relative difference above ``tolerance`` (fp16 / bf16 rounding stays far below)
    means another model and is refused. The patch is then trained on, and fingerprinted as, the pipeline's weights.
    """
    from .patch import clip_core

    pairs = [(clip_core(student.text_model), clip_core(encoder))]
    if hasattr(encoder, "text_projection"):  # SDXL's pooled embedding goes through it
        pairs.append((student.text_projection, encoder.text_projection))
    worst = 0.0
    for mine, theirs in pairs:
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ValueError(f"{what}: the architectures differ (parameter names or shapes)")
        for k in a:
            if a[k].is_floating_point():
                ref = b[k].float()
                worst = max(worst, float((a[k].float() - ref).norm() / ref.norm().clamp_min(1e-12)))
    if worst > tolerance:
        raise ValueError(f"{what}: the weights differ by {worst:.3g} (relative; fp16/bf16 rounding stays below "
                         f"{tolerance:g}), so this CLIP is another model")
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.load_state_dict(theirs.state_dict())
    return worst


def load_towers(args, accelerator) -> tuple[list[TextTower], dict, object]:
    """(towers, {component: trainable CLIPModel}, pipeline or None). Pipeline first: it says how many text encoders
    there are and what they read; each CLIP's text tower must be that encoder (``adopt_encoder``)."""
    from .patch import fingerprint

    clip_names = args.clip_model_name_or_path or [args.pretrained_model_name_or_path]
    pipe, encoders = None, ["text_encoder"]
    if args.target == "pipeline":
        pipe = load_pipeline(args.pretrained_model_name_or_path)
        encoders = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
        if len(clip_names) != len(encoders):
            example = (" (SDXL: openai/clip-vit-large-patch14 laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)"
                       if len(encoders) == 2 else "")
            raise ValueError(f"this pipeline has {len(encoders)} text encoder(s) ({', '.join(encoders)}): pass one "
                             f"--clip_model_name_or_path per encoder, in that order{example}")
    elif len(clip_names) != 1:
        raise ValueError("--target clip erases from one CLIPModel: pass one --clip_model_name_or_path")
    sdxl = len(encoders) == 2
    towers, students = [], {}
    for component, clip_name in zip(encoders, clip_names):
        student, tokenizer = load_clip(clip_name)
        difference = 0.0
        if pipe is not None:
            difference = adopt_encoder(student, getattr(pipe, component),
                                       f"the text tower of CLIP {clip_name!r} vs the {component} of pipeline "
                                       f"{args.pretrained_model_name_or_path!r} (pass the matching "
                                       "--clip_model_name_or_path)")
            tokenizer = pipe.tokenizer_2 if component == "text_encoder_2" else pipe.tokenizer
        teacher = copy.deepcopy(student).requires_grad_(False).eval().to(accelerator.device) if args.full_finetune else None
        towers.append(TextTower(component, clip_name, tokenizer, fingerprint(student.text_model), teacher,
                                layer=-2 if sdxl else -1, pooled=component == "text_encoder_2",
                                clip_difference=difference))
        students[component] = student
    return towers, students, pipe


def make_trainable(student, args) -> None:
    """LoRA on the text tower (default) or its full weights; the vision tower too with --train_vision_tower; activation
    checkpointing with --gradient_checkpointing."""
    student.requires_grad_(False)
    if args.full_finetune:
        for part in [student.text_model] + ([student.vision_model] if args.train_vision_tower else []):
            part.encoder.requires_grad_(True)
    else:
        target = TEXT_TARGETS if not args.train_vision_tower else TEXT_TARGETS.replace("text_model", "(text|vision)_model")
        inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, target_modules=target,
                                           init_lora_weights=True), student)
    student.train()  # CLIP and the LoRA have no dropout; train mode is what switches activation checkpointing on
    if args.gradient_checkpointing:  # recompute each layer in backward: activations dominate memory at real size
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name is deprecated)
            student.activation_checkpointing_enable()
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train(args) -> dict:
    # 1. Everything that can be refused is refused before any model loads.
    spec = concept_spec(args)
    check_arguments(args)
    check_output_dir(args)
    resume = resume_checkpoint(args)
    miniworld = args.pretrained_model_name_or_path == "miniworld"
    if not miniworld and not args.train_data_dir and not args.generate_data:
        raise ValueError("a model other than the miniature world needs --train_data_dir, or --generate_data")
    if args.forget_loss not in ("dot", "neg_contrastive"):
        raise ValueError("--forget_loss must be 'dot' or 'neg_contrastive'")
    if args.generate_data and (args.target != "pipeline" or not spec.keep):
        raise ValueError("--generate_data generates forget and retain images with the pipeline: it needs "
                         "--target pipeline and concepts to keep (--keep_concepts)")
    if args.train_vision_tower and args.target != "clip":
        raise ValueError("--train_vision_tower changes CLIP's image side, which a pipeline never reads: "
                         "use it with --target clip")

    output_dir = Path(args.output_dir)
    prepare_output_dir(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    start = time.time()

    # 2. Models: per text encoder, the CLIP whose text tower it is, made trainable (LoRA, or full with a frozen copy).
    towers, students, pipe = load_towers(args, accelerator)
    for student in students.values():
        make_trainable(student, args)
    if pipe is not None:
        pipe.to(accelerator.device)

    # 3. Data: forget/retain pairs embedded by each frozen vision tower, and the prompt sets of the token terms.
    if miniworld:
        pairs = pair_data.from_miniworld(spec, seed=args.seed + 1)
    elif args.train_data_dir:
        pairs = pair_data.from_folder(args.train_data_dir, spec)
    else:
        pairs = pair_data.from_pipeline(pipe, spec)
    forget, retain = pairs.split()
    prompts = pair_data.prompt_sets(spec, miniworld, seed=args.seed)
    for tower in towers:
        processor = None if miniworld else CLIPImageProcessor.from_pretrained(resolve(tower.clip, "clip"))
        f_pix, r_pix = forget.pixels(processor), retain.pixels(processor)
        # everything the original model contributes to the loss is fixed: computed once here, not at every step
        with original(students[tower.name].to(accelerator.device), tower) as ref:
            tower.forget_img, tower.retain_img = image_embeddings(ref, f_pix), image_embeddings(ref, r_pix)
            tower.retain_txt = original_outputs(ref, tower, retain.captions, accelerator.device, pooled_only=True)
            tower.targets = {k: original_outputs(ref, tower, prompts[k], accelerator.device) for k in ("anchor", "retain")}
        longest = max(len(ids) for ids in tower.tokenizer(prompts["forget"] + prompts["retain"]).input_ids)
        tower.fit = min(tower.tokenizer.model_max_length, longest + 1)
        if args.train_vision_tower:
            tower.forget_pixels, tower.retain_pixels = f_pix, r_pix
    logger.info("forget pairs %d, retain pairs %d", len(forget.captions), len(retain.captions))
    if pipe is not None and not args.validation_steps:
        pipe = None  # only the validation grids need it from here on

    weights = cliperase.LossWeights(args.forget_weight, args.retain_weight, args.consistency_weight,
                                    args.token_forget_weight, args.token_consistency_weight)
    model = EraseObjective(students, towers, weights, args.forget_loss, args.train_vision_tower)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    # 4. Checkpoints hold the trainable weights only (LoRA: a few hundred KB), not whole CLIPs; the optimizer, RNG
    # and step come from Accelerate's save_state.
    def save_hook(models, weights_, out):
        if accelerator.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(models[0]).state_dict().items()
                     if k in trainable}
            save_file(state, os.path.join(out, "trainable.safetensors"))
        weights_.clear()

    def load_hook(models, inp):
        state = load_file(os.path.join(inp, "trainable.safetensors"))
        if set(state) != trainable:
            raise ValueError(f"checkpoint {inp} holds other trainable weights than this run "
                             f"({len(set(state) ^ trainable)} differ): resume with the same settings")
        accelerator.unwrap_model(models.pop()).load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = _checkpoint_step(resume)
        logger.info("resumed from %s at step %d", resume, global_step)

    if accelerator.is_main_process:
        accelerator.init_trackers("erase", config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool))})
        if pipe is not None:
            save_validation(pipe, {}, args, spec, output_dir, 0)

    # 5. The loop. Batches are drawn from per-process generators seeded by rank, so DDP replicas see different data.
    g = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index + global_step)
    if resume is not None:
        restore_data_order(g, resume, accelerator.process_index)
    bar = tqdm(range(global_step, args.max_train_steps), initial=global_step, total=args.max_train_steps,
               desc="erase", disable=not accelerator.is_local_main_process)
    loss_value, terms = float("nan"), {}
    n = args.train_batch_size
    for _ in bar:
        with accelerator.accumulate(model):
            fi = torch.randint(0, len(forget.captions), (n,), generator=g)
            ri = torch.randint(0, len(retain.captions), (n,), generator=g)
            pi = torch.randint(0, len(prompts["forget"]), (n,), generator=g)
            qi = torch.randint(0, len(prompts["retain"]), (n,), generator=g)
            batch = {
                "fi": fi.to(accelerator.device), "forget_captions": [forget.captions[i] for i in fi],
                "ri": ri.to(accelerator.device), "retain_captions": [retain.captions[i] for i in ri],
                "forget_prompts": [prompts["forget"][i] for i in pi], "pi": pi.to(accelerator.device),
                "retain_prompts": [prompts["retain"][i] for i in qi], "qi": qi.to(accelerator.device),
            }
            loss, terms = model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {global_step} "
                                         f"({ {k: v.item() for k, v in terms.items()} }); lower --learning_rate")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            global_step += 1
            loss_value, terms = loss.item(), {k: v.item() for k, v in terms.items()}
            accelerator.log({"loss": loss_value, **terms}, step=global_step)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                save_checkpoint(accelerator, output_dir, global_step, g, args.checkpoints_total_limit)
            if pipe is not None and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                save_validation(pipe, all_patch_layers(students, towers, args)[0], args, spec, output_dir, global_step)
    train_seconds = time.time() - start

    # 6. Export: LoRA (or the full fine-tune's SVD) of every tower → one patch, written atomically by the patch module.
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:  # DDP replicas must have stayed identical, or the patch is one replica's guess
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        sums = accelerator.gather(checksum)
        if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-9, atol=1e-12):
            raise RuntimeError(f"the {accelerator.num_processes} processes ended with different weights {sums.tolist()}")
    metrics = {"train_seconds": round(train_seconds, 1), "steps": global_step, "final_loss": loss_value, "terms": terms,
               "processes": accelerator.num_processes,
               "clip_text_tower_difference": {t.name: t.clip_difference for t in towers}}
    if accelerator.is_main_process:
        from .patch import save_patch

        layers, residual = all_patch_layers(students, towers, args)
        if args.full_finetune:
            metrics["lowrank_residual"] = residual
        settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list)) or v is None}
        patch = save_patch(output_dir / PATCH_NAME, layers, method="cliperase", settings=settings,
                           erased=spec.erase, protected=spec.keep, base_model=args.pretrained_model_name_or_path,
                           fingerprints={t.name: t.fingerprint for t in towers})
        metrics["patch"] = str(patch)
        metrics["patch_bytes"] = patch.stat().st_size
        if pipe is not None:
            metrics["validation_grid"] = str(save_validation(pipe, layers, args, spec, output_dir, global_step))
        if miniworld:
            from .measure import miniworld_metrics

            metrics.update(miniworld_metrics(patch, spec, generations=args.eval_generations))
        write_json(output_dir / "metrics.json", metrics)
    accelerator.end_training()
    return metrics


# what resume reads (Accelerate's optimizer and RNG states, our trainable weights); the batch generator's state
# (data_state_<rank>.safetensors) is there too, except in checkpoints of versions before it was saved
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.bin", "random_states_0.pkl")


def _checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-([0-9]{1,12})", path.name)
    return int(m.group(1)) if m else None


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in CHECKPOINT_FILES)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders, oldest first. Stray names (``checkpoint-foo``) and folders lacking a
    file resume reads (left by a kill before checkpoints were written atomically) are skipped."""
    found = [p for p in output_dir.glob("checkpoint-*") if _checkpoint_step(p) is not None and _complete(p)]
    return sorted(found, key=_checkpoint_step)


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - limit + 1)]:
        trash = old.with_name(f".{old.name}.partial-deleting")  # renamed first: a kill mid-delete leaves no half
        old.rename(trash)  # checkpoint-N, only a hidden folder that the next start removes
        shutil.rmtree(trash)


def save_checkpoint(accelerator, output_dir: Path, step: int, generator: torch.Generator, limit: int | None) -> Path:
    """``save_state`` into a temp folder, the batch generator's state beside it, then one rename: a kill at any point
    leaves either a complete ``checkpoint-<step>`` or none (and a hidden temp folder the next start removes)."""
    from .atomic import chmod_tree

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".{final.name}.partial-incomplete"  # the same name on every process
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_file({"generator": generator.get_state()}, str(tmp / f"data_state_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.environ.get("ERASE_DIFFUSION_TEST_CHECKPOINT_PAUSE"):  # lets the kill -9 test hit this very moment
            time.sleep(float(os.environ["ERASE_DIFFUSION_TEST_CHECKPOINT_PAUSE"]))
        chmod_tree(tmp)
        if final.exists():  # an incomplete leftover of the same step (complete ones are resumed from, never redone)
            stale = final.with_name(f".{final.name}.partial-stale")
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def restore_data_order(generator: torch.Generator, checkpoint: Path, process_index: int) -> None:
    """Continue the batch sequence where the checkpoint left it, so a resumed run draws the same batches as an
    uninterrupted one (re-seeding would draw others and train another patch)."""
    path = checkpoint / f"data_state_{process_index}.safetensors"
    if not path.is_file():
        logger.warning("%s has no data state (an older checkpoint): batches are re-seeded, so the result will differ "
                       "from an uninterrupted run", checkpoint)
        return
    generator.set_state(load_file(str(path))["generator"])


@contextmanager
def merged(pipe, layers: dict):
    """The pipeline with a patch's ``layers`` ({component: {module: LoraFactors}}) merged into its text encoders, the
    original weights restored on exit: validation images come from the pipeline's own prompt encoding, guidance and
    SDXL pooling, with exactly the weights the patch will hold."""
    from .patch import TEXT_ENCODERS
    from .pipelines.loading import find_linear

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
            for weight, original in reversed(saved):
                weight.copy_(original)


@torch.no_grad()
def save_validation(pipe, layers: dict, args, spec: ConceptSpec, output_dir: Path, step: int) -> Path:
    """Before/after grid: row 1 the original pipeline, row 2 with the current patch merged; same seeds."""
    from .measure import save_grid

    prompts = args.validation_prompts or [f"a {w}" for w in spec.all_erase_words()] + [f"a {k}" for k in spec.keep[:2]]
    rows = []
    for erased in (False, True):
        images = []
        with merged(pipe, layers) if erased else nullcontext():
            for i, p in enumerate(prompts):
                g = torch.Generator().manual_seed(args.seed + i)
                images.append(pipe(p, generator=g, output_type="pt", num_inference_steps=20).images[0] * 2 - 1)
        rows.append(torch.stack(images))
    return save_grid(torch.cat(rows), output_dir / "validation" / f"step-{step:06d}.png", columns=len(prompts))

