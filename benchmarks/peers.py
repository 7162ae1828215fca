"""UNet-side peer baselines on the miniature world, for the benchmark table (benchmark code, not product API).

- ``esd_x``: ESD-x (Gandikota et al., ICCV'23): fine-tune the UNet cross-attention (attn2: to_q/to_k/to_v/to_out) so
  that ε_θ'(x_t, c) → ε_θ(x_t) − η (ε_θ(x_t, c) − ε_θ(x_t)), negative guidance η = 1. Simplification for a CPU budget:
  x_t comes from noising VAE latents of rendered held-out images of the concept (the paper samples x_t with the
  model being trained); a few hundred steps, stopped at ``time_budget_s``.
- ``uce``: UCE (Gandikota et al., WACV'24): closed-form edit of every attn2 to_k / to_v,
      W' = (Σ W a cᵀ + λ Σ_p W k kᵀ + W)(Σ c cᵀ + λ Σ_p k kᵀ + I)⁻¹,
  with concept keys c = the text encoder's token states of concept prompts from the concept word on (the causal
  encoder's states before it do not carry the concept), a = the same positions of the anchor prompt ("shape" in place
  of the concept), and preserved keys k = all token states of prompts of the other classes.

Both return a new pipeline sharing every module but the UNet with the input pipeline. Their defaults (ESD-x: captions,
lr 3e-5, 500 steps; UCE: λ = 100) were chosen by ``bench_peer_tuning.py``, by the rule our own defaults meet
(``results/peer_tuning.json``).
"""

from __future__ import annotations

import copy
import random
import time

import torch
import torch.nn.functional as F

from erase_diffusion.attacks import tokenize
from erase_diffusion.measure import eval_prompts
from erase_diffusion.miniworld import domain


def concept_prompts(concept: str, n: int = 32, seed: int = 3) -> list[str]:
    """Prompts naming ``concept`` by its own name (no paraphrases: the peers erase the name they are given)."""
    cases = eval_prompts(shapes=(concept,), per_pair=max(1, n // len(domain.COLOURS)), seed=seed)
    return [c.prompt for c in cases][:n]


def preserve_prompts(concept: str, per_pair: int = 1, seed: int = 4) -> list[str]:
    return [c.prompt for c in eval_prompts(per_pair=per_pair, seed=seed) if c.shape != concept]


def _with_unet(pipe, unet):
    new = copy.copy(pipe)  # shallow: shares VAE, text encoder, tokenizer, scheduler config
    new.register_modules(unet=unet)
    new.scheduler = copy.deepcopy(pipe.scheduler)
    return new


def cross_attention_params(unet) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if ".attn2." in n}


@torch.no_grad()
def _concept_latents(pipe, concept: str, n: int = 64, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    ims = torch.stack([domain.to_tensor(domain.render(domain.random_scene(rng, shape=concept))) for _ in range(n)])
    lat = pipe.vae.encode(ims).latent_dist.sample(torch.Generator().manual_seed(seed))
    return lat * pipe.vae.config.scaling_factor


def esd_x(pipe, concept: str = "circle", *, steps: int = 500, lr: float = 3e-5, eta: float = 1.0, batch: int = 4,
          train_on: str = "captions", time_budget_s: float = 180.0, seed: int = 0, progress: bool = True):
    """ESD-x on a copy of ``pipe.unet``. Returns (erased pipeline, stats). ``train_on``: "word" conditions on the
    concept's name alone, as the paper does ("Van Gogh"); "captions" on captions naming it with a colour and a style,
    whose negative guidance also pushes away from the colour and style they name."""
    if train_on not in ("word", "captions"):
        raise ValueError(f"train_on must be 'word' or 'captions', got {train_on!r}")
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    frozen = pipe.unet.eval()
    unet = copy.deepcopy(frozen).train()
    for p in unet.parameters():
        p.requires_grad_(False)
    trainable = cross_attention_params(unet)
    for p in trainable.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable.values(), lr=lr)
    prompts = concept_prompts(concept) if train_on == "captions" else [concept]
    with torch.no_grad():
        cond = pipe.text_encoder(tokenize(pipe.tokenizer, prompts))[0]
        uncond = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]
    x0 = _concept_latents(pipe, concept)
    sched = pipe.scheduler
    T = sched.config.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    losses, done = [], 0
    bar = tqdm(range(steps), desc="ESD-x", disable=not progress)
    for _ in bar:
        i = torch.randint(0, len(prompts), (batch,), generator=g)
        j = torch.randint(0, len(x0), (batch,), generator=g)
        t = torch.randint(0, T, (batch,), generator=g)
        noise = torch.randn(batch, *x0.shape[1:], generator=g)
        x_t = sched.add_noise(x0[j], noise, t)
        c = cond[i]
        with torch.no_grad():
            e_c = frozen(x_t, t, encoder_hidden_states=c).sample
            e_u = frozen(x_t, t, encoder_hidden_states=uncond.expand(batch, -1, -1)).sample
            target = e_u - eta * (e_c - e_u)
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=c).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        done += 1
        if time.perf_counter() - t0 > time_budget_s:
            break
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    stats = {"steps": done, "requested_steps": steps, "lr": lr, "eta": eta, "batch": batch, "train_on": train_on,
             "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
             "seconds": time.perf_counter() - t0,
             "artifact_bytes": sum(p.numel() * p.element_size() for p in trainable.values()),
             "stopped_by_budget": done < steps}
    return _with_unet(pipe, unet), stats


@torch.no_grad()
def uce(pipe, concept: str = "circle", *, anchor: str = "shape", preserve_scale: float = 100.0, seed: int = 0):
    """UCE closed-form edit of every attn2 to_k/to_v on a copy of ``pipe.unet``. Returns (erased pipeline, stats)."""
    from erase_diffusion.attacks import replace_word

    t0 = time.perf_counter()
    tok, te = pipe.tokenizer, pipe.text_encoder
    prompts = concept_prompts(concept)
    anchors = [replace_word(p, concept, anchor) for p in prompts]
    ids_c, ids_a = tokenize(tok, prompts), tokenize(tok, anchors)
    word = tok(concept, add_special_tokens=False).input_ids
    if len(word) != 1 or len(tok(anchor, add_special_tokens=False).input_ids) != 1:
        raise ValueError("this UCE reimplementation aligns tokens one-to-one: concept and anchor must be one token")
    h_c, h_a = te(ids_c)[0], te(ids_a)[0]
    C, A = [], []
    for r in range(len(prompts)):
        pos = (ids_c[r] == word[0]).nonzero()[0, 0].item()
        C.append(h_c[r, pos:])
        A.append(h_a[r, pos:])
    C, A = torch.cat(C).double(), torch.cat(A).double()  # (n, d)
    K = te(tokenize(tok, preserve_prompts(concept)))[0].reshape(-1, C.shape[1]).double()
    unet = copy.deepcopy(pipe.unet)
    d = C.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    mat2 = C.T @ C + preserve_scale * K.T @ K + eye
    inv = torch.linalg.inv(mat2)
    edited, changed = 0, []
    for name, mod in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        for proj in (mod.to_k, mod.to_v):
            W = proj.weight.double()
            mat1 = (W @ A.T) @ C + preserve_scale * (W @ K.T) @ K + W
            new = mat1 @ inv
            changed.append(((new - W).norm() / W.norm()).item())
            proj.weight.copy_(new.to(proj.weight.dtype))
            edited += 1
    stats = {"edited_layers": edited, "concept_keys": len(C), "preserve_keys": len(K), "preserve_scale": preserve_scale,
             "mean_relative_change": sum(changed) / max(1, len(changed)), "seconds": time.perf_counter() - t0,
             "artifact_bytes": sum(m.to_k.weight.numel() * 4 + m.to_v.weight.numel() * 4
                                   for n, m in unet.named_modules() if n.endswith("attn2"))}
    return _with_unet(pipe, unet), stats
