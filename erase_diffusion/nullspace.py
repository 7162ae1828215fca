"""Data-free, closed-form concept erasure: concept names in, a small LoRA patch out; no images, no gradient steps.

``target="clip"`` (zero-shot classification / retrieval): the image-side projection edit of ``clip_projection.py``.

``target="pipeline"`` (Stable Diffusion reads the 77 per-token hidden states): a regularised least-squares edit
(UCE-style) of one MLP ``fc2`` of the text encoder — the last layer for SD 1.x/2.x, the layer SDXL reads (the
penultimate) for both SDXL encoders — solved by ``least_squares.solve`` on the fc2 inputs K at every token position:

    K_c  concept prompts (frames × the concept and its paraphrases); R: the wanted change of the read state there
    K_p  softly protected concepts' prompts (``protect``: a spread subset of the frames × each word)
    Q    basis of the exactly protected prompts' span (``protect_prompts``, the empty prompt first): ΔW Q = 0

* **Soft protection** of whole concepts (λ_p = ``protect_weight`` per token relative to a concept token): their
  prompts stay close, not equal. Exact protection of a whole concept is impossible at these widths: every prompt
  brings ~77 token positions (padding included), so one concept's prompts span the whole fc2 input (512 in the
  miniature world, 3072 in CLIP-L), the erased concept's activations included.
* **Exact protection** of a few prompts: their text-encoder output stays the base model's (≤ 1e-4, checked). Each
  takes ~77 dimensions; more than ``PROTECT_BUDGET`` of the width is refused with the number that fits (~3 in the
  miniature world, ~20 in CLIP-L). The empty prompt is always kept (``protect_empty``): classifier-free guidance reads
  it at every step of every generation (an encoder too narrow for it keeps it in the least-squares sense, warned).
* ``depth`` > 1 spreads the edit over the read layer and the ``depth - 1`` below it (EMCID-style, ``encoder_edits``);
  on the miniature world it did not lower the red / star / striped found rates, so the default is 1.

R is ``mode="anchor"`` (default): the original's read state of the token-aligned prompt with the anchor in place of
the concept (``anchors.with_default_anchor``: the empty word; the least similar sibling in the miniature world),
minus the concept prompt's state; or ``mode="project"``: minus the state's component along the concept's own
subspace. The edited layer's output is the read state plus a residual, so the change is linear in ΔW: strength α goes
exactly α of the way. ΔW ships as LoRA factors of its numerical rank (or ``rank``), plus zero factors on the same
layer's ``self_attn.out_proj``: diffusers refuses text-encoder LoRA files that name no attention projection.

Cost: encoder passes dominate (~700 prompts on the miniature world, 72 for the generic templates), then one Cholesky
factorisation at the fc2-input width. The encoder is causal, so every prompt runs on its first ``FIT_LENGTH`` = 24
positions (exact states there), and every ``FULL_EVERY`` = 8th also on all 77, its later positions weighted by 8.
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
from .concepts import ConceptSpec, with_miniworld_defaults
from .clip_projection import clip_projection
from .encoder_states import finite, read_layer_index, run_encoder
from .least_squares import check_target, fit_stats, free_rows, orth_basis, solve
from .models import is_miniworld, load_clip, load_pipeline
from .patch import Edit, clip_core, factors_from_delta, fingerprint, save_patch
from .patch_format import LoraFactors
from .prompts import GENERIC_TEMPLATES, PromptSet, aligned_positions, article, fill, n_tokens, names, tokenize

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


@dataclass
class EncoderEdit:
    """One fc2 edit of one text encoder, plus what was measured while building it."""

    layer: int
    delta: torch.Tensor  # (out, in), already scaled by the strength
    stats: dict = field(default_factory=dict)


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
    K, H = run_encoder(text_encoder, tokenize(tokenizer, [P.c_text[i] for i in ci] + [P.p_text[i] for i in pi], L),
                        layer)
    if a_text:
        with original():  # the anchor's states in the unedited encoder: the target of every layer
            H_a = run_encoder(text_encoder, tokenize(tokenizer, a_text, L), layer)[1]
    if not finite(K, H, *([H_a] if a_text else [])):
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
    K_x = run_encoder(text_encoder, tokenize(tokenizer, exact), layer)[0] if exact else torch.zeros(0, 1, d_in)
    if not finite(K_x):
        raise ValueError("the text encoder returns NaN/inf activations for the protected prompts")
    Q, Z = orth_basis(K_x.reshape(-1, d_in).T, rtol)
    empty_exact = protect_empty
    if Q.shape[1] > budget and protect_empty and orth_basis(K_x[0].T, rtol)[0].shape[1] > budget:
        # an encoder too narrow for the empty prompt's 77 positions (tiny test models; CLIP-L has 3072): said, not hidden
        warnings.warn(f"the empty prompt alone spans more than {budget} of the {d_in} fc2-input dimensions: it is "
                      "kept only in the least-squares sense", stacklevel=3)
        exact, empty_exact, K_x = exact[1:], False, K_x[1:]
        Q, Z = orth_basis(K_x.reshape(-1, d_in).T, rtol)
    if Q.shape[1] > budget:
        per = Q.shape[1] / max(1, len(exact))
        raise ValueError(
            f"the {len(exact)} exactly protected prompts span {Q.shape[1]} of the {d_in} fc2-input "
            f"dimensions (budget {budget}, ~{per:.0f} per prompt): at most {int(budget // per)} such prompts fit "
            "this encoder; protect whole concepts softly with --protect instead")
    return exact, empty_exact, K_x, Q, Z


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
    states in the ``original`` encoder (a context in which earlier layers' edits are undone; see ``encoder_edits``).

    Longer than the other functions on purpose: a 27-line signature (every setting a keyword, as the benchmarks sweep
    them) and the 20-line record of what the solve measured, around five numbered steps that read top to bottom."""
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
    Kc_free = free_rows(Kc, Q, Z)
    free, eff_rank = check_target(Kc, Kc_free, Rm, bearing)
    unit, mu, lam = solve(Kc, Kc_free, Kp, Rm, bearing, Q, Z, protect_weight, ridge)

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
        **fit_stats(unit.float(), Kc, Rm, bearing, Kp, K_x),
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
    syn = {k: tuple(v) for k, v in spec.paraphrases.items()}
    protect_prompts = spec.protect_prompts or []
    prompts = PromptSet(miniworld=True) if mini else PromptSet(tuple(templates or GENERIC_TEMPLATES))
    settings = {"strength": float(strength), "rank": rank, "target": target, "mode": mode,
                "protect_weight": protect_weight, "ridge": ridge, "protect_prompts": protect_prompts,
                "synonyms": {k: list(v) for k, v in syn.items() if v}, "n_frames": len(prompts.frames(spec.erase[0]))}

    if target == "clip":
        edit = _clip_edit(clip or load_clip(model), spec, syn, prompts, strength, rank, settings)
    else:
        edit = _pipeline_edit(pipe or load_pipeline(model), spec, syn, prompts, mini, settings, rank=rank, mode=mode,
                              strength=strength, depth=depth, protect_weight=protect_weight, ridge=ridge)
    return save_patch(edit, spec, str(model), output)


def _clip_edit(clip, spec: ConceptSpec, syn: dict, prompts: PromptSet, strength: float, rank: int | None,
               settings: dict) -> Edit:
    """Target "clip": the concept directions projected out of CLIP's visual projection (``clip_projection``)."""
    clip_model, tokenizer = clip
    D, stats = clip_projection(clip_model, tokenizer, spec.erase, spec.keep, synonyms=syn, prompts=prompts)
    W = clip_model.visual_projection.weight.detach().float().cpu()
    factors, _ = factors_from_delta(-strength * D @ W, rank=rank or stats["rank"], rtol=1e-6)
    return Edit("nullspace-clip", {"clip": {"visual_projection": factors}}, {**settings, **stats},
                {"clip": fingerprint(clip_model)})


def _pipeline_edit(pipe, spec: ConceptSpec, syn: dict, prompts: PromptSet, mini: bool, settings: dict, *,
                   rank: int | None, depth: int, **kw) -> Edit:
    """Target "pipeline": the fc2 edits of every text encoder (SDXL: both, read at the penultimate layer)."""
    components = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    penultimate = getattr(pipe, "text_encoder_2", None) is not None  # SDXL reads hidden_states[-2] of both
    anchor = with_default_anchor(spec, pipe.text_encoder, pipe.tokenizer, mini).anchor  # miniworld: one encoder
    edits = {}
    for comp in components:
        tok, te = (pipe.tokenizer_2 if comp == "text_encoder_2" else pipe.tokenizer), getattr(pipe, comp)
        edits[comp] = encoder_edits(te, tok, spec.erase, spec.keep, layers=edit_layers(te, penultimate, depth),
                                    protect_prompts=spec.protect_prompts or [], synonyms=syn, prompts=prompts,
                                    anchor=anchor, penultimate=penultimate, **kw)
    layers = _pipeline_layers(pipe, edits, rank, rtol=1e-6)
    settings = {**settings, "anchor": anchor, "penultimate": penultimate, "depth": depth,
                "stats": {c: [e.stats for e in es] for c, es in edits.items()}}
    return Edit("nullspace", layers, settings, {c: fingerprint(getattr(pipe, c)) for c in components})
