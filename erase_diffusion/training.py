"""CLIPErase training with Accelerate: concepts → data → objective → LoRA on the text tower → patch.

``train(args)`` is what ``accelerate launch train_erase.py`` runs; ``args`` are the script's parsed arguments
(names as in diffusers' training examples). The loop follows diffusers' ``train_text_to_image_lora.py``: one
``Accelerator``, a frozen reference model outside ``prepare``, checkpoints through ``save_state`` with hooks that
store only the LoRA weights, and the whole objective visible in ``erase_loss``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import cliperase, data as pair_data
from .concepts import ConceptSpec, miniworld_spec
from .measure import features
from .models import load_clip, load_pipeline

logger = logging.getLogger(__name__)
PATCH_NAME = "erase_patch.safetensors"
# the text tower only: the vision tower shares these module names
TEXT_TARGETS = r".*text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)"


def concept_spec(args) -> ConceptSpec:
    """The concepts from ``--concepts_file`` or ``--erase_concept``/``--keep_concepts``/``--anchor_concept``."""
    if args.concepts_file:
        return ConceptSpec.from_file(args.concepts_file)
    if args.pretrained_model_name_or_path == "miniworld":
        return miniworld_spec(args.erase_concept, args.keep_concepts, args.anchor_concept)
    return ConceptSpec(args.erase_concept, {}, args.keep_concepts, args.anchor_concept)


def check_output_dir(args) -> None:
    out = Path(args.output_dir)
    if args.resume_from_checkpoint or not out.exists():
        return
    if (out / PATCH_NAME).exists() or any(out.glob("checkpoint-*")):
        raise ValueError(
            f"{out} already holds another run ({PATCH_NAME} or checkpoints); pass --resume_from_checkpoint latest to "
            "continue it, or choose another --output_dir"
        )


def encode(model, tokenizer, texts: list[str], device, tokens: bool = False):
    """CLIP's projected pooled embedding, or (``tokens=True``) the per-token hidden states a pipeline reads.

    Token states are computed the way ``StableDiffusionPipeline.encode_prompt`` does: padded to 77, no attention
    mask. The pooled embedding sits at the end-of-text token, which the causal mask shields from padding, so it only
    needs padding to the longest prompt (4-6× fewer positions).
    """
    padding = dict(padding="max_length", max_length=tokenizer.model_max_length) if tokens else dict(padding="longest")
    ids = tokenizer(texts, truncation=True, return_tensors="pt", **padding).input_ids.to(device)
    out = model.text_model(input_ids=ids)
    return out.last_hidden_state if tokens else model.text_projection(out.pooler_output)


def erase_loss(student, teacher, tokenizer, batch: dict, weights: cliperase.LossWeights, forget_loss: str):
    """The whole objective: CLIPErase's three modules on image–text pairs, plus the token-level terms."""
    device = batch["forget_img"].device
    scale = teacher.logit_scale.exp().detach()
    terms = {}
    if weights.forget:
        f_txt = encode(student, tokenizer, batch["forget_captions"], device)
        terms["forget"] = (cliperase.forgetting_dot(batch["forget_img"], f_txt) if forget_loss == "dot"
                           else cliperase.forgetting_neg_contrastive(batch["forget_img"], f_txt, scale))
    if weights.retain or weights.consistency:
        r_txt = encode(student, tokenizer, batch["retain_captions"], device)
        if weights.retain:
            terms["retain"] = cliperase.retention(batch["retain_img"], r_txt, scale)
        if weights.consistency:
            with torch.no_grad():
                ref_txt = encode(teacher, tokenizer, batch["retain_captions"], device)
            terms["consistency"] = cliperase.consistency(batch["retain_img"], r_txt, batch["retain_img"], ref_txt, scale)
    if weights.token_forget:
        states = encode(student, tokenizer, batch["forget_prompts"], device, tokens=True)
        with torch.no_grad():
            anchor = encode(teacher, tokenizer, batch["anchor_prompts"], device, tokens=True)
        terms["token_forget"] = cliperase.token_forgetting(states, anchor)
    if weights.token_consistency:
        states = encode(student, tokenizer, batch["retain_prompts"], device, tokens=True)
        with torch.no_grad():
            ref = encode(teacher, tokenizer, batch["retain_prompts"], device, tokens=True)
        terms["token_consistency"] = cliperase.token_consistency(states, ref)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {k: v.item() for k, v in terms.items()}


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
    """Dense weight changes of every text-tower Linear → low-rank factors by SVD (residual reported)."""
    from .patch import factors_from_delta

    ref = dict(reference.named_modules())
    layers, worst = {}, 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("text_model.encoder."):
            delta = module.weight.detach().float().cpu() - ref[name].weight.detach().float().cpu()
            if delta.abs().max() > 0:
                layers[name], residual = factors_from_delta(delta, rank=rank)
                worst = max(worst, residual)
    return layers, worst


def train(args) -> dict:
    # 1. Everything that can be refused is refused before any model loads.
    spec = concept_spec(args)
    check_output_dir(args)
    if args.forget_loss not in ("dot", "neg_contrastive"):
        raise ValueError("--forget_loss must be 'dot' or 'neg_contrastive'")
    miniworld = args.pretrained_model_name_or_path == "miniworld"
    if not miniworld and not args.train_data_dir and not args.generate_data:
        raise ValueError("a model other than the miniature world needs --train_data_dir, or --generate_data")

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    start = time.time()

    # 2. Models: the CLIP whose text tower is the pipeline's text encoder, and its frozen copy (the "original").
    clip_name = args.clip_model_name_or_path or args.pretrained_model_name_or_path
    student, tokenizer = load_clip(clip_name)
    pipe = None
    if args.target == "pipeline":
        from .patch import fingerprint

        pipe = load_pipeline(args.pretrained_model_name_or_path)
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError("CLIPErase training of SDXL's two text encoders is not supported yet; "
                             "use `erase-diffusion erase` (closed form), which handles SDXL")
        if fingerprint(student.text_model) != fingerprint(pipe.text_encoder):
            raise ValueError(f"the text tower of CLIP {clip_name!r} is not the text encoder of pipeline "
                             f"{args.pretrained_model_name_or_path!r}: pass the matching --clip_model_name_or_path")
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student.requires_grad_(False)
    if args.full_finetune:
        student.text_model.encoder.requires_grad_(True)
    else:
        inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank,
                                           target_modules=TEXT_TARGETS, init_lora_weights=True), student)
    params = [p for p in student.parameters() if p.requires_grad]

    # 3. Data: forget/retain pairs (image embeddings are fixed: the vision tower is frozen) and prompt sets.
    if miniworld:
        pairs = pair_data.from_miniworld(spec, seed=args.seed + 1)
    else:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(clip_name)
        pairs = (pair_data.from_folder(args.train_data_dir, spec, processor) if args.train_data_dir
                 else pair_data.from_pipeline(pipe, spec, processor))
    forget, retain = pairs.split()
    prompts = pair_data.prompt_sets(spec, miniworld, seed=args.seed)
    teacher.to(accelerator.device)
    with torch.no_grad():
        def image_emb(x):
            return torch.cat([features(teacher.get_image_features(pixel_values=x[i : i + 256].to(accelerator.device)))
                              for i in range(0, len(x), 256)])
        forget_img, retain_img = image_emb(forget.images), image_emb(retain.images)
    logger.info("forget pairs %d, retain pairs %d", len(forget.captions), len(retain.captions))

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    student, optimizer = accelerator.prepare(student, optimizer)

    # 4. Checkpoints hold the trainable weights only (LoRA: a few hundred KB), not the whole CLIP.
    def save_hook(models, weights, out):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            state = (get_peft_model_state_dict(model) if not args.full_finetune
                     else {k: v for k, v in model.state_dict().items() if k.startswith("text_model.encoder.")})
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(out, "trainable.safetensors"))
        weights.clear()

    def load_hook(models, inp):
        model = accelerator.unwrap_model(models.pop())
        state = load_file(os.path.join(inp, "trainable.safetensors"))
        if args.full_finetune:
            missing = model.load_state_dict(state, strict=False)
            assert not missing.unexpected_keys, missing.unexpected_keys
        else:
            set_peft_model_state_dict(model, state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step = 0
    if args.resume_from_checkpoint:
        path = (sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1:]
                if args.resume_from_checkpoint == "latest" else [Path(args.resume_from_checkpoint)])
        if not path or not path[0].exists():
            raise ValueError(f"no checkpoint to resume from in {output_dir}" if args.resume_from_checkpoint == "latest"
                             else f"checkpoint {args.resume_from_checkpoint} does not exist")
        accelerator.load_state(str(path[0]))
        global_step = int(path[0].name.split("-")[1])
        logger.info("resumed from %s at step %d", path[0], global_step)

    if accelerator.is_main_process:
        accelerator.init_trackers("erase", config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool))})
        if pipe is not None and args.validation_steps:
            save_validation(pipe, accelerator.unwrap_model(student), tokenizer, args, spec, output_dir, 0)

    # 5. The loop. Batches are drawn from per-process generators seeded by rank, so DDP replicas see different data.
    weights = cliperase.LossWeights(args.forget_weight, args.retain_weight, args.consistency_weight,
                                    args.token_forget_weight, args.token_consistency_weight)
    g = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index + global_step)
    bar = tqdm(range(global_step, args.max_train_steps), initial=global_step, total=args.max_train_steps,
               desc="erase", disable=not accelerator.is_local_main_process)
    loss_value, terms = float("nan"), {}
    for _ in bar:
        with accelerator.accumulate(student):
            fi = torch.randint(0, len(forget.captions), (args.train_batch_size,), generator=g)
            ri = torch.randint(0, len(retain.captions), (args.train_batch_size,), generator=g)
            pi = torch.randint(0, len(prompts["forget"]), (args.train_batch_size,), generator=g)
            qi = torch.randint(0, len(prompts["retain"]), (args.train_batch_size,), generator=g)
            batch = {
                "forget_img": forget_img[fi], "forget_captions": [forget.captions[i] for i in fi],
                "retain_img": retain_img[ri], "retain_captions": [retain.captions[i] for i in ri],
                "forget_prompts": [prompts["forget"][i] for i in pi], "anchor_prompts": [prompts["anchor"][i] for i in pi],
                "retain_prompts": [prompts["retain"][i] for i in qi],
            }
            loss, terms = erase_loss(accelerator.unwrap_model(student), teacher, tokenizer, batch, weights, args.forget_loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {global_step} ({terms}); lower --learning_rate")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            global_step += 1
            loss_value = loss.item()
            accelerator.log({"loss": loss_value, **terms}, step=global_step)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                if accelerator.is_main_process:
                    prune_checkpoints(output_dir, args.checkpoints_total_limit)
                accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
            if (pipe is not None and args.validation_steps and global_step % args.validation_steps == 0
                    and accelerator.is_main_process):
                save_validation(pipe, accelerator.unwrap_model(student), tokenizer, args, spec, output_dir, global_step)
    train_seconds = time.time() - start

    # 6. Export: LoRA (or the full fine-tune's SVD) → the patch, written atomically by the patch module.
    accelerator.wait_for_everyone()
    metrics = {"train_seconds": round(train_seconds, 1), "steps": global_step, "final_loss": loss_value, "terms": terms}
    if accelerator.is_main_process:
        from .patch import fingerprint, save_patch

        model = accelerator.unwrap_model(student)
        if args.full_finetune:
            layers, residual = full_finetune_layers(model, teacher, args.rank)
            metrics["lowrank_residual"] = residual
        else:
            layers = lora_layers(model)
        settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
        patch = save_patch(output_dir / PATCH_NAME, {"text_encoder": layers}, method="cliperase", settings=settings,
                           erased=spec.erase, protected=spec.keep, base_model=args.pretrained_model_name_or_path,
                           fingerprints={"text_encoder": fingerprint(teacher.text_model)})
        metrics["patch"] = str(patch)
        metrics["patch_bytes"] = patch.stat().st_size
        if pipe is not None and args.validation_steps:
            metrics["validation_grid"] = str(save_validation(pipe, model, tokenizer, args, spec, output_dir, global_step))
        if miniworld:
            from .measure import miniworld_metrics

            metrics.update(miniworld_metrics(patch, spec, generations=args.eval_generations))
        write_json_atomic(output_dir / "metrics.json", metrics)
    accelerator.end_training()
    return metrics


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[: max(0, len(ckpts) - limit + 1)]:
        shutil.rmtree(old)


@torch.no_grad()
def save_validation(pipe, student, tokenizer, args, spec: ConceptSpec, output_dir: Path, step: int) -> Path:
    """Before/after grid: row 1 the original pipeline, row 2 with the current text tower; same seeds."""
    from .measure import save_grid

    prompts = args.validation_prompts or [f"a {w}" for w in spec.all_erase_words()] + [f"a {k}" for k in spec.keep[:2]]
    device = pipe.device
    rows = []
    for erased in (False, True):
        images = []
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(args.seed + i)
            if erased:
                cond = encode(student, tokenizer, [p], device, tokens=True)
                uncond = encode(student, tokenizer, [""], device, tokens=True)
                out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, generator=g, output_type="pt",
                           num_inference_steps=20)
            else:
                out = pipe(p, generator=g, output_type="pt", num_inference_steps=20)
            images.append(out.images[0] * 2 - 1)
        rows.append(torch.stack(images))
    return save_grid(torch.cat(rows), output_dir / "validation" / f"step-{step:06d}.png", columns=len(prompts))


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
