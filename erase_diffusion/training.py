"""CLIPErase training with Accelerate: concepts → data → objective → LoRA on the text tower(s) → ``Edit``.

``train(spec, config)`` returns the weight change (``erase_diffusion.train_cliperase``); ``run`` is what
``accelerate launch train_erase.py`` runs: train, then the patch with its model card, the miniature world's figures
and ``metrics.json``. The loop follows diffusers' ``train_text_to_image_lora.py``: one ``Accelerator``, the original
model read as the student with its LoRA switched off (``cliperase.original``), checkpoints through ``save_state``
(``checkpoints``), the whole objective in ``cliperase.EraseObjective``; SDXL trains both encoders into one patch.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor

from . import data as pair_data
from .anchors import with_default_anchor
from .attacks import placeholder_id
from .atomic import write_json
from .checkpoints import (
    PATCH_NAME, check_output_dir, checkpoint_step, prepare_output_dir, register_trainable_state, restore_data_order,
    resume_checkpoint, save_checkpoint,
)
from .cliperase import ADV_TOKENS, EraseObjective, LossWeights, TextTower, original, original_outputs
from .concepts import ConceptSpec
from .config import CLIPEraseConfig, ConceptArguments, parse_args
from .measure import image_embeddings, miniworld_metrics
from .models import load_clip, load_pipeline, resolve
from .patch import Edit, clip_core, factors_from_delta, fingerprint, save_patch, write_card
from .patch_format import LoraFactors
from .threads import one_thread_if_small
from .validation import save_validation

logger = logging.getLogger(__name__)
# the text tower only: the vision tower shares these module names
TEXT_TARGETS = r".*text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)"


def main(argv=None, description: str | None = None) -> dict:
    """``train_erase.py``: its command line (``argv``, default ``sys.argv[1:]``) → ``run``; returns the metrics."""
    concepts, config = parse_args(argv, description=description)
    return run(concepts.spec(config.pretrained_model_name_or_path), config, concepts)


def run(spec: ConceptSpec, config: CLIPEraseConfig, concepts: ConceptArguments | None = None) -> dict:
    """``train``, then, on the main process, ``<output_dir>/erase_patch.safetensors`` with its model card, the
    miniature world's forget / retain figures when it is the model, and ``metrics.json``; returns the metrics.
    ``concepts``: how the command line named the concepts, recorded in the patch's settings as given."""
    edit = train(spec, config)
    if concepts is not None:
        edit.settings.update(asdict(concepts))
    metrics = dict(edit.figures)
    if not PartialState().is_main_process:
        return metrics
    patch = save_patch(edit, spec, config.pretrained_model_name_or_path, Path(config.output_dir) / PATCH_NAME)
    metrics.update(patch=str(patch), patch_bytes=patch.stat().st_size)
    if config.miniworld:
        metrics.update(miniworld_metrics(patch, spec, generations=config.eval_generations))
        write_card(patch, metrics)  # the card again, with the measured figures
    write_json(Path(config.output_dir) / "metrics.json", metrics)
    return metrics


def train(spec: ConceptSpec, config: CLIPEraseConfig, accelerator: Accelerator | None = None) -> Edit:
    """CLIPErase on ``config``'s model: the LoRA (or full fine-tune) of every text tower that forgets ``spec.erase``
    and keeps ``spec.keep``, as an ``Edit`` for ``patch.save_patch``. Checkpoints, logs and validation grids go to
    ``config.output_dir``. ``accelerator``: the caller's (who then ends it); by default one made from ``config``.

    One function of numbered stages, as diffusers' training examples are (about 70 lines): the order in which the
    random state is drawn (LoRA initialisation, then batches) reads top to bottom, and the patch's bits depend on it.
    """
    # 1. Everything that can be refused is refused before any model loads.
    config.check(spec)
    config = dataclasses.replace(config, max_train_steps=config.steps_for(spec))  # the patch records the number
    check_output_dir(config)
    resume = resume_checkpoint(config)
    prepare_output_dir(config)
    own_accelerator = accelerator is None
    accelerator = accelerator or make_accelerator(config)
    set_seed(config.seed)
    start = time.time()

    # 2. Models: per text encoder, the CLIP whose text tower it is, made trainable (LoRA, or full with a frozen copy).
    towers, students, pipe = load_towers(config, accelerator)
    first = towers[0]  # the miniature world's anchors are measured with its one text encoder
    given = ConceptArguments.of(spec)  # recorded as the caller named the concepts, as the command line records them
    spec = with_default_anchor(spec, students[first.name].text_model, first.tokenizer, config.miniworld)
    for student in students.values():
        make_trainable(student, config)
    if pipe is not None:
        pipe.to(accelerator.device)

    # 3. Data: forget/retain pairs embedded by each frozen vision tower, and the prompt sets of the token terms.
    forget, retain, prompts = load_data(spec, config, pipe)
    for tower in towers:
        precompute_targets(tower, students[tower.name], spec, forget, retain, prompts, config, accelerator.device)
    logger.info("forget pairs %d, retain pairs %d", len(forget.captions), len(retain.captions))
    if pipe is not None and not config.validation_steps:
        pipe = None  # only the validation grids need it from here on

    # 4. Objective and optimizer through Accelerate; a resumed run continues from its checkpoint's state.
    model = EraseObjective(students, towers, LossWeights.of(config), config.forget_loss, config.train_vision_tower,
                           config.adversarial_steps, config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_trainable_state(accelerator, model)
    global_step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = checkpoint_step(resume)
        logger.info("resumed from %s at step %d", resume, global_step)
    settings = {**config.settings(), **asdict(given), "anchor": spec.anchor}
    if accelerator.is_main_process:
        accelerator.init_trackers("erase", config={k: v for k, v in settings.items()
                                                   if isinstance(v, (int, float, str, bool))})
        if pipe is not None:
            save_validation(pipe, {}, config, spec, 0)
    validate = None if pipe is None else partial(save_current_validation, pipe, students, towers, config, spec)

    # 5. The loop.
    n_params = sum(p.numel() for p in model.parameters())
    with one_thread_if_small(n_params, accelerator.device):
        global_step, loss_value, terms = train_loop(accelerator, model, optimizer, params, (forget, retain, prompts),
                                                    config, global_step, resume, validate)
    train_seconds = time.time() - start

    # 6. Export: LoRA (or the full fine-tune's SVD) of every tower, with what the run measured.
    check_replicas_agree(accelerator, params)
    layers, residual = all_patch_layers(students, towers, config)
    figures = {"train_seconds": round(train_seconds, 1), "steps": global_step, "final_loss": loss_value, "terms": terms,
               "processes": accelerator.num_processes,
               "clip_text_tower_difference": {t.name: t.clip_difference for t in towers}}
    if config.full_finetune:
        figures["lowrank_residual"] = residual
    if pipe is not None and accelerator.is_main_process:
        figures["validation_grid"] = str(save_validation(pipe, layers, config, spec, global_step))
    if own_accelerator:
        accelerator.end_training()
    return Edit("cliperase", layers, settings, {t.name: t.fingerprint for t in towers}, figures)


def make_accelerator(config: CLIPEraseConfig) -> Accelerator:
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return accelerator


def load_data(spec: ConceptSpec, config: CLIPEraseConfig, pipe) -> tuple:
    """(forget pairs, retain pairs, prompt sets): the miniature world's own images, a folder of image–caption pairs,
    or images generated by the pipeline itself (--generate_data)."""
    if config.miniworld:
        pairs = pair_data.from_miniworld(spec, seed=config.seed + 1)
    elif config.train_data_dir:
        pairs = pair_data.from_folder(config.train_data_dir, spec)
    else:
        pairs = pair_data.from_pipeline(pipe, spec)
    forget, retain = pairs.split()
    return forget, retain, pair_data.prompt_sets(spec, config.miniworld, seed=config.seed)


def precompute_targets(tower: TextTower, student, spec: ConceptSpec, forget, retain, prompts: dict,
                       config: CLIPEraseConfig, device) -> None:
    """Everything the original model contributes to the loss is fixed: computed once here, not at every step (image
    embeddings by the frozen vision tower, the original's pooled retain captions and read prompt states)."""
    processor = None if config.miniworld else CLIPImageProcessor.from_pretrained(resolve(tower.clip, "clip"))
    f_pix, r_pix = forget.pixels(processor), retain.pixels(processor)
    with original(student.to(device), tower) as ref:
        tower.forget_img, tower.retain_img = image_embeddings(ref, f_pix), image_embeddings(ref, r_pix)
        tower.retain_txt = original_outputs(ref, tower, retain.captions, device, pooled_only=True)
        anchored = original_outputs(ref, tower, [pair_data.anchored(c, spec) for c in forget.captions], device,
                                    pooled_only=True)
        tower.forget_floor = F.cosine_similarity(anchored, tower.forget_img, dim=-1)
        sets = ("anchor", "retain") + (("forget",) if config.adversarial_weight else ())
        tower.targets = {k: original_outputs(ref, tower, prompts[k], device) for k in sets}
    if config.adversarial_weight:
        tower.attack_token = placeholder_id(tower.tokenizer)
    longest = max(len(ids) for ids in tower.tokenizer(prompts["forget"] + prompts["retain"]).input_ids)
    if config.adversarial_weight:  # attacked prompts carry up to ADV_TOKENS placeholders, the concept word kept
        longest += ADV_TOKENS
    tower.fit = min(tower.tokenizer.model_max_length, longest + 1)
    if config.train_vision_tower:
        tower.forget_pixels, tower.retain_pixels = f_pix, r_pix


def draw_batch(g: torch.Generator, forget, retain, prompts: dict, n: int, device) -> dict:
    """``n`` forget pairs, retain pairs, forget prompts and retain prompts, drawn with replacement from ``g``."""
    fi = torch.randint(0, len(forget.captions), (n,), generator=g)
    ri = torch.randint(0, len(retain.captions), (n,), generator=g)
    pi = torch.randint(0, len(prompts["forget"]), (n,), generator=g)
    qi = torch.randint(0, len(prompts["retain"]), (n,), generator=g)
    return {
        "fi": fi.to(device), "forget_captions": [forget.captions[i] for i in fi],
        "ri": ri.to(device), "retain_captions": [retain.captions[i] for i in ri],
        "forget_prompts": [prompts["forget"][i] for i in pi], "pi": pi.to(device),
        "attacked_prompts": [prompts["attacked"][i] for i in pi],
        "retain_prompts": [prompts["retain"][i] for i in qi], "qi": qi.to(device),
    }


def train_loop(accelerator, model, optimizer, params, data: tuple, config: CLIPEraseConfig, global_step: int,
               resume: Path | None, validate) -> tuple[int, float, dict]:
    """Steps ``global_step`` → ``config.max_train_steps``, with checkpoints and (``validate``) grids on the way;
    returns (last step, last loss, its terms). Batches are drawn from per-process generators seeded by rank, so DDP
    replicas see different data; a resumed run continues its checkpoint's batch sequence."""
    forget, retain, prompts = data
    g = torch.Generator().manual_seed(config.seed * 1000 + accelerator.process_index + global_step)
    if resume is not None:
        restore_data_order(g, resume, accelerator.process_index)
    bar = tqdm(range(global_step, config.max_train_steps), initial=global_step, total=config.max_train_steps,
               desc="erase", disable=not accelerator.is_local_main_process)
    loss_value, terms = float("nan"), {}
    for _ in bar:
        with accelerator.accumulate(model):
            loss, terms = model(draw_batch(g, forget, retain, prompts, config.train_batch_size, accelerator.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {global_step} "
                                         f"({ {k: v.item() for k, v in terms.items()} }); lower --learning_rate")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            global_step += 1
            loss_value, terms = loss.item(), {k: v.item() for k, v in terms.items()}
            accelerator.log({"loss": loss_value, **terms}, step=global_step)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if global_step % config.checkpointing_steps == 0 and global_step < config.max_train_steps:
                save_checkpoint(accelerator, Path(config.output_dir), global_step, g, config.checkpoints_total_limit)
            if validate is not None and global_step % config.validation_steps == 0 and accelerator.is_main_process:
                validate(global_step)
    return global_step, loss_value, terms


def check_replicas_agree(accelerator, params) -> None:
    """DDP replicas must have stayed identical, or the patch is one replica's guess."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        sums = accelerator.gather(checksum)
        if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-9, atol=1e-12):
            raise RuntimeError(f"the {accelerator.num_processes} processes ended with different weights {sums.tolist()}")


def lora_layers(model) -> dict:
    """peft's LoRA state dict → {module path: LoraFactors} with the LoRA scale folded into B."""
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
    ref = dict(reference.named_modules())
    layers, worst = {}, 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            delta = module.weight.detach().float().cpu() - ref[name].weight.detach().float().cpu()
            if delta.abs().max() > 0:
                layers[name], residual = factors_from_delta(delta, rank=rank)
                worst = max(worst, residual)
    return layers, worst


def patch_layers(student, tower: TextTower, config) -> tuple[dict, float]:
    """{component: {module: LoraFactors}}: text-tower layers under the tower's component; vision-tower layers (only
    with --train_vision_tower) under ``clip``, which ``apply_to_clip`` merges and pipelines ignore."""
    layers, residual = (full_finetune_layers(student, tower.teacher, config.rank) if config.full_finetune
                        else (lora_layers(student), 0.0))
    layers = {m: half_precision(f) for m, f in layers.items()}
    out = {tower.name: {m: f for m, f in layers.items() if m.startswith("text_model.")}}
    vision = {m: f for m, f in layers.items() if not m.startswith("text_model.")}
    if vision:
        out["clip"] = vision
    return out, residual


def half_precision(f: LoraFactors) -> LoraFactors:
    """The factors as stored: float16 (LoRA files' usual precision; half the bytes: a rank-8 CLIPErase patch on
    CLIP-L is 2.7 MB instead of 5.3 MB). Their norms are balanced first (B @ A unchanged before rounding), so neither
    factor as a whole sits near float16's range limits; B @ A then keeps its value to float16 rounding."""
    a, b = float(f.A.norm()), float(f.B.norm())
    s = math.sqrt(b / a) if a > 0 and b > 0 else 1.0
    return LoraFactors(A=(f.A.float() * s).half(), B=(f.B.float() / s).half())


def all_patch_layers(students: dict, towers: list[TextTower], config) -> tuple[dict, float]:
    layers, residual = {}, 0.0
    for tower in towers:
        parts, r = patch_layers(students[tower.name], tower, config)
        layers.update(parts)
        residual = max(residual, r)
    return layers, residual


def adopt_encoder(student, encoder, what: str, tolerance: float = 1e-2) -> float:
    """Make the CLIP's text tower exactly the pipeline's text encoder and return their largest relative difference.

    Pipelines often ship their encoder rounded to fp16 (SDXL's original checkpoint is fp16) while the Hub CLIP is fp32,
    so bit equality is too strict; a relative difference above ``tolerance`` (fp16 / bf16 rounding stays far below)
    means another model and is refused. The patch is then trained on, and fingerprinted as, the pipeline's weights.
    """
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


def load_towers(config, accelerator) -> tuple[list[TextTower], dict, object]:
    """(towers, {component: trainable CLIPModel}, pipeline or None). Pipeline first: it says how many text encoders
    there are and what they read; each CLIP's text tower must be that encoder (``adopt_encoder``)."""
    clip_names = config.clip_model_name_or_path or [config.pretrained_model_name_or_path]
    pipe, encoders = None, ["text_encoder"]
    if config.target == "pipeline":
        pipe = load_pipeline(config.pretrained_model_name_or_path)
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
                                       f"{config.pretrained_model_name_or_path!r} (pass the matching "
                                       "--clip_model_name_or_path)")
            tokenizer = pipe.tokenizer_2 if component == "text_encoder_2" else pipe.tokenizer
        teacher = copy.deepcopy(student).requires_grad_(False).eval().to(accelerator.device) if config.full_finetune else None
        towers.append(TextTower(component, clip_name, tokenizer, fingerprint(student.text_model), teacher,
                                layer=-2 if sdxl else -1, pooled=component == "text_encoder_2",
                                clip_difference=difference))
        students[component] = student
    return towers, students, pipe


def make_trainable(student, config) -> None:
    """LoRA on the text tower (default) or its full weights; the vision tower too with --train_vision_tower; activation
    checkpointing with --gradient_checkpointing."""
    student.requires_grad_(False)
    if config.full_finetune:
        for part in [student.text_model] + ([student.vision_model] if config.train_vision_tower else []):
            part.encoder.requires_grad_(True)
    else:
        target = TEXT_TARGETS if not config.train_vision_tower else TEXT_TARGETS.replace("text_model", "(text|vision)_model")
        inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha or config.rank, target_modules=target,
                                           init_lora_weights=True), student)
    student.train()  # CLIP and the LoRA have no dropout; train mode is what switches activation checkpointing on
    if config.gradient_checkpointing:  # recompute each layer in backward: activations dominate memory at real size
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name is deprecated)
            student.activation_checkpointing_enable()
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_current_validation(pipe, students: dict, towers: list[TextTower], config, spec: ConceptSpec, step: int):
    """The validation grid with the students' weights as they are at ``step``."""
    return save_validation(pipe, all_patch_layers(students, towers, config)[0], config, spec, step)
