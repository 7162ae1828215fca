"""Tiny random pipelines of the real architectures (diffusers' own test configs), built offline in code.

SD 1.x: CLIPTextModel, last hidden state. SD 2.x-like: same classes, a wider encoder with a penultimate-layer read
(diffusers' SD2 uses CLIPTextModel too). SDXL: CLIPTextModel + CLIPTextModelWithProjection.
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from erase_diffusion.miniworld.tokenizer import write_tokenizer


@functools.cache
def tokenizer_dir() -> str:
    import tempfile

    folder = tempfile.mkdtemp(prefix="tiny-tok-")
    write_tokenizer(folder)
    return folder


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dir())


def _text_config(tok, hidden, layers, heads, inter, projection_dim=None):
    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_hidden_layers=layers,
        layer_norm_eps=1e-5, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **({"projection_dim": projection_dim} if projection_dim else {}),
    )


def _vae(channels=(4, 8), groups=2, sample_size=32):
    return AutoencoderKL(
        block_out_channels=list(channels), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=groups,
        down_block_types=["DownEncoderBlock2D"] * len(channels), up_block_types=["UpDecoderBlock2D"] * len(channels),
        sample_size=sample_size,
    )


def sd_pipeline(hidden: int = 32, layers: int = 2) -> StableDiffusionPipeline:
    """SD 1.x architecture (also SD 2.x's: same classes, other sizes), random weights."""
    tok = tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden, norm_num_groups=2,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(0)
    vae = _vae()
    torch.manual_seed(0)
    te = CLIPTextModel(_text_config(tok, hidden, layers, 4, 2 * hidden))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd2_pipeline() -> StableDiffusionPipeline:
    """SD 2.x-like: a different encoder width/depth than SD 1 (patches for one must be refused by the other)."""
    return sd_pipeline(hidden=48, layers=3)


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    tok = tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    torch.manual_seed(0)
    vae = _vae((32, 64), groups=32, sample_size=128)
    cfg = _text_config(tok, 32, 5, 4, 37, projection_dim=32)
    torch.manual_seed(0)
    te = CLIPTextModel(cfg)
    torch.manual_seed(1)
    te2 = CLIPTextModelWithProjection(cfg)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tokenizer(),
                                     unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_for(text_encoder, image_size: int = 32):
    """A CLIPModel whose text tower is ``text_encoder`` (weights copied; its projection too for SDXL's second encoder)
    with a tiny random vision tower: what CLIPErase needs beside a pipeline. Returns (model, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    from erase_diffusion.patch import clip_core

    text = text_encoder.config
    projection = getattr(text, "projection_dim", None) or text.hidden_size
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=image_size, patch_size=8, projection_dim=projection)
    torch.manual_seed(2)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection))
    clip_core(clip.text_model).load_state_dict(clip_core(text_encoder).state_dict())
    if hasattr(text_encoder, "text_projection"):
        clip.text_projection.load_state_dict(text_encoder.text_projection.state_dict())
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return clip.eval(), processor


def save_pipeline_with_clips(pipe, folder) -> list[str]:
    """Save ``pipe`` to ``folder/pipeline`` and, per text encoder, its CLIPModel to ``folder/clip_<component>``."""
    from pathlib import Path

    folder = Path(folder)
    pipe.save_pretrained(folder / "pipeline")
    clips = []
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            clip, processor = clip_for(getattr(pipe, component))
            out = folder / f"clip_{component}"
            clip.save_pretrained(out)
            processor.save_pretrained(out)
            getattr(pipe, "tokenizer_2" if component == "text_encoder_2" else "tokenizer").save_pretrained(out)
            clips.append(str(out))
    return clips
