"""Data-free, closed-form concept erasure: concept names in, a small LoRA patch out; no images, no gradient steps.

Two targets, one idea (``reference/methods.md`` §2):

``target="clip"`` (zero-shot classification / retrieval)
    The image-side edit of *Erasing CLIP Memories* (arXiv 2512.14137) with the retain protection of methods.md §2.4
    variant (b): forget-class text embeddings T_f (template ensemble, one column per name and paraphrase), retained
    ones T_r, S = T_f T_fᵀ + λ T_r T_rᵀ + μ I, and ``visual_projection`` ← (I − α S⁻¹ T_f T_fᵀ) W. An image feature's
    logit against t becomes ⟨z, M t⟩ with M = I − T_f T_fᵀ S⁻¹: ≈ 0 for the forget classes, ≈ unchanged for the
    retained ones (λ = 10 per retained embedding, μ = 1e-3). Variant (a) (orthogonalise T_f against span(T_r),
    then project) was measured and dropped: in the miniature world's 64-d CLIP all but 7 % of the circle embedding's
    norm lies in the span of the other shapes' embeddings, so the exact version removed nothing (held-out zero-shot
    circle accuracy 98.6 % → 98.6 % at α = 1). Variant (b): 99.3 % → 0 %, retained mean 95.2 % → 97.0 %, largest
    per-class drop 1.4 points (1152 images).
    Shipped as the SVD factors of ΔW = −α S⁻¹ T_f T_fᵀ W (rank = number of forget words) on component ``"clip"``.

``target="pipeline"`` (Stable Diffusion reads the 77 per-token hidden states, not the projection)
    A regularised least-squares edit (UCE-style, methods.md §2.4 variant (b) carried to §2.6) of one MLP ``fc2``
    inside the text encoder: the last layer for SD 1.x/2.x, the layer SDXL reads (the penultimate one) for both SDXL
    encoders. With K the fc2 inputs (one column per token position, all 77 positions of each prompt):

        K_c  concept prompts (frames × the concept and its paraphrases)
        R    wanted change of the read hidden state at those tokens (zero before the concept word)
        K_p  softly protected concepts' prompts (``protect``: a spread subset of the frames × each word)
        Q    orthonormal basis of the exactly protected prompts' span (``protect_prompts``), P = I − Q Qᵀ

        ΔW = R (P K_c)ᵀ (P K_c K_cᵀ P + λ_p P K_p K_pᵀ P + μ I)⁻¹        (one Cholesky solve, fc2-input width)

    (rows of P K: the system is block-diagonal on range(P) ⊕ range(Q), so ΔW Q = 0 up to round-off, then exactly).

    * **Soft protection** of whole concepts (λ_p = ``protect_weight`` per token relative to a concept token; default
      10): the other shapes' prompts stay close, not equal. Exact protection of whole concepts is impossible at these
      widths: every prompt brings ~77 independent token positions (padding included), so the span of one concept's
      prompts fills the fc2 input (512 in the miniature world, 3072 in CLIP-L) and contains the erased concept's
      activations too. Default on the miniature world: the erased attribute's other classes.
    * **Exact protection** of a few specific prompts (``protect_prompts``): ΔW Q = 0, so their text-encoder output
      equals the base model's (checked numerically, ≤ 1e-4). They take ~77 dimensions each; more than
      ``PROTECT_BUDGET`` of the width is refused with the number of prompts that fit (~3 in the miniature world's
      512 with the 50 % budget, ~20 in CLIP-L). Default on the miniature world: ``MINIWORLD_PROTECT_PROMPTS``.
      The empty prompt is always among them (``protect_empty``): classifier-free guidance reads its conditioning at
      every step of every generation, so a change there is a change to every image (an encoder too narrow for its
      span keeps it in the least-squares sense, with a warning).
    * ``depth`` > 1 spreads the edit over the read layer and the ``depth - 1`` layers below it (``encoder_edits``,
      EMCID-style: each layer takes 1 / (layers left) of the remaining way, fitted with the earlier ones applied).
      Measured on the miniature world it did not help (red / star / striped found rates not lower, striped's
      higher), so the default is 1.
    * μ = ``ridge`` (1e-2) × the mean eigenvalue of P K_c K_cᵀ P keeps the system well conditioned.

    R is either ``mode="anchor"`` (default): the read state of the token-aligned prompt with the anchor word in place
    of the concept, minus the concept prompt's state (anchor "object" in the miniature world, chosen by judged
    generations: "shape" left circles in 16 % of named prompts, since the captions' paraphrases, "round shape", tie
    "shape" to circles; "" left 6-9 %; "object" 3 %; another class such as "square" 0 %, but draws that class), or
    ``mode="project"``: minus the component of the state along
    the concept's own subspace (relative to the protected words' mean). Because the edited layer's output *is* the
    read state (plus a residual connection), the change is linear in ΔW: strength α gives exactly α of the way.
    ΔW ships as LoRA factors of its numerical rank (or ``rank``), plus a zero-factor entry on the same layer's
    ``self_attn.out_proj`` because diffusers refuses text-encoder LoRA files without an attention projection
    (ecosystem.md §2.3).

    Cost: encoder passes dominate (about 700 prompts on the miniature world, 72 for the generic templates), then one
    Cholesky factorisation at the fc2-input width. The encoder is causal, so every prompt runs on its first
    ``fit_length`` = 24 positions only (words, end token, first padding: exact states), and every ``full_every`` = 8th
    prompt also on all 77, its later padding positions weighted by 8 in the least squares. Soft protection uses a
    seeded subset of ``protect_frames`` = 32 frames per protected word.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .patch import LoraFactors, clip_core, factors_from_delta, fingerprint, save_patch

# Generic prompt templates for real models; the miniature world uses its own caption templates and fillers.
GENERIC_TEMPLATES = (
    "{}",
    "a photo of a {}",
    "a painting of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
    "a close-up photo of a {}",
    "a photo of the {}",
    "a rendering of a {}",
    "a sketch of a {}",
    "a good photo of a {}",
    "a bright photo of a {}",
)
MINIWORLD_ANCHOR = "object"
GENERIC_ANCHOR = ""
# prompts whose conditioning is kept exactly when nothing else is asked, on the miniature world
MINIWORLD_PROTECT_PROMPTS = ("a red square", "a blue triangle")
# a concept whose target needs more than this fraction of the hidden width (90 % of the energy) is refused
MAX_RANK_FRACTION = 0.75
MAX_CLIP_RANK_FRACTION = 0.25
# CLIP target: λ per retained class embedding relative to a forget one, μ, and the largest share of the forget
# embeddings the edit may leave before it is refused
CLIP_RETAIN_WEIGHT = 10.0
CLIP_RIDGE = 1e-3
MAX_CLIP_FORGET_LEFT = 0.5
# the exactly protected prompts' span leaves less than this fraction of the concept's activation energy
MIN_FREE_ENERGY = 1e-7
# at most this fraction of the fc2 input width may be taken by the exactly protected prompts (~77 dims each)
PROTECT_BUDGET = 0.5
# λ_p per protected token relative to a concept token, and μ relative to the concept Gram's mean eigenvalue
PROTECT_WEIGHT = 10.0
RIDGE = 1e-2
# keep the empty prompt's conditioning exactly (classifier-free guidance's unconditional branch)
PROTECT_EMPTY = True
# fc2 layers edited (the read layer and those below it): spreading the edit over 2 or 4 of the miniature world's 4
# layers did not lower the found rates of red / star / striped and raised striped's (benchmarks/bench_concepts.py)
DEPTH = 1
# frames per softly protected word (a spread subset of the prompt frames; encoder passes dominate the cost)
PROTECT_FRAMES = 32
# token positions the least squares is fitted on (at least the longest prompt + its end token); 77 = all
FIT_LENGTH = 24
# every this-many-th prompt also runs at all 77 positions (its later padding positions weighted by this number)
FULL_EVERY = 8


# ----------------------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptSet:
    """Prompts are (before, after) pairs around a word slot: prompt = before + word + after.

    ``miniworld``: the domain's caption templates × colours × styles; otherwise ``templates`` ("{}" is the slot)."""

    templates: tuple[str, ...] = GENERIC_TEMPLATES
    miniworld: bool = False

    def frames(self) -> list[tuple[str, str]]:
        if not self.miniworld:
            out = []
            for t in self.templates:
                if t.count("{}") != 1:
                    raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}' slot")
                before, after = t.split("{}")
                out.append((before, after))
            return out
        from .miniworld.domain import COLOURS, STYLE_WORDS, TEMPLATES, with_articles

        # every template with every colour, the style rotating (a Latin design: 48 frames instead of all 112)
        styles = list(STYLE_WORDS.values())
        seen, out = set(), []
        for i, t in enumerate(TEMPLATES):
            for j, colour in enumerate(COLOURS):
                text = with_articles(t.format(style=styles[(i + j) % len(styles)], colour=colour, shape="\0"))
                if text not in seen:
                    seen.add(text)
                    before, after = text.split("\0")
                    out.append((before, after))
        return out


def is_miniworld(model: str) -> bool:
    from .models import BUNDLED, MINIWORLD_DIR

    if model in BUNDLED:
        return True
    try:
        return Path(model).expanduser().resolve().is_relative_to(MINIWORLD_DIR.resolve())
    except OSError:
        return False


def default_synonyms(concepts: list[str], miniworld: bool) -> dict[str, tuple[str, ...]]:
    if not miniworld:
        return {}
    from .miniworld.domain import SYNONYMS

    return {c: tuple(SYNONYMS.get(c, ())) for c in concepts}


def _validate(concepts, protect, synonyms):
    concepts = [str(c).strip() for c in concepts]
    protect = [str(p).strip() for p in (protect or [])]
    if not concepts:
        raise ValueError("no concept given: name at least one concept to erase")
    if any(not c for c in concepts):
        raise ValueError("empty concept name: every concept must be a non-empty word or phrase")
    if any(not p for p in protect):
        raise ValueError("empty protected concept name")
    both = sorted({c.lower() for c in concepts} & {p.lower() for p in protect})
    if both:
        raise ValueError(f"concept(s) {both} are both erased and protected; remove them from --protect")
    words = {c.lower() for c in concepts} | {w.lower() for c in concepts for w in synonyms.get(c, ())}
    clash = sorted(words & {p.lower() for p in protect})
    if clash:
        raise ValueError(f"protected concept(s) {clash} are paraphrases of an erased concept")
    return concepts, protect


# ----------------------------------------------------------------------------------------------- text-encoder probes
def _tokenize(tokenizer, texts: list[str], length: int | None = None) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else 0


class _Stop(Exception):
    """Raised by a forward hook to end an encoder pass once the layer of interest has run."""


@torch.no_grad()
def _run_encoder(text_encoder, input_ids: torch.Tensor, layer: int, batch: int = 256):
    """(fc2 inputs of ``layer``, read hidden states after ``layer``) for every token: (N, T, inter), (N, T, hidden).

    The read state is the residual stream right after ``layer`` (before any final LayerNorm). The pass stops there:
    the layers above are not needed."""
    block = clip_core(text_encoder).encoder.layers[layer]
    keys, reads, grab = [], [], {}

    def stop(module, inp, out):
        grab["h"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    handles = [block.mlp.fc2.register_forward_hook(lambda m, inp, out: grab.__setitem__("k", inp[0])),
               block.register_forward_hook(stop)]
    try:
        for i in range(0, len(input_ids), batch):
            try:
                text_encoder(input_ids[i : i + batch].to(text_encoder.device))
            except _Stop:
                pass
            keys.append(grab["k"].float().cpu())
            reads.append(grab["h"].float().cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(keys), torch.cat(reads)


def read_layer_index(text_encoder, penultimate: bool) -> int:
    n = text_encoder.config.num_hidden_layers
    return n - 2 if penultimate else n - 1


@torch.no_grad()
def conditioning(text_encoder, tokenizer, prompts: list[str], penultimate: bool = False) -> torch.Tensor:
    """The token states a pipeline reads: last layer + final LayerNorm (SD 1.x/2.x) or the penultimate layer (SDXL)."""
    out = text_encoder(_tokenize(tokenizer, prompts).to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2] if penultimate else out.last_hidden_state


def _aligned_positions(s: int, n: int, m: int, length: int) -> list[int]:
    """Map each position of the concept prompt (concept word at [s, s+n)) to the anchor prompt (anchor at [s, s+m))."""
    pos = []
    for t in range(length):
        if t < s:
            pos.append(t)
        elif t < s + n:
            pos.append(s + max(0, m - n + (t - s)) if m else s)
        else:
            pos.append(t + m - n)
    return [min(max(p, 0), length - 1) for p in pos]


@dataclass
class EncoderEdit:
    """One fc2 edit of one text encoder, plus what was measured while building it."""

    layer: int
    delta: torch.Tensor  # (out, in), already scaled by the strength
    stats: dict = field(default_factory=dict)


def _orth_basis(K: torch.Tensor, rtol: float) -> torch.Tensor:
    """Orthonormal basis (d, k) of the column span of K (d, N), float64: singular values above rtol · σ_max."""
    d, n = K.shape
    if n == 0:
        return torch.zeros(d, 0, dtype=torch.float64)
    if 2 * n <= d:  # few columns: a thin SVD is cheap and the most accurate
        U, S, _ = torch.linalg.svd(K.double(), full_matrices=False)
    else:  # d × d Gram eigenproblem
        evals, U = torch.linalg.eigh(K.double() @ K.double().T)
        order = evals.argsort(descending=True)
        S, U = evals[order].clamp_min(0).sqrt(), U[:, order]
    if S[0] == 0:
        return torch.zeros(d, 0, dtype=torch.float64)
    return U[:, : int((S > rtol * S[0]).sum())]


def _fill(frames, words, tokenizer, length):
    """(before, word, after, start of the word, its token count) for every frame × word that fits ``length``."""
    out = []
    for word in words:
        n = _n_tokens(tokenizer, word)
        if n == 0:
            raise ValueError(f"concept {word!r} tokenizes to nothing")
        for before, after in frames:
            s = 1 + _n_tokens(tokenizer, before)
            if s + n + _n_tokens(tokenizer, after) + 1 <= length:
                out.append((before, word, after, s, n))
    return out


def _names(prompt: str, word: str) -> bool:
    return f" {word.lower()} " in f" {prompt.lower().replace(',', ' ').replace('.', ' ')} "


def encoder_edit(
    text_encoder,
    tokenizer,
    concepts: list[str],
    protect: list[str],
    *,
    protect_prompts: list[str] = (),
    synonyms: dict | None = None,
    prompts: PromptSet = PromptSet(),
    anchor: str | None = GENERIC_ANCHOR,
    mode: str = "anchor",
    strength: float = 1.0,
    penultimate: bool = False,
    protect_weight: float = PROTECT_WEIGHT,
    ridge: float = RIDGE,
    protect_budget: float = PROTECT_BUDGET,
    protect_frames: int = PROTECT_FRAMES,
    fit_length: int = FIT_LENGTH,
    full_every: int = FULL_EVERY,
    protect_rtol: float = 1e-6,
    protect_empty: bool = PROTECT_EMPTY,
    layer: int | None = None,
    share: float = 1.0,
    original=nullcontext,
) -> EncoderEdit:
    """Closed-form ΔW for one fc2 of one text encoder (see the module docstring): ``layer`` (default: the read
    layer) moves ``share`` of the remaining way from the concept prompts' states at its output to the anchor prompts'
    states in the ``original`` encoder (a context in which earlier layers' edits are undone; see ``encoder_edits``)."""
    if mode not in ("anchor", "project"):
        raise ValueError(f"mode must be 'anchor' or 'project', not {mode!r}")
    t0 = time.perf_counter()
    synonyms = synonyms or {}
    layer = read_layer_index(text_encoder, penultimate) if layer is None else layer
    frames = prompts.frames()
    length = tokenizer.model_max_length
    anchor_word = anchor if anchor is not None else GENERIC_ANCHOR
    m = _n_tokens(tokenizer, anchor_word)

    words = [w for c in concepts for w in (c, *synonyms.get(c, ()))]
    named = sorted({w for w in words for p in protect_prompts if _names(p, w)})
    if named:
        raise ValueError(f"a protected prompt names an erased concept or its paraphrase ({', '.join(named)}); "
                         "it cannot both keep its conditioning and lose the concept")
    filled = _fill(frames, words, tokenizer, length)
    if not filled:
        raise ValueError("every concept prompt is longer than the tokenizer's maximum length")
    # softly protected concepts: a spread subset of the frames is enough to estimate their activations' covariance
    pick = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))[:protect_frames].sort().values
    p_frames = [frames[i] for i in pick.tolist()]
    p_filled = _fill(p_frames, [w for p in protect for w in (p, *synonyms.get(p, ()))], tokenizer, length)

    # Encoder passes dominate the cost. The encoder is causal, so a pass over the first `fit` positions gives exactly
    # those positions' states: every prompt runs at `fit` positions (words, end token, first padding), and every
    # `full_every`-th prompt also at all 77, whose later (padding) positions enter with weight `full_every`.
    c_text = [b + w + a for b, w, a, _, _ in filled]
    a_of = [(b + anchor_word + a) if anchor_word else (b.rstrip() + a) for b, _, a, _, _ in filled]
    p_text = [b + w + a for b, w, a, _, _ in p_filled]
    c_pos = [(s, n) for _, _, _, s, n in filled]
    longest = max(len(ids) for ids in tokenizer(c_text + a_of + p_text).input_ids)
    fit = min(length, max(fit_length, longest + 1))
    proj = {}  # mode "project": the concept subspace and centre, from the first pass

    def rows(ci: list[int], pi: list[int], L: int, start: int):
        """Concept keys, targets and bearing flags, and protected keys, at positions [start, L) of prompts ci / pi."""
        a_text = list(dict.fromkeys(a_of[i] for i in ci)) if mode == "anchor" else []
        texts = [c_text[i] for i in ci] + [p_text[i] for i in pi]
        K, H = _run_encoder(text_encoder, _tokenize(tokenizer, texts, L), layer)
        if a_text:
            with original():  # the anchor's states in the unedited encoder: the target of every layer
                H_a = _run_encoder(text_encoder, _tokenize(tokenizer, a_text, L), layer)[1]
        if not torch.isfinite(K).all() or not torch.isfinite(H).all() or (a_text and not torch.isfinite(H_a).all()):
            raise ValueError("the text encoder returns NaN/inf activations (degenerate weights?)")
        nc = len(ci)
        K_c, H_c, K_p, H_p = K[:nc], H[:nc], K[nc:], H[nc:]
        pos = [c_pos[i] for i in ci]
        mask = torch.zeros(K_c.shape[:2], dtype=torch.bool)  # concept-bearing positions: the word and after
        for j, (s, _) in enumerate(pos):
            mask[j, s:] = True
        if mode == "anchor":  # the anchor prompt's state at the aligned position, minus the concept prompt's
            row = {t: j for j, t in enumerate(a_text)}
            which = torch.tensor([row[a_of[i]] for i in ci])
            idx = torch.tensor([_aligned_positions(s, n, m, L) for s, n in pos])
            R = torch.gather(H_a[which], 1, idx[..., None].expand(-1, -1, H_a.shape[-1])) - H_c
        else:  # project: remove the concept words' distinctive subspace from the bearing tokens
            if not proj:
                words = torch.stack([H_c[j, s : s + n].mean(0) for j, (s, n) in enumerate(pos)])
                if pi:
                    proj["centre"] = torch.stack([H_p[j, s : s + n].mean(0) for j, (_, _, _, s, n) in
                                                  enumerate(p_filled[i] for i in pi)]).mean(0)
                else:
                    proj["centre"] = H_c[mask].mean(0)
                U, S, _ = torch.linalg.svd((words - proj["centre"]).T.double(), full_matrices=False)
                energy = (S**2).cumsum(0) / (S**2).sum()
                proj["U"] = U[:, : int((energy < 0.9).sum()) + 1].float()
            R = -((H_c - proj["centre"]) @ proj["U"] @ proj["U"].T)
        R = share * R * mask[..., None]
        flat = lambda X: X[:, start:].reshape(-1, X.shape[-1])  # noqa: E731
        return flat(K_c), flat(R), mask[:, start:].reshape(-1), flat(K_p)

    Kc, Rm, bearing, Kp = rows(list(range(len(c_text))), list(range(len(p_text))), fit, 0)
    if fit < length:
        ci, pi = list(range(0, len(c_text), full_every)), list(range(0, len(p_text), full_every))
        late = [x * full_every**0.5 if x.dtype != torch.bool else x for x in rows(ci, pi, length, fit)]
        Kc, Rm, bearing, Kp = (torch.cat([x, y]) for x, y in zip((Kc, Rm, bearing, Kp), late))
    d_in = Kc.shape[-1]
    # the empty prompt is always kept exactly: classifier-free guidance reads it at every step of every generation
    exact = ([""] if protect_empty else []) + list(protect_prompts)
    K_x = _run_encoder(text_encoder, _tokenize(tokenizer, exact), layer)[0] if exact else Kc.new_zeros(0, length, d_in)
    if not torch.isfinite(K_x).all():
        raise ValueError("the text encoder returns NaN/inf activations for the protected prompts")

    # exact protection: the span of the protected prompts' fc2 inputs (all 77 tokens each) is annihilated by ΔW
    budget = int(protect_budget * d_in)
    Q = _orth_basis(K_x.reshape(-1, d_in).T, protect_rtol)
    empty_exact = protect_empty
    if Q.shape[1] > budget and protect_empty and _orth_basis(K_x[0].T, protect_rtol).shape[1] > budget:
        # an encoder too narrow for the empty prompt's 77 positions (tiny test models; CLIP-L has 3072): said, not hidden
        warnings.warn(f"the empty prompt alone spans more than {budget} of the {d_in} fc2-input dimensions: it is "
                      "kept only in the least-squares sense", stacklevel=2)
        exact, empty_exact = exact[1:], False
        K_x = K_x[1:]
        Q = _orth_basis(K_x.reshape(-1, d_in).T, protect_rtol)
    if Q.shape[1] > budget:
        per = Q.shape[1] / max(1, len(exact))
        raise ValueError(
            f"the {len(exact)} exactly protected prompts span {Q.shape[1]} of the {d_in} fc2-input "
            f"dimensions (budget {budget}, ~{per:.0f} per prompt): at most {int(budget // per)} such prompts fit "
            "this encoder; protect whole concepts softly with --protect instead")
    # keys projected onto the complement of the exact span row by row (in float32 the projected Grams stay PSD; a
    # float32 Gram projected afterwards does not when the span holds most of the energy)
    Qf = Q.float()
    Kc_free = Kc - (Kc @ Qf) @ Qf.T
    free = float((Kc_free[bearing] ** 2).sum() / (Kc[bearing] ** 2).sum().clamp_min(1e-30))
    if free < MIN_FREE_ENERGY:
        raise ValueError(f"the exactly protected prompts cover the concept: only {free:.2e} of the concept "
                         "activations' energy lies outside their span; protect fewer or less related prompts")
    sv = torch.linalg.svdvals(Rm[bearing].double())  # effective dimension of the wanted change vs the hidden width
    energy = (sv**2).cumsum(0) / (sv**2).sum().clamp_min(1e-30)
    eff_rank = int((energy < 0.9).sum()) + 1
    if eff_rank > MAX_RANK_FRACTION * Rm.shape[1]:
        raise ValueError(
            f"the concept prompts span too large a subspace: the change needs {eff_rank} of {Rm.shape[1]} "
            f"dimensions for 90 % of its energy (cap {MAX_RANK_FRACTION:.0%}); erase narrower concepts one at a time")

    # soft protection + ridge on the complement of the exact span (the system is block-diagonal in range(P) ⊕
    # range(Q) and the right-hand side lies in range(P), so the solution does too):
    #     ΔW = R (P K_c)ᵀ (P (K_c K_cᵀ + λ_p K_p K_pᵀ) P + μ I)⁻¹
    # λ_p is per protected token relative to a concept token (protect_weight · #concept / #protected rows);
    # μ = ridge · the mean eigenvalue of P K_c K_cᵀ P. One Cholesky factorisation at the fc2-input width.
    G = Kc_free.T @ Kc_free
    mu = ridge * float(torch.diagonal(G).sum()) / d_in
    lam = 0.0
    if len(Kp) and protect_weight > 0:
        lam = protect_weight * Kc.shape[0] / Kp.shape[0]
        Kp_free = Kp - (Kp @ Qf) @ Qf.T
        G += lam * (Kp_free.T @ Kp_free)
    G = G.double() + mu * torch.eye(d_in, dtype=torch.float64)
    rhs = (Kc_free[bearing].T @ Rm[bearing]).double()  # (in, out); the prefix rows' target is 0
    delta = torch.cholesky_solve(rhs, torch.linalg.cholesky(G)).T
    delta = delta - (delta @ Q) @ Q.T  # exact annihilation of the protected span (removes round-off leakage)
    delta = (strength * delta).float()

    stats = {
        "layer": layer,
        "mode": mode,
        "anchor": anchor_word,
        "fc2_in": d_in,
        "n_concept_prompts": len(c_text),
        "n_soft_protected_prompts": len(p_text),
        "fit_positions": fit,
        "full_every": full_every,
        "n_exact_protected_prompts": len(exact),
        "empty_prompt_exact": empty_exact,
        "exact_protected_rank": int(Q.shape[1]),
        "free_energy": free,
        "target_effective_rank": eff_rank,
        "protect_lambda": lam,
        "ridge_mu": mu,
    }
    with torch.no_grad():
        unit = delta / strength if strength else None
        if unit is not None:  # how far the concept tokens get toward the target at α = 1 (relative residual)
            err = ((Kc @ unit.T - Rm)[bearing] ** 2).sum() / (Rm[bearing] ** 2).sum().clamp_min(1e-30)
            stats["target_residual"] = float(err.sqrt())
            if len(Kp):  # soft-protected tokens' fc2-output change, relative to the concept's wanted change
                rms_p = (Kp @ unit.T).pow(2).sum(-1).mean().sqrt()
                stats["soft_protected_rel_change"] = float(rms_p / Rm[bearing].pow(2).sum(-1).mean().sqrt())
            if len(exact):
                stats["exact_protected_max_abs_change_fc2_out"] = float((K_x @ unit.T).abs().max())
    stats["seconds"] = time.perf_counter() - t0
    return EncoderEdit(layer, delta, stats)


def edit_layers(text_encoder, penultimate: bool, depth: int | None) -> list[int]:
    """The fc2 layers edited, earliest first: the read layer and the ``depth - 1`` below it (default: all)."""
    read = read_layer_index(text_encoder, penultimate)
    depth = read + 1 if depth is None else depth
    if not 1 <= depth <= read + 1:
        raise ValueError(f"depth must lie in [1, {read + 1}] for this text encoder, got {depth}")
    return list(range(read - depth + 1, read + 1))


def encoder_edits(text_encoder, tokenizer, concepts, protect, *, layers: list[int], strength: float = 1.0,
                  **kw) -> list[EncoderEdit]:
    """One fc2 edit per layer in ``layers``, earliest first, each fitted with the earlier ones applied and taking
    1 / (layers left) of the remaining way to the anchor (as EMCID spreads an edit over CLIP layers). Later layers
    correct what earlier ones missed; exactly protected prompts stay exact, since every ΔW annihilates their keys.
    ``strength`` scales every ΔW (the encoder is left as it was)."""
    core = clip_core(text_encoder).encoder.layers
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its original value): restored bit for bit

    @contextmanager
    def original():
        edited = [w.clone() for w, _ in saved]
        with torch.no_grad():
            for w, w0 in saved:
                w.copy_(w0)
            try:
                yield
            finally:
                for (w, _), we in zip(saved, edited):
                    w.copy_(we)

    edits = []
    try:
        for i, layer in enumerate(layers):
            edit = encoder_edit(text_encoder, tokenizer, concepts, protect, layer=layer, share=1.0 / (len(layers) - i),
                                original=original, **kw)
            edits.append(edit)
            if i + 1 < len(layers):  # the next layer is fitted on top of this one
                weight = core[layer].mlp.fc2.weight
                saved.append((weight, weight.detach().clone()))
                with torch.no_grad():
                    weight.add_(edit.delta.to(weight))
    finally:
        with torch.no_grad():
            for w, w0 in saved:
                w.copy_(w0)
    for edit in edits:
        edit.delta = strength * edit.delta
    return edits


# ------------------------------------------------------------------------------------------------------------- CLIP
@torch.no_grad()
def clip_text_embeddings(clip_model, tokenizer, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """Normalised projected text embeddings (N, d)."""
    out = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], padding=True, truncation=True, return_tensors="pt")
        feats = clip_model.get_text_features(**enc.to(clip_model.device))
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        out.append(torch.nn.functional.normalize(feats.float().cpu(), dim=-1))
    emb = torch.cat(out)
    if not torch.isfinite(emb).all() or (emb.norm(dim=-1) < 0.5).any():
        raise ValueError("degenerate (NaN or zero) CLIP text embeddings; check the model weights")
    return emb


def class_embedding(clip_model, tokenizer, word: str, prompts: PromptSet) -> torch.Tensor:
    """t_c = normalize(mean_k normalize(f_txt(template_k(c)))) (methods.md §2.3)."""
    emb = clip_text_embeddings(clip_model, tokenizer, [b + word + a for b, a in prompts.frames()])
    return torch.nn.functional.normalize(emb.mean(0), dim=0)


def clip_projection(
    clip_model,
    tokenizer,
    concepts: list[str],
    protect: list[str],
    *,
    synonyms: dict | None = None,
    prompts: PromptSet = PromptSet(),
    retain_weight: float = CLIP_RETAIN_WEIGHT,
    ridge: float = CLIP_RIDGE,
) -> tuple[torch.Tensor, dict]:
    """D (d, d), rank ≤ #forget words: the image-side edit W_v ← (I − α D) W_v (methods.md §2.4 variant (b)).

    With T_f / T_r the forget / retained class embeddings (unit columns) and S = T_f T_fᵀ + λ T_r T_rᵀ + μ I,
    D = S⁻¹ T_f T_fᵀ, so an image feature's logit against t becomes ⟨z, M t⟩ with M = I − T_f T_fᵀ S⁻¹ the
    regularised least-squares map that sends T_f to ≈ 0 and keeps T_r ≈ T_r (λ = ``retain_weight`` per retained
    embedding relative to a forget one, μ = ``ridge``)."""
    synonyms = synonyms or {}
    t0 = time.perf_counter()
    T_f = torch.stack([class_embedding(clip_model, tokenizer, w, prompts)
                       for c in concepts for w in (c, *synonyms.get(c, ()))], 1).double()
    d, m = T_f.shape
    if m > MAX_CLIP_RANK_FRACTION * d:
        raise ValueError(f"the concepts need {m} of {d} embedding dimensions (cap {MAX_CLIP_RANK_FRACTION:.0%}); "
                         "erase fewer concepts at once")
    S = T_f @ T_f.T + ridge * torch.eye(d, dtype=torch.float64)
    T_r = [class_embedding(clip_model, tokenizer, w, prompts) for p in protect for w in (p, *synonyms.get(p, ()))]
    if T_r:
        T_r = torch.stack(T_r, 1).double()
        S += retain_weight * T_r @ T_r.T
    D = torch.linalg.solve(S, T_f @ T_f.T)
    M = torch.eye(d, dtype=torch.float64) - D.T
    left = float((M @ T_f).norm() / T_f.norm())
    if left > MAX_CLIP_FORGET_LEFT:
        raise ValueError(f"the protected classes' embeddings span the erased concepts ({left:.0%} of the forget "
                         "embeddings survives the regularised edit); protect fewer classes or lower retain_weight")
    stats = {"rank": int(torch.linalg.matrix_rank(T_f, rtol=1e-6)), "dim": d, "n_retained": 0 if not len(T_r) else T_r.shape[1],
             "forget_left": left, "retain_change": float((M @ T_r - T_r).norm() / T_r.norm()) if len(T_r) else 0.0,
             "retain_weight": retain_weight, "ridge": ridge, "seconds": time.perf_counter() - t0}
    return D.float(), stats


def apply_projection(clip_model, D: torch.Tensor, strength: float = 1.0) -> None:
    """In place: visual_projection.weight ← (I − α D) W (for tests and measurement without a patch file)."""
    W = clip_model.visual_projection.weight
    with torch.no_grad():
        W -= strength * D.to(W) @ W


# -------------------------------------------------------------------------------------------------------------- API
def _pipeline_layers(pipe, edits: dict, rank: int | None, rtol: float):
    layers = {}
    for comp, comp_edits in edits.items():
        te, layers[comp] = getattr(pipe, comp), {}
        for edit in comp_edits:
            factors, residual = factors_from_delta(edit.delta, rank=rank, rtol=rtol)
            layers[comp][f"text_model.encoder.layers.{edit.layer}.mlp.fc2"] = factors
            edit.stats["lora_rank"] = factors.rank
            edit.stats["factor_residual"] = residual
        # zero factors: diffusers only recognises text-encoder LoRA files that name an attention projection
        last, r = comp_edits[-1].layer, max(e.stats["lora_rank"] for e in comp_edits)
        out_proj = clip_core(te).encoder.layers[last].self_attn.out_proj
        layers[comp][f"text_model.encoder.layers.{last}.self_attn.out_proj"] = LoraFactors(
            torch.zeros(r, out_proj.in_features), torch.zeros(out_proj.out_features, r))
    return layers


def default_protect(concepts: list[str], miniworld: bool) -> list[str]:
    """On the miniature world, the other classes of the erased concepts' attribute (erase a shape: keep the others)."""
    if not miniworld:
        return []
    from .miniworld.domain import COLOURS, SHAPES

    erased = {c.lower() for c in concepts}
    for group in (SHAPES, tuple(COLOURS)):
        if erased & set(group):
            return [v for v in group if v not in erased]
    return []


def erase(
    model: str,
    concepts: list[str],
    *,
    synonyms: dict | None = None,
    protect: list[str] | None = None,
    protect_prompts: list[str] | None = None,
    strength: float = 1.0,
    rank: int | None = None,
    anchor: str | None = None,
    target: str = "pipeline",
    output: str | Path,
    mode: str = "anchor",
    templates: list[str] | None = None,
    protect_weight: float = PROTECT_WEIGHT,
    ridge: float = RIDGE,
    depth: int = DEPTH,
    pipe=None,
    clip=None,
) -> Path:
    """Erase ``concepts`` from ``model`` in closed form and write a patch to ``output``; no images, no training.

    ``synonyms``: extra words per concept (and per protected concept) that mean the same; the miniature world's
    paraphrases are added by default. ``protect``: concepts kept softly (all their template prompts weigh in the
    least squares with ``protect_weight``; default on the miniature world: the erased attribute's other classes).
    ``protect_prompts``: prompts kept exactly (pipeline target; default on the miniature world:
    ``MINIWORLD_PROTECT_PROMPTS``); refused when their span exceeds the budget. ``anchor`` (pipeline, mode
    "anchor"): what the concept should become ("object" in the miniature world, the empty word otherwise).
    ``templates``: prompt templates with one ``{}`` slot (default: generic ones, or the miniature world's captions).
    ``pipe`` / ``clip``: already-loaded models (``clip`` = (CLIPModel, tokenizer)) to skip loading.
    """
    if target not in ("pipeline", "clip"):
        raise ValueError(f"target must be 'pipeline' or 'clip', not {target!r}")
    if not 0.0 <= float(strength) <= 1.0 or math.isnan(float(strength)):
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if not protect_weight >= 0:
        raise ValueError(f"protect_weight must be ≥ 0, got {protect_weight}")
    mini = is_miniworld(model) and templates is None
    if not protect:  # None or empty: the miniature world's default (nothing elsewhere)
        protect = default_protect([str(c).strip() for c in concepts], mini)
    syn = default_synonyms(list(concepts) + list(protect), mini)
    syn.update({k: tuple(v) for k, v in (synonyms or {}).items()})
    concepts, protect = _validate(concepts, protect, syn)
    if mini:  # the miniature world knows its whole vocabulary: refuse words it has never seen
        from .concepts import miniworld_attribute

        for word in [*concepts, *protect]:
            miniworld_attribute(word)
    if protect_prompts is None:  # the default set, less any prompt that names an erased word
        words = [w for c in concepts for w in (c, *syn.get(c, ()))]
        protect_prompts = [p for p in (MINIWORLD_PROTECT_PROMPTS if mini else ()) if not any(_names(p, w) for w in words)]
    protect_prompts = [str(p).strip() for p in protect_prompts]
    if any(not p for p in protect_prompts):
        raise ValueError("empty protected prompt")
    prompts = PromptSet(miniworld=True) if mini else PromptSet(tuple(templates or GENERIC_TEMPLATES))
    settings = {"strength": float(strength), "rank": rank, "target": target, "mode": mode,
                "protect_weight": protect_weight, "ridge": ridge, "protect_prompts": protect_prompts,
                "synonyms": {k: list(v) for k, v in syn.items() if v}, "n_frames": len(prompts.frames())}

    if target == "clip":
        from .models import load_clip

        clip_model, tokenizer = clip or load_clip(model)
        D, stats = clip_projection(clip_model, tokenizer, concepts, protect, synonyms=syn, prompts=prompts)

        W = clip_model.visual_projection.weight.detach().float().cpu()
        factors, _ = factors_from_delta(-strength * D @ W, rank=rank or stats["rank"], rtol=1e-6)
        layers = {"clip": {"visual_projection": factors}}
        fingerprints = {"clip": fingerprint(clip_model)}
        settings.update(stats)
        method = "nullspace-clip"
    else:
        from .models import load_pipeline

        pipe = pipe or load_pipeline(model)
        anchor = anchor if anchor is not None else (MINIWORLD_ANCHOR if mini else GENERIC_ANCHOR)
        components = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
        penultimate = getattr(pipe, "text_encoder_2", None) is not None  # SDXL reads hidden_states[-2] of both
        edits = {}
        for comp in components:
            tok, te = (pipe.tokenizer_2 if comp == "text_encoder_2" else pipe.tokenizer), getattr(pipe, comp)
            edits[comp] = encoder_edits(te, tok, concepts, protect, layers=edit_layers(te, penultimate, depth),
                                        protect_prompts=protect_prompts, synonyms=syn, prompts=prompts, anchor=anchor,
                                        mode=mode, strength=strength, penultimate=penultimate,
                                        protect_weight=protect_weight, ridge=ridge)
        layers = _pipeline_layers(pipe, edits, rank, rtol=1e-6)
        fingerprints = {c: fingerprint(getattr(pipe, c)) for c in components}
        settings.update({"anchor": anchor, "penultimate": penultimate,
                         "depth": depth, "stats": {c: [e.stats for e in es] for c, es in edits.items()}})
        method = "nullspace"
    # local only so that issue 14's change touches just this call; belongs in the module's imports
    from .concepts import ConceptSpec
    from .patch import Edit

    return save_patch(Edit(method, layers, settings, fingerprints), ConceptSpec(list(concepts), keep=list(protect)),
                      str(model), output)


# -------------------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser, command: str = "erase") -> None:
    parser.add_argument("concepts", nargs="+", metavar="CONCEPT", help="concept(s) to erase")
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld",
                        help="pipeline / CLIP folder, Hub id, or 'miniworld' (default)")
    parser.add_argument("--protect", nargs="*", default=None, metavar="CONCEPT",
                        help="concepts kept softly: all their template prompts weigh in the least squares (default in "
                             "the miniature world: the other classes of the erased attribute; none elsewhere)")
    parser.add_argument("--protect_prompt", action="append", default=None, metavar="PROMPT",
                        help="a prompt whose text-encoder output must stay exactly the same (repeatable; each takes "
                             "~77 fc2-input dimensions, so only a few fit; default in the miniature world: "
                             + ", ".join(repr(p) for p in MINIWORLD_PROTECT_PROMPTS) + ")")
    parser.add_argument("--protect_weight", type=float, default=PROTECT_WEIGHT,
                        help=f"λ_p: weight of a softly protected token relative to a concept token (default "
                             f"{PROTECT_WEIGHT})")
    parser.add_argument("--synonym", action="append", default=[], metavar="CONCEPT=WORD[,WORD...]",
                        help="paraphrases of a concept (repeatable); the miniature world's are added by default")
    parser.add_argument("--strength", type=float, default=1.0, help="α in [0, 1] (default 1)")
    parser.add_argument("--rank", type=int, default=None, help="cap on the LoRA rank (default: numerical rank)")
    parser.add_argument("--anchor", default=None,
                        help="what the concept becomes (pipeline target; default 'object' in the miniature world, "
                             "the empty word otherwise)")
    parser.add_argument("--mode", choices=("anchor", "project"), default="anchor")
    parser.add_argument("--template", action="append", default=None, metavar="TEMPLATE",
                        help="prompt template with one '{}' slot (repeatable; default: generic templates)")
    parser.add_argument("--target", choices=("pipeline", "clip"), default="pipeline")
    parser.add_argument("--output", required=True, help="patch file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _parse_synonyms(items: list[str]) -> dict[str, tuple[str, ...]]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--synonym {item!r}: expected CONCEPT=WORD[,WORD...]")
        key, words = item.split("=", 1)
        out[key.strip()] = tuple(w.strip() for w in words.split(",") if w.strip())
    return out


def _check_cli_arguments(args: argparse.Namespace) -> None:
    """Refusals before any model loads (one line each, exit 2 through the CLI); nothing is written."""
    import math

    from .atomic import check_output

    concepts = [c.strip().lower() for c in args.concepts]
    if not all(concepts):
        raise ValueError("a concept to erase is empty")
    if not (math.isfinite(args.strength) and 0.0 <= args.strength <= 1.0):
        raise ValueError(f"--strength must be between 0 and 1, got {args.strength}")
    if not (math.isfinite(args.protect_weight) and args.protect_weight >= 0):
        raise ValueError(f"--protect_weight must be a finite number >= 0, got {args.protect_weight}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be at least 1, got {args.rank}")
    if args.anchor is not None and args.anchor.strip().lower() in concepts:
        raise ValueError(f"--anchor {args.anchor!r} is the concept being erased: the edit would map it onto itself")
    check_output(args.output, overwrite=args.overwrite, option="--output")


def cli_main(args: argparse.Namespace) -> int:
    _check_cli_arguments(args)
    t0 = time.perf_counter()
    path = erase(args.pretrained_model_name_or_path, args.concepts, synonyms=_parse_synonyms(args.synonym),
                 protect=args.protect, protect_prompts=args.protect_prompt, protect_weight=args.protect_weight,
                 strength=args.strength, rank=args.rank, anchor=args.anchor,
                 target=args.target, output=args.output, mode=args.mode, templates=args.template)
    print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0
