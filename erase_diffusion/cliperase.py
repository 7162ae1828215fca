"""The CLIPErase objective (Yang et al., ACL 2025), one function per module, plus the token-level terms Stable
Diffusion needs.

CLIP's losses act on the pooled, projected embedding; Stable Diffusion reads the per-token hidden states. The
``token_*`` terms act on those states: ``token_forgetting`` pulls prompts naming the concept toward the same prompt
with an anchor concept, ``token_consistency`` keeps retain prompts' states equal to the original model's.
benchmarks/bench_cliperase.py measures what each term buys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def forgetting_dot(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Forgetting module, reading A: mean cosine of matched forget pairs (bounded below by −1)."""
    return (F.normalize(img_emb, dim=-1) * F.normalize(txt_emb, dim=-1)).sum(-1).mean()


def forgetting_neg_contrastive(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Forgetting module, reading B: gradient ascent on the contrastive loss of forget pairs (unbounded below)."""
    return -contrastive(img_emb, txt_emb, logit_scale)


def contrastive(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with CLIP's logit scale; pair i is (image i, caption i)."""
    logits = logit_scale * F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def retention(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Retention module: the CLIP contrastive loss on retain pairs."""
    return contrastive(img_emb, txt_emb, logit_scale)


def consistency(img_emb: torch.Tensor, txt_emb: torch.Tensor, ref_img_emb: torch.Tensor, ref_txt_emb: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """Consistency module: KL(original ‖ unlearned) of the image→text and text→image distributions on retain data."""
    logits = logit_scale * F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T
    ref = logit_scale * F.normalize(ref_img_emb, dim=-1) @ F.normalize(ref_txt_emb, dim=-1).T
    kl_i2t = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
    kl_t2i = F.kl_div(F.log_softmax(logits.T, -1), F.log_softmax(ref.T, -1), log_target=True, reduction="batchmean")
    return kl_i2t + kl_t2i


def token_forgetting(states: torch.Tensor, anchor_states: torch.Tensor) -> torch.Tensor:
    """Per-token hidden states of prompts naming the concept → those of the anchor prompts (original model)."""
    return F.mse_loss(states, anchor_states)


def token_consistency(states: torch.Tensor, ref_states: torch.Tensor) -> torch.Tensor:
    """Per-token hidden states of retain prompts stay those of the original model."""
    return F.mse_loss(states, ref_states)


@dataclass
class LossWeights:
    """Paper weights: retention 1, forgetting 3, consistency 3. The token terms are this project's addition."""

    forget: float = 3.0
    retain: float = 1.0
    consistency: float = 3.0
    token_forget: float = 1.0
    token_consistency: float = 10.0
