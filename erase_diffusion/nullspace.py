"""Data-free, closed-form concept erasure: concept names in, a small LoRA patch out; no images, no gradient steps.

Two targets, one idea (``reference/methods.md`` §2):

``target="clip"`` (zero-shot classification / retrieval): the image-side projection edit in ``clip_projection.py``.

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
    of the concept, minus the concept prompt's state (anchor: the empty word for real models; in the miniature world
    the sibling class least like the concept, ``anchors.miniworld_anchors``: "object" drew hexagons and stars, so
    those two could not be erased, and a colour or style has no neutral value), or
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

import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .anchors import GENERIC_ANCHOR, with_default_anchor
from .models import is_miniworld
from .concepts import ConceptSpec, with_miniworld_defaults
from .patch import Edit, LoraFactors, clip_core, factors_from_delta, fingerprint, save_patch
from .prompts import GENERIC_TEMPLATES, PromptSet, aligned_positions, article, fill, n_tokens, names, tokenize

# a concept whose target needs more than this fraction of the hidden width (90 % of the energy) is refused
MAX_RANK_FRACTION = 0.75
# the exactly protected prompts' span leaves less than this fraction of the concept's activation energy
MIN_FREE_ENERGY = 1e-7
# at most this fraction of the fc2 input width may be taken by the exactly protected prompts (~77 dims each)
PROTECT_BUDGET = 0.5
# λ_p per protected token relative to a concept token, and μ relative to the concept Gram's mean eigenvalue
PROTECT_WEIGHT = 10.0
RIDGE = 1e-2
# keep the empty prompt's conditioning exactly (classifier-free guidance's unconditional branch)
PROTECT_EMPTY = True
# fc2 layers edited (the read layer and those below it): with each concept in its own slot and a sibling anchor, the
# read layer alone erases colours, styles and shapes; 2 or 4 layers did not lower star's or striped's found rates
DEPTH = 1
# frames per softly protected word (a spread subset of the prompt frames; encoder passes dominate the cost)
PROTECT_FRAMES = 32
# token positions the least squares is fitted on (at least the longest prompt + its end token); 77 = all
FIT_LENGTH = 24
# every this-many-th prompt also runs at all 77 positions (its later padding positions weighted by this number)
FULL_EVERY = 8


# ----------------------------------------------------------------------------------------------- text-encoder probes
def _finite(*tensors: torch.Tensor) -> bool:
    """All entries finite, checked on sums (a NaN / inf entry makes the sum NaN / inf; 50× cheaper than isfinite)."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float64))) for t in tensors)


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
    out = text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2] if penultimate else out.last_hidden_state


@dataclass
class EncoderEdit:
    """One fc2 edit of one text encoder, plus what was measured while building it."""

    layer: int
    delta: torch.Tensor  # (out, in), already scaled by the strength
    stats: dict = field(default_factory=dict)


def _orth_basis(K: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal bases, float64, of the column span of K (d, N) — singular values above rtol · σ_max — and, when
    K has more than d / 4 columns, of its orthogonal complement (else None: projecting rows is then cheaper)."""
    d, n = K.shape
    if n == 0:
        return torch.zeros(d, 0, dtype=torch.float64), None
    if 2 * n <= d:  # few columns: an SVD is cheap and the most accurate
        U, S, _ = torch.linalg.svd(K.double(), full_matrices=4 * n > d)
    else:  # d × d Gram eigenproblem
        evals, U = torch.linalg.eigh(K.double() @ K.double().T)
        order = evals.argsort(descending=True)
        S, U = evals[order].clamp_min(0).sqrt(), U[:, order]
    k = int((S > rtol * S[0]).sum()) if S[0] > 0 else 0
    return U[:, :k], (U[:, k:] if U.shape[1] == d and 4 * n > d else None)


def _free_rows(K: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor | None) -> torch.Tensor:
    """K's rows with their span(Q) part removed, float32 row by row (float32 Grams of projected rows stay PSD; a
    float32 Gram projected afterwards does not when span(Q) holds most of the energy). Given the complement basis Z,
    the rows come in its coordinates (d − k columns): the same Gram in fewer flops when span(Q) is large."""
    if Z is not None:
        return K @ Z.float()
    Qf = Q.float()
    return K - (K @ Qf) @ Qf.T


@dataclass
class _EditPrompts:
    """The texts one edit is fitted on: concept prompts with their token-aligned anchor prompts, and the softly
    protected prompts (``filled`` / ``p_filled``: (before, word, after, start, n_tokens) per prompt)."""

    filled: list
    p_filled: list
    anchors: dict[str, str]  # erased word → its anchor
    a_tokens: list[int]  # token count of each concept prompt's anchor word
    c_text: list[str] = field(init=False)
    a_text: list[str] = field(init=False)  # anchor prompt of each concept prompt
    p_text: list[str] = field(init=False)

    def __post_init__(self):
        self.c_text = [b + w + a for b, w, a, _, _ in self.filled]
        self.a_text = [(article(b, self.anchors[w]) + self.anchors[w] + a) if self.anchors[w] else (b.rstrip() + a)
                       for b, w, a, _, _ in self.filled]
        self.p_text = [b + w + a for b, w, a, _, _ in self.p_filled]


def _edit_prompts(tokenizer, concepts, protect, protect_prompts, synonyms, prompts, anchor, protect_frames):
    """Step 1: concept, anchor and softly protected prompts (frames naming another erased word are left out)."""
    words = [w for c in concepts for w in (c, *synonyms.get(c, ()))]
    named = sorted({w for w in words for p in protect_prompts if names(p, w)})
    if named:
        raise ValueError(f"a protected prompt names an erased concept or its paraphrase ({', '.join(named)}); "
                         "it cannot both keep its conditioning and lose the concept")
    length = tokenizer.model_max_length
    filled = fill(prompts, words, tokenizer, length, avoid=words)
    if not filled:
        raise ValueError("every concept prompt is longer than the tokenizer's maximum length")
    # softly protected concepts: a spread subset of the frames is enough to estimate their activations' covariance
    p_filled = fill(prompts, [w for p in protect for w in (p, *synonyms.get(p, ()))], tokenizer, length,
                    subset=protect_frames, avoid=words)
    # one anchor for every concept, or one per concept; its paraphrases share it
    per_concept = anchor if isinstance(anchor, dict) else {c: anchor for c in concepts}
    per_concept = {c: GENERIC_ANCHOR if per_concept.get(c) is None else per_concept[c] for c in concepts}
    anchor_of = {w: per_concept[c] for c in concepts for w in (c, *synonyms.get(c, ()))}
    a_tokens = [n_tokens(tokenizer, anchor_of[w]) for _, w, _, _, _ in filled]
    return _EditPrompts(filled, p_filled, anchor_of, a_tokens), per_concept


def _keys_and_targets(text_encoder, tokenizer, P: _EditPrompts, ci, pi, layer, L, start, mode, share, original,
                      proj: dict):
    """Step 2: concept keys, targets and bearing flags, and protected keys, at positions [start, L) of concept
    prompts ``ci`` and protected prompts ``pi`` (mode "project" fills ``proj`` on its first call)."""
    a_text = list(dict.fromkeys(P.a_text[i] for i in ci)) if mode == "anchor" else []
    K, H = _run_encoder(text_encoder, tokenize(tokenizer, [P.c_text[i] for i in ci] + [P.p_text[i] for i in pi], L),
                        layer)
    if a_text:
        with original():  # the anchor's states in the unedited encoder: the target of every layer
            H_a = _run_encoder(text_encoder, tokenize(tokenizer, a_text, L), layer)[1]
    if not _finite(K, H, *([H_a] if a_text else [])):
        raise ValueError("the text encoder returns NaN/inf activations (degenerate weights?)")
    nc = len(ci)
    K_c, H_c, K_p, H_p = K[:nc], H[:nc], K[nc:], H[nc:]
    pos = [P.filled[i][3:] for i in ci]
    mask = torch.zeros(K_c.shape[:2], dtype=torch.bool)  # concept-bearing positions: the word and after
    for j, (s, _) in enumerate(pos):
        mask[j, s:] = True
    if mode == "anchor":  # the anchor prompt's state at the aligned position, minus the concept prompt's
        row = {t: j for j, t in enumerate(a_text)}
        which = torch.tensor([row[P.a_text[i]] for i in ci])
        idx = torch.tensor([aligned_positions(s, n, P.a_tokens[i], L) for i, (s, n) in zip(ci, pos)])
        R = torch.gather(H_a[which], 1, idx[..., None].expand(-1, -1, H_a.shape[-1])) - H_c
    else:  # project: remove the concept words' distinctive subspace from the bearing tokens
        if not proj:
            words = torch.stack([H_c[j, s : s + n].mean(0) for j, (s, n) in enumerate(pos)])
            if pi:
                proj["centre"] = torch.stack([H_p[j, s : s + n].mean(0) for j, (_, _, _, s, n) in
                                              enumerate(P.p_filled[i] for i in pi)]).mean(0)
            else:
                proj["centre"] = H_c[mask].mean(0)
            U, S, _ = torch.linalg.svd((words - proj["centre"]).T.double(), full_matrices=False)
            energy = (S**2).cumsum(0) / (S**2).sum()
            proj["U"] = U[:, : int((energy < 0.9).sum()) + 1].float()
        R = -((H_c - proj["centre"]) @ proj["U"] @ proj["U"].T)
    R = share * R * mask[..., None]
    flat = lambda X: X[:, start:].reshape(-1, X.shape[-1])  # noqa: E731
    return flat(K_c), flat(R), mask[:, start:].reshape(-1), flat(K_p)


def _exact_span(text_encoder, tokenizer, protect_prompts, layer, d_in, budget, protect_empty, rtol):
    """Step 3: the exactly kept prompts (the empty one first) and an orthonormal basis Q of their fc2 inputs' span
    (all 77 tokens each), plus its complement Z where that is cheaper to work in."""
    exact = ([""] if protect_empty else []) + list(protect_prompts)
    K_x = _run_encoder(text_encoder, tokenize(tokenizer, exact), layer)[0] if exact else torch.zeros(0, 1, d_in)
    if not _finite(K_x):
        raise ValueError("the text encoder returns NaN/inf activations for the protected prompts")
    Q, Z = _orth_basis(K_x.reshape(-1, d_in).T, rtol)
    empty_exact = protect_empty
    if Q.shape[1] > budget and protect_empty and _orth_basis(K_x[0].T, rtol)[0].shape[1] > budget:
        # an encoder too narrow for the empty prompt's 77 positions (tiny test models; CLIP-L has 3072): said, not hidden
        warnings.warn(f"the empty prompt alone spans more than {budget} of the {d_in} fc2-input dimensions: it is "
                      "kept only in the least-squares sense", stacklevel=3)
        exact, empty_exact, K_x = exact[1:], False, K_x[1:]
        Q, Z = _orth_basis(K_x.reshape(-1, d_in).T, rtol)
    if Q.shape[1] > budget:
        per = Q.shape[1] / max(1, len(exact))
        raise ValueError(
            f"the {len(exact)} exactly protected prompts span {Q.shape[1]} of the {d_in} fc2-input "
            f"dimensions (budget {budget}, ~{per:.0f} per prompt): at most {int(budget // per)} such prompts fit "
            "this encoder; protect whole concepts softly with --protect instead")
    return exact, empty_exact, K_x, Q, Z


def _check_target(Kc, Kc_free, Rm, bearing) -> tuple[float, int]:
    """Step 4: refuse an edit the exact span leaves no room for, or a target wider than the hidden state allows."""
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
    return free, eff_rank


def _solve(Kc, Kc_free, Kp, Rm, bearing, Q, Z, protect_weight, ridge) -> tuple[torch.Tensor, float, float]:
    """Step 5: soft protection + ridge on the complement of the exact span (the system is block-diagonal in
    range(P) ⊕ range(Q) and the right-hand side lies in range(P), so the solution does too):

        ΔW = R (P K_c)ᵀ (P (K_c K_cᵀ + λ_p K_p K_pᵀ) P + μ I)⁻¹

    λ_p is per protected token relative to a concept token (protect_weight · #concept / #protected rows); μ = ridge ·
    the mean eigenvalue of P K_c K_cᵀ P. One Cholesky factorisation at the fc2-input width (or, in the complement's
    coordinates, at its width: the same solution). Returns ΔW (float64), μ, λ_p."""
    d_in = Kc.shape[-1]
    G = Kc_free.T @ Kc_free
    mu = ridge * float(torch.diagonal(G).sum()) / d_in
    lam = 0.0
    if len(Kp) and protect_weight > 0:
        lam = protect_weight * Kc.shape[0] / Kp.shape[0]
        Kp_free = _free_rows(Kp, Q, Z)
        G += lam * (Kp_free.T @ Kp_free)
    G = G.double() + mu * torch.eye(G.shape[0], dtype=torch.float64)
    rhs = (Kc_free[bearing].T @ Rm[bearing]).double()  # (in, out); the prefix rows' target is 0
    delta = torch.cholesky_solve(rhs, torch.linalg.cholesky(G)).T
    if Z is not None:
        delta = delta @ Z.T  # back from the complement's coordinates
    return delta - (delta @ Q) @ Q.T, mu, lam  # exact annihilation of the protected span (removes round-off)


@torch.no_grad()
def _fit_stats(unit, Kc, Rm, bearing, Kp, K_x) -> dict:
    """How far the concept tokens get toward the target at α = 1 (relative residual), and how much the protected
    tokens' fc2 output moves."""
    err = ((Kc @ unit.T - Rm)[bearing] ** 2).sum() / (Rm[bearing] ** 2).sum().clamp_min(1e-30)
    stats = {"target_residual": float(err.sqrt())}
    if len(Kp):  # soft-protected tokens' change, relative to the concept's wanted change
        rms_p = (Kp @ unit.T).pow(2).sum(-1).mean().sqrt()
        stats["soft_protected_rel_change"] = float(rms_p / Rm[bearing].pow(2).sum(-1).mean().sqrt())
    if len(K_x):
        stats["exact_protected_max_abs_change_fc2_out"] = float((K_x @ unit.T).abs().max())
    return stats


def encoder_edit(
    text_encoder,
    tokenizer,
    concepts: list[str],
    protect: list[str],
    *,
    protect_prompts: list[str] = (),
    synonyms: dict | None = None,
    prompts: PromptSet = PromptSet(),
    anchor: str | dict[str, str] | None = GENERIC_ANCHOR,
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
    length = tokenizer.model_max_length

    # 1. prompts
    P, anchors = _edit_prompts(tokenizer, concepts, protect, protect_prompts, synonyms, prompts, anchor,
                               protect_frames)

    # 2. keys and targets. Encoder passes dominate the cost. The encoder is causal, so a pass over the first `fit`
    # positions gives exactly those positions' states: every prompt runs at `fit` positions (words, end token, first
    # padding), and every `full_every`-th prompt also at all 77, whose later (padding) positions enter with weight
    # `full_every`.
    longest = max(len(ids) for ids in tokenizer(P.c_text + P.a_text + P.p_text).input_ids)
    fit = min(length, max(fit_length, longest + 1))
    proj = {}  # mode "project": the concept subspace and centre, from the first pass
    step = dict(layer=layer, mode=mode, share=share, original=original, proj=proj)
    Kc, Rm, bearing, Kp = _keys_and_targets(text_encoder, tokenizer, P, list(range(len(P.c_text))),
                                            list(range(len(P.p_text))), L=fit, start=0, **step)
    if fit < length:
        ci, pi = list(range(0, len(P.c_text), full_every)), list(range(0, len(P.p_text), full_every))
        late = _keys_and_targets(text_encoder, tokenizer, P, ci, pi, L=length, start=fit, **step)
        late = [x * full_every**0.5 if x.dtype != torch.bool else x for x in late]
        Kc, Rm, bearing, Kp = (torch.cat([x, y]) for x, y in zip((Kc, Rm, bearing, Kp), late))
    d_in = Kc.shape[-1]

    # 3. the exactly protected span (the empty prompt always: classifier-free guidance reads it at every step)
    exact, empty_exact, K_x, Q, Z = _exact_span(text_encoder, tokenizer, protect_prompts, layer, d_in,
                                                int(protect_budget * d_in), protect_empty, protect_rtol)

    # 4. refusals, 5. the solve
    Kc_free = _free_rows(Kc, Q, Z)
    free, eff_rank = _check_target(Kc, Kc_free, Rm, bearing)
    unit, mu, lam = _solve(Kc, Kc_free, Kp, Rm, bearing, Q, Z, protect_weight, ridge)

    stats = {
        "layer": layer,
        "mode": mode,
        "anchor": anchors if len(set(anchors.values())) > 1 else anchors[concepts[0]],
        "fc2_in": d_in,
        "n_concept_prompts": len(P.c_text),
        "n_soft_protected_prompts": len(P.p_text),
        "fit_positions": fit,
        "full_every": full_every,
        "n_exact_protected_prompts": len(exact),
        "empty_prompt_exact": empty_exact,
        "exact_protected_rank": int(Q.shape[1]),
        "free_energy": free,
        "target_effective_rank": eff_rank,
        "protect_lambda": lam,
        "ridge_mu": mu,
        **_fit_stats(unit.float(), Kc, Rm, bearing, Kp, K_x),
        "seconds": time.perf_counter() - t0,
    }
    return EncoderEdit(layer, (strength * unit).float(), stats)


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


def erase(
    model: str,
    spec: ConceptSpec | list[str],
    *,
    output: str | Path,
    strength: float = 1.0,
    rank: int | None = None,
    target: str = "pipeline",
    mode: str = "anchor",
    templates: list[str] | None = None,
    protect_weight: float = PROTECT_WEIGHT,
    ridge: float = RIDGE,
    depth: int = DEPTH,
    pipe=None,
    clip=None,
) -> Path:
    """Erase ``spec``'s concepts (a ``ConceptSpec``, or a list of concept names) from ``model`` in closed form and
    write a patch to ``output``; no images, no training.

    ``spec.paraphrases``: words that mean the same as an erased or kept concept. ``spec.keep``: concepts kept softly
    (all their template prompts weigh in the least squares with ``protect_weight``). ``spec.protect_prompts``:
    prompts kept exactly (pipeline target), refused when their span exceeds the budget. ``spec.anchor`` (pipeline,
    mode "anchor"): what the concept should become (default: the empty word). On the miniature world whatever the
    spec leaves open is filled by ``concepts.with_miniworld_defaults`` and ``anchors.miniworld_anchors``.
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
    spec = spec if isinstance(spec, ConceptSpec) else ConceptSpec(list(spec))
    spec = with_miniworld_defaults(spec) if mini else spec
    concepts, protect, anchor = spec.erase, spec.keep, spec.anchor
    syn = {k: tuple(v) for k, v in spec.paraphrases.items()}
    protect_prompts = spec.protect_prompts or []
    prompts = PromptSet(miniworld=True) if mini else PromptSet(tuple(templates or GENERIC_TEMPLATES))
    settings = {"strength": float(strength), "rank": rank, "target": target, "mode": mode,
                "protect_weight": protect_weight, "ridge": ridge, "protect_prompts": protect_prompts,
                "synonyms": {k: list(v) for k, v in syn.items() if v}, "n_frames": len(prompts.frames(concepts[0]))}

    if target == "clip":
        from .clip_projection import clip_projection
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
        components = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
        penultimate = getattr(pipe, "text_encoder_2", None) is not None  # SDXL reads hidden_states[-2] of both
        anchor = with_default_anchor(spec, pipe.text_encoder, pipe.tokenizer, mini).anchor  # miniworld: one encoder
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
    return save_patch(Edit(method, layers, settings, fingerprints), spec, str(model), output)
