"""Train the miniature world from scratch: tokenizer, CLIP, judge, VAE and UNet, in standard layouts.

    erase-diffusion build-miniworld [--output DIR] [--seed 0]

Each component is trained, saved to a temporary folder and renamed into place, so an interrupted build never leaves
half-written weights where good ones were; a rerun skips components that are already there (``--force`` retrains).
The UNet is trained on the frozen text tower of the CLIP trained here, so the pipeline's ``text_encoder`` *is* that
CLIP's text tower.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer
from tqdm.auto import tqdm

from ..atomic import atomic_dir, write_json
from . import domain
from .judge import Judge
from .tokenizer import write_tokenizer

LOCKED_TEXT_CYCLES = 2
DEFAULT_OUTPUT = Path(__file__).parent / "weights"
STEPS = {"judge": 800, "clip": 1500, "clip_locked_text": 1500, "vae": 700, "pipeline": 4000}


def _cosine_lr(opt, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def clip_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=64, **ids),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, projection_dim=64),
        projection_dim=64,
    )


def random_captions(shape: torch.Tensor, colour: torch.Tensor, style: torch.Tensor, rng: random.Random) -> list[str]:
    colours = list(domain.COLOURS)
    return [
        domain.caption(domain.Scene(domain.SHAPES[s], colours[c], domain.STYLES[st], 0, 0, 0, 0, 0), rng)
        for s, c, st in zip(shape.tolist(), colour.tolist(), style.tolist())
    ]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter, so the judge also reads slightly soft generated images."""
    b = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :]).expand(3, 1, 3, 3), groups=3)
    w = torch.rand(b, 1, 1, 1, generator=g)
    x = w * blurred + (1 - w) * x
    x = x * (1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5))
    return (x + 0.08 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_judge(data: domain.Dataset, out: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = _cosine_lr(opt, STEPS["judge"], 100)
    for step in tqdm(range(STEPS["judge"]), desc="judge"):
        idx = torch.randint(0, len(data), (64,), generator=g)
        logits = judge(augment(data.float_images(idx), g))
        loss = sum(F.cross_entropy(logits[k], getattr(data, k)[idx]) for k in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    judge.eval()
    judge.save_pretrained(out)
    return {"final_loss": loss.item()}


def train_clip(data: domain.Dataset, tokenizer: CLIPTokenizer, out: Path, seed: int) -> dict:
    """Contrastive training in two phases: both towers, then the image side against the locked text tower.

    The text tower is the pipeline's text encoder, so the UNet can train on it as soon as phase 1 ends; phase 2 only
    sharpens the image side (zero-shot accuracy) without moving what the UNet reads.
    """
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(tokenizer))
    _contrastive_steps(model, data, tokenizer, STEPS["clip"], seed, lr=1e-3)
    model.text_model.requires_grad_(False)
    for cycle in range(LOCKED_TEXT_CYCLES):  # cosine cycles with warm restarts
        loss = _contrastive_steps(model, data, tokenizer, STEPS["clip_locked_text"], seed + 1 + cycle, lr=5e-4)
    model.requires_grad_(True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"final_loss": loss}


def _contrastive_steps(model: CLIPModel, data: domain.Dataset, tokenizer, steps: int, seed: int, lr: float) -> float:
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    sched = _cosine_lr(opt, steps, 200)
    # one image per (shape, colour, style) triple in each batch: duplicates would be false negatives
    triple = data.shape * 100 + data.colour * 10 + data.style
    by_triple = {t: (triple == t).nonzero().flatten().tolist() for t in triple.unique().tolist()}
    keys = list(by_triple)
    for step in tqdm(range(steps), desc="clip"):
        idx = torch.tensor([rng.choice(by_triple[t]) for t in rng.sample(keys, 64)])
        texts = random_captions(data.shape[idx], data.colour[idx], data.style[idx], rng)
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        loss = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                     pixel_values=data.float_images(idx), return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return loss.item()


def train_vae(data: domain.Dataset, out: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )  # 64×64×3 → 16×16×4
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    sched = _cosine_lr(opt, STEPS["vae"], 50)
    for step in tqdm(range(STEPS["vae"]), desc="vae"):
        x = data.float_images(torch.randint(0, len(data), (32,), generator=g))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        x = data.float_images(slice(0, 512))
        z = vae.encode(x).latent_dist.mean
        rec_mae = (vae.decode(z).sample - x).abs().mean().item()
    vae.register_to_config(scaling_factor=float(1 / z.std()))  # unit-variance latents, as SD's 0.18215 does
    vae.save_pretrained(out)
    return {"reconstruction_mae": rec_mae, "scaling_factor": vae.config.scaling_factor}


def train_unet(data: domain.Dataset, clip_dir: Path, vae_dir: Path, out: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel.from_pretrained(clip_dir).eval().requires_grad_(False)  # the CLIP's text tower
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.float_images(slice(i, i + 256))).latent_dist.mean
                             for i in range(0, len(data), 256)]) * vae.config.scaling_factor
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64, 64), cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    ema = EMAModel(unet.parameters(), decay=0.999)
    noise_sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, steps_offset=1)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = _cosine_lr(opt, STEPS["pipeline"], 200)
    for step in tqdm(range(STEPS["pipeline"]), desc="unet"):
        idx = torch.randint(0, len(data), (64,), generator=g)
        texts = random_captions(data.shape[idx], data.colour[idx], data.style[idx], rng)
        texts = ["" if rng.random() < 0.1 else t for t in texts]  # caption dropout for classifier-free guidance
        with torch.no_grad():
            ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            cond = text_encoder(ids)[0]
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        pred = unet(noise_sched.add_noise(z0, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
    ema.copy_to(unet.parameters())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_sched.config, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return {"final_loss": loss.item()}


def build(output: Path = DEFAULT_OUTPUT, seed: int = 0, force: bool = False, n_images: int = 12000) -> dict:
    torch.set_flush_denormal(True)  # denormals from tiny attention weights slowed CLIP training 30× on CPU
    output = Path(output)
    record_path = output / "build.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    t0 = time.time()
    data = domain.make_dataset(n_images, seed=seed)
    record["render_s"] = round(time.time() - t0, 1)

    def stage(name, fn):
        final = output / name
        if final.exists() and not force:
            print(f"[build] {name}: already built, skipping ({final})")
            return
        start = time.time()
        with atomic_dir(final) as tmp:
            info = fn(tmp)
        record[name] = {"seconds": round(time.time() - start, 1), "steps": STEPS.get(name), **info}
        write_json(record_path, {**record, "seed": seed, "n_images": n_images})

    tok_dir = Path(tempfile.mkdtemp())
    tokenizer = write_tokenizer(tok_dir)
    stage("judge", lambda d: train_judge(data, d, seed))
    stage("clip", lambda d: train_clip(data, tokenizer, d, seed))
    stage("vae", lambda d: train_vae(data, d, seed))
    stage("pipeline", lambda d: train_unet(data, output / "clip", output / "vae", d, seed))
    shutil.rmtree(tok_dir, ignore_errors=True)
    return record
