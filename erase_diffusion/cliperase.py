"""The CLIPErase objective (Yang et al., ACL 2025), one function per module, plus the token-level terms Stable
Diffusion needs.

CLIP's losses act on the pooled, projected embedding; Stable Diffusion reads the per-token hidden states. The
``token_*`` terms act on those states: ``token_forgetting`` pulls prompts naming the concept toward the same prompt
with an anchor concept, ``token_consistency`` keeps retain prompts' states equal to the original model's.
benchmarks/bench_cliperase.py measures what each term buys. ``EraseObjective`` is the whole objective on the
trainable CLIPs (one ``TextTower`` per text encoder), as ``training.train`` optimises it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from .attacks import PLACEHOLDER, learned_token
from .measure import features

# the token terms run every TOKEN_SUBSAMPLE-th prompt of a batch at the later (padding) positions too
TOKEN_SUBSAMPLE = 8
# adversarial CLIPErase: per step, ADV_PROMPTS of the batch's forget prompts are attacked by one member of a pool of
# learned input embeddings, each warm-started from where it last was (so an attack accumulates many steps over
# training). The members take the suite's attack forms (robustness.SUITE): (tokens, placement) per member; one
# form only (1 token in place of the word) left the 4-token attack at 53 % ASR and the 2-token suffix at 34 %.
# The inner loop takes sign-gradient steps of ADV_STEP per coordinate (the evaluation attack's Adam learning rate).
# Each form has ADV_RESTARTS members from different random starts, visited in turn: the evaluation's random restarts,
# not its step count, were what broke a one-member pool (4-token attack, circle: 150 steps × 4 restarts 23 % ASR,
# 300 steps × 1 restart 2 %).
ADV_PROMPTS = 8
ADV_FORMS = ((1, "replace"), (4, "replace"), (2, "suffix"), (2, "replace"))
ADV_RESTARTS = 4
ADV_TOKENS = max(k for k, _ in ADV_FORMS)
ADV_STEP = 5e-2


def forgetting_dot(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Forgetting module, reading A: mean cosine of matched forget pairs (bounded below by −1)."""
    return (F.normalize(img_emb, dim=-1) * F.normalize(txt_emb, dim=-1)).sum(-1).mean()


def forgetting_anchored(img_emb: torch.Tensor, txt_emb: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Forgetting module, reading C (the pipeline default): the forget pairs' cosine pushed down only as far as
    ``floor``, the original model's cosine of each image with its caption's anchored version ("a solid red circle"
    → "a striped red circle"). Reading A pushes on toward −1, away from everything the image shows, and the pipeline
    then lost the prompt's other attributes (solid erased: colour kept 44 % of prompts, base 91 %, n = 32)."""
    cos = (F.normalize(img_emb, dim=-1) * F.normalize(txt_emb, dim=-1)).sum(-1)
    return F.relu(cos - floor).mean()


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
    """The weight of each term (0 switches it off); the defaults are ``CLIPEraseConfig``'s (``of``)."""

    forget: float
    retain: float
    consistency: float
    token_forget: float
    token_consistency: float
    adversarial: float = 0.0

    @classmethod
    def of(cls, config) -> "LossWeights":
        return cls(config.forget_weight, config.retain_weight, config.consistency_weight, config.token_forget_weight,
                   config.token_consistency_weight, config.adversarial_weight)


# ---------------------------------------------------------------------------------------------------------------------
# the objective on the models: one TextTower per text encoder, the trainable CLIPs, the original model's outputs


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
    forget_floor: torch.Tensor | None = None  # the original's cosine of each forget image with its anchored caption
    retain_img: torch.Tensor | None = None
    retain_txt: torch.Tensor | None = None  # the original's pooled embeddings of every retain caption (consistency)
    targets: dict | None = None  # the original's read states of the anchor / retain prompts: {set: (states, pooled)}
    fit: int = 77  # token positions every prompt of the token terms runs at (the rest: a subsample, TOKEN_SUBSAMPLE)
    attack_token: int | None = None  # adversarial CLIPErase: the placeholder token the attack embeddings replace
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


def initial_attacks(table: torch.Tensor, seed: int) -> torch.Tensor:
    """Adversarial CLIPErase's attack embeddings at the start, (restarts × forms, ``ADV_TOKENS``, D): random rows of
    the token-embedding table, where textual inversion and concept inversion start. Gaussian points around the
    table's mean (the previous start) lie off the vocabulary; their pool left a hole that an attack from elsewhere
    found (circle, one training seed of three: 4-token attack 37.5 % ASR, 0.0 % with vocabulary starts, n = 64)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(table.shape[0], (ADV_RESTARTS * len(ADV_FORMS), ADV_TOKENS), generator=g)
    return table.detach()[rows].float().cpu()  # a copy of 64 rows, not the table; prepare() moves it to the device


def attack_form(attacked: str, prompt: str, n_tokens: int, placement: str) -> str:
    """The prompt an attack form reads: ``attacked`` (the concept's words as one placeholder) with ``n_tokens``
    placeholders in their place, or ``prompt`` with them appended (the words kept)."""
    tokens = " ".join([PLACEHOLDER] * n_tokens)
    return attacked.replace(PLACEHOLDER, tokens) if placement == "replace" else f"{prompt} {tokens}"


class EraseObjective(torch.nn.Module):
    """The trainable CLIPs (one per text encoder) and the whole objective in ``forward``.

    The loss is computed inside ``forward`` so that Accelerate's DDP wrapper sees one forward per backward and
    all-reduces the gradients; calling the unwrapped model would silently train each replica on its own.
    The original model's outputs come from ``original`` (no gradients), so nothing frozen is wrapped or checkpointed.
    """

    def __init__(self, students: dict, towers: list[TextTower], weights: LossWeights, forget_loss: str,
                 train_vision: bool = False, attack_steps: int = 0, seed: int = 0):
        super().__init__()
        self.students = torch.nn.ModuleDict(students)
        self.towers, self.weights, self.forget_loss, self.train_vision = towers, weights, forget_loss, train_vision
        self.attack_steps = attack_steps
        if weights.adversarial:  # the attack embeddings are state (buffers), so a checkpoint resumes them exactly
            for tower in towers:
                table = students[tower.name].text_model.embeddings.token_embedding.weight
                self.register_buffer(f"attacks_{tower.name}", initial_attacks(table, seed))
            self.register_buffer("attack_round", torch.zeros((), dtype=torch.long))

    def forward(self, batch: dict):
        total, terms = 0.0, {}
        for tower in self.towers:
            loss, parts = self.tower_loss(self.students[tower.name], tower, batch)
            total = total + loss
            prefix = "" if len(self.towers) == 1 else f"{tower.name}/"
            terms.update({prefix + k: v.detach() for k, v in parts.items()})
        if self.weights.adversarial:
            self.attack_round += 1
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
            if self.forget_loss == "anchored":
                terms["forget"] = forgetting_anchored(f_img, f_txt, tower.forget_floor[batch["fi"]])
            elif self.forget_loss == "dot":
                terms["forget"] = forgetting_dot(f_img, f_txt)
            else:
                terms["forget"] = forgetting_neg_contrastive(f_img, f_txt, scale)
        if w.retain or w.consistency:
            r_img = self.image_side(student, tower, "retain", batch["ri"])
            r_txt = encode_pooled(student, tok, batch["retain_captions"], device)
            if w.retain:
                terms["retain"] = retention(r_img, r_txt, scale)
            if w.consistency:
                ref_txt = tower.retain_txt[batch["ri"]]
                terms["consistency"] = consistency(r_img, r_txt, tower.retain_img[batch["ri"]], ref_txt, scale)
        for name, prompts, idx, targets in (("token_forget", "forget_prompts", "pi", "anchor"),
                                            ("token_consistency", "retain_prompts", "qi", "retain")):
            if getattr(w, name):
                term = token_forgetting if name == "token_forget" else token_consistency
                terms[name] = self.token_term(student, tower, term, batch[prompts], batch[idx], *tower.targets[targets])
        if w.adversarial:
            terms["adversarial"] = self.adversarial_term(student, tower, batch)
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

    def adversarial_term(self, student, tower: TextTower, batch: dict) -> torch.Tensor:
        """Adversarial CLIPErase (in the spirit of AdvUnlearn): the inner loop moves one attack of the pool (its
        members in turn: every form of ``ADV_FORMS``, ``ADV_RESTARTS`` times) so that the student's states for the
        attacked forget prompts match the original's states for the concept prompts (the evaluation's encoder
        objective, ``attacks.soft_prompt_attack``); the term then sends those attacked prompts' states to the anchor
        prompts' original states, as ``token_forget`` does for the words."""
        idx = batch["pi"][:ADV_PROMPTS]
        pool = getattr(self, f"attacks_{tower.name}")
        member = int(self.attack_round) % len(pool)
        n_tokens, placement = ADV_FORMS[member % len(ADV_FORMS)]
        prompts = [attack_form(a, p, n_tokens, placement) for a, p in
                   zip(batch["attacked_prompts"][:ADV_PROMPTS], batch["forget_prompts"][:ADV_PROMPTS])]
        table = student.text_model.embeddings.token_embedding
        v = pool[member, :n_tokens].clone().requires_grad_(True)
        target = tower.targets["forget"][0][idx, : tower.fit]
        for _ in range(self.attack_steps):
            with learned_token(table, tower.attack_token, v):
                states, _ = encode_read(student, tower.tokenizer, prompts, idx.device, tower.layer, length=tower.fit)
            (grad,) = torch.autograd.grad(F.mse_loss(states, target), v)
            v = (v - ADV_STEP * grad.sign()).detach().requires_grad_(True)
        pool[member, :n_tokens] = v.detach()
        with learned_token(table, tower.attack_token, v.detach()):
            return self.token_term(student, tower, token_forgetting, prompts, idx, *tower.targets["anchor"])


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

