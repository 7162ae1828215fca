"""Prompt attacks on an erased pipeline, all of which pass through its text encoder (peers.md §5, §7):

- ``misspellings``: character edits of the concept word (deletion, transposition, substitution, insertion, doubling);
- ``adversarial_search``: a bounded white-box discrete search over vocabulary tokens (greedy coordinate search, in the
  spirit of UnlearnDiffAtk / P4D): candidates substitute the concept word or are appended, and are scored by how close
  the *erased* pipeline's noise prediction for the candidate comes to the *original* pipeline's noise prediction for
  the concept prompt (same latents, timesteps). Budget: ``n_candidates`` tokens × ``positions`` per prompt.
- ``soft_prompt_attack``: concept inversion / textual inversion. k input token embeddings are learned so that the
  erased encoder's hidden states for "a red <v>" match the original encoder's for "a red circle" (``objective=
  "encoder"``), or end to end, so that the erased pipeline's noise prediction matches the original's for the concept
  prompt (``objective="unet"``, the CCE setting). The learned tokens replace the concept word or are inserted before /
  after the prompt (``placement``), with random ``restarts``; they replace a placeholder token's embedding through a
  forward hook on the token-embedding table, so the pipeline's own ``encode_prompt`` sees them during generation.

Generation of token-id prompts goes through the erased pipeline's text encoder (``prompt_embeds``), i.e. the attack
input still passes through the patched encoder. SD 1.x/2.x pipelines (one text encoder, last-hidden-state read).
"""

from __future__ import annotations

import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ------------------------------------------------------------------------------------------------ misspellings
def misspellings(word: str, n: int = 8, seed: int = 0) -> list[str]:
    """``n`` distinct one-edit misspellings of ``word`` (never ``word`` itself), deterministic for a seed."""
    if not word or not word.strip():
        raise ValueError("misspellings need a non-empty word")
    rng = random.Random(seed)
    out: list[str] = []
    seen = {word}
    for _ in range(200 * max(1, n)):
        if len(out) >= n:
            break
        kind = rng.choice(("delete", "swap", "substitute", "insert", "double"))
        i = rng.randrange(len(word))
        if kind == "delete" and len(word) > 2:
            cand = word[:i] + word[i + 1:]
        elif kind == "swap" and len(word) > 1:
            i = min(i, len(word) - 2)
            cand = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif kind == "substitute":
            cand = word[:i] + rng.choice(LETTERS) + word[i + 1:]
        elif kind == "insert":
            cand = word[:i] + rng.choice(LETTERS) + word[i:]
        else:
            cand = word[:i] + word[i] + word[i:]
        if cand not in seen and " " not in cand.strip():
            seen.add(cand)
            out.append(cand)
    return out


def contains_word(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole word (what ``replace_word`` replaces)."""
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def replace_word(text: str, word: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(word)}\b", new, text, count=1)


# ------------------------------------------------------------------------------------------------ encoder helpers
def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """SD 1.x conditioning: last hidden state of the (possibly patched) text encoder."""
    return text_encoder(ids.to(text_encoder.device))[0]


def pad_ids(tokenizer, rows: list[list[int]]) -> torch.Tensor:
    L = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = torch.full((len(rows), L), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:L]
        out[i, : len(r)] = torch.tensor(r)
    return out


def _noise_probe(pipe, k: int, seed: int, t_range=(200, 999)):
    """``k`` fixed (x_t, t) pairs in the pipeline's latent space."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.randn(k, cfg.in_channels, size, size, generator=g)
    t = torch.randint(t_range[0], t_range[1] + 1, (k,), generator=g)
    return x, t


def _eps(pipe, x, t, emb):
    """Noise prediction for every (candidate embedding × probe) pair: emb (B, L, D), x (K, C, H, W) → (B, K, ...)."""
    B, K = emb.shape[0], x.shape[0]
    xs = x.unsqueeze(0).expand(B, *x.shape).reshape(B * K, *x.shape[1:])
    ts = t.unsqueeze(0).expand(B, K).reshape(-1)
    es = emb.unsqueeze(1).expand(B, K, *emb.shape[1:]).reshape(B * K, *emb.shape[1:])
    return pipe.unet(xs, ts, encoder_hidden_states=es).sample.reshape(B, K, *x.shape[1:])


# ------------------------------------------------------------------------------------------------ discrete search
@dataclass
class AdversarialResult:
    prompt: str
    ids: list[int]  # unpadded, bos … eos
    text: str  # decoded (for the report; generation uses ``ids``)
    loss_before: float
    loss_after: float
    evaluated: int


# budgets beyond these are a typo, not an attack: refused before any model runs
MAX_BUDGET = {"n_candidates": 4096, "positions": 16, "probes": 64, "steps": 20_000, "n_tokens": 16, "restarts": 64}


def check_attack(base_pipe, erased_pipe, prompts: list[str], word: str, **budgets) -> None:
    """Refusals before an attack spends any compute: SDXL pipelines (the attacks read one text encoder's last hidden
    state, as SD 1.x / 2.x do), an empty prompt list, prompts that do not contain ``word``, and budgets that are not
    whole numbers in [1, ``MAX_BUDGET``]."""
    for pipe in (base_pipe, erased_pipe):
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError("the attacks support SD 1.x / 2.x pipelines (one text encoder); SDXL's two encoders "
                             "are not attacked yet")
    if not prompts:
        raise ValueError("an attack needs at least one prompt")
    missing = [p for p in prompts if not contains_word(p, word)]
    if not word.strip() or missing:
        raise ValueError(f"every attacked prompt must contain the word {word!r}; {len(missing)} do not, e.g. "
                         f"{(missing or [''])[0]!r}")
    for name, value in budgets.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BUDGET[name]:
            raise ValueError(f"attack budget {name} must be a whole number in [1, {MAX_BUDGET[name]}], got {value!r}")


def _word_positions(tokenizer, ids: list[int], word: str) -> list[int]:
    w = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(w) + 1):
        if ids[i : i + len(w)] == w:
            return list(range(i, i + len(w)))
    return []


@torch.no_grad()
def adversarial_search(base_pipe, erased_pipe, prompts: list[str], word: str, *, n_candidates: int = 64,
                       positions: int = 3, probes: int = 2, seed: int = 0,
                       progress: bool = True) -> list[AdversarialResult]:
    """Greedy coordinate search per prompt over ``positions`` slots (the concept word's tokens first, then appended
    tokens), ``n_candidates`` vocabulary tokens per slot: half nearest to the concept token in the input-embedding
    table, half random. Score: mean squared error between the erased pipeline's ε for the candidate and the original
    pipeline's ε for the unmodified prompt, on ``probes`` fixed noisy latents. Budget ≤ n_candidates × positions
    encoder + UNet evaluations per prompt."""
    check_attack(base_pipe, erased_pipe, prompts, word, n_candidates=n_candidates, positions=positions, probes=probes)
    tok = erased_pipe.tokenizer
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    vocab = [i for i in range(len(tok)) if i not in specials]
    emb_table = erased_pipe.text_encoder.get_input_embeddings().weight.detach()
    word_ids = tok(word, add_special_tokens=False).input_ids
    near = F.normalize(emb_table[word_ids].mean(0), dim=-1) @ F.normalize(emb_table, dim=-1).T
    near[list(specials)] = -2
    nearest = near.argsort(descending=True).tolist()
    x, t = _noise_probe(base_pipe, probes, seed)
    rng = random.Random(seed)
    results = []
    for prompt in tqdm(prompts, desc="adversarial search", disable=not progress):
        ids = tok(prompt).input_ids[: tok.model_max_length - positions]
        target = _eps(base_pipe, x, t, encode_ids(base_pipe.text_encoder, pad_ids(tok, [ids])))  # (1, K, ...)

        def score(rows):
            emb = encode_ids(erased_pipe.text_encoder, pad_ids(tok, rows))
            return ((_eps(erased_pipe, x, t, emb) - target) ** 2).flatten(1).mean(1)

        slots = _word_positions(tok, ids, word)[:positions]
        cur = list(ids)
        best = score([cur])[0].item()
        before, evaluated = best, 1
        n_append = positions - len(slots)
        for _ in range(n_append):
            slots.append(None)
        for slot in slots:
            if slot is None:  # append a new token before eos
                base_row = cur[:-1] + [cur[-1]]
                pos = len(cur) - 1
                make = lambda c, pos=pos, r=base_row: r[:pos] + [c] + r[pos:]
            else:
                make = lambda c, pos=slot, r=list(cur): r[:pos] + [c] + r[pos + 1:]
            half = n_candidates // 2
            cands = nearest[:half] + rng.sample(vocab, n_candidates - half)
            rows = [make(c) for c in cands]
            scores = torch.cat([score(rows[i : i + 32]) for i in range(0, len(rows), 32)])
            evaluated += len(rows)
            k = int(scores.argmin())
            if scores[k].item() < best:
                best, cur = scores[k].item(), rows[k]
        text = " ".join(t.replace("</w>", "") for t in tok.convert_ids_to_tokens(cur[1:-1]))
        results.append(AdversarialResult(prompt, cur, text, before, best, evaluated))
    return results


# ------------------------------------------------------------------------------------------------ soft prompt
PLACEHOLDER = "~"


def placeholder_id(tokenizer, placeholder: str = PLACEHOLDER) -> int:
    ids = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"placeholder {placeholder!r} is not a single token for this tokenizer")
    return ids[0]


@contextmanager
def learned_token(text_encoder, token_id: int, vector: torch.Tensor):
    """Within the block, token ``token_id`` embeds as ``vector`` (a forward hook on the token-embedding table).
    ``vector`` (k, D): the i-th occurrence of the token in a prompt embeds as row i (k learned tokens in a row).
    ``text_encoder``: the encoder, or its token-embedding table itself."""
    layer = text_encoder if isinstance(text_encoder, torch.nn.Embedding) else text_encoder.get_input_embeddings()
    rows = vector.reshape(-1, vector.shape[-1])

    def hook(module, inputs, output):
        mask = inputs[0] == token_id
        which = (mask.cumsum(1) - 1).clamp(0, len(rows) - 1)  # occurrence rank, per prompt
        return torch.where(mask.unsqueeze(-1), rows[which].to(output.dtype), output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


PLACEMENTS = ("replace", "prefix", "suffix")


def attacked_prompt(prompt: str, word: str, n_tokens: int = 1, placement: str = "replace") -> str:
    """``prompt`` with ``n_tokens`` placeholders: instead of ``word`` ("replace", the concept-inversion setting), or
    before / after the prompt with the word kept ("prefix" / "suffix", the prompt-insertion setting)."""
    tokens = " ".join([PLACEHOLDER] * n_tokens)
    if placement == "replace":
        return replace_word(prompt, word, tokens)
    return f"{tokens} {prompt}" if placement == "prefix" else f"{prompt} {tokens}"


@dataclass
class SoftPromptResult:
    vector: torch.Tensor  # (n_tokens, D)
    token_id: int
    objective: str
    placement: str = "replace"
    losses: list[float] = field(default_factory=list)  # of the restart kept (the lowest final loss)

    @property
    def loss_before(self) -> float:
        return self.losses[0]

    @property
    def loss_after(self) -> float:
        return self.losses[-1]

    def prompts(self, prompts: list[str], word: str) -> list[str]:
        """The attacked versions of ``prompts`` (generate them inside ``learned_token(encoder, token_id, vector)``)."""
        return [attacked_prompt(p, word, len(self.vector), self.placement) for p in prompts]


def encoders_identical(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        return False
    return all(torch.equal(pa[k], pb[k]) for k in pa)


def soft_prompt_attack(base_pipe, erased_pipe, train_prompts: list[str], word: str, *, steps: int = 150,
                       lr: float = 5e-2, objective: str = "auto", init_word: str | None = None, probes: int = 4,
                       n_tokens: int = 1, placement: str = "replace", restarts: int = 1, seed: int = 0,
                       progress: bool = True) -> SoftPromptResult:
    """Learn ``n_tokens`` input embeddings so that the attacked prompts (``attacked_prompt``) through the *erased*
    pipeline reproduce ``prompt`` through the *original* one. ``objective``: "encoder" (per-token hidden states,
    all 77 positions), "unet" (end-to-end, the concept-inversion setting: the erased pipeline's noise prediction vs
    the original's for the concept prompt, on random latents and timesteps) or "auto" (encoder unless the two text
    encoders are identical, i.e. the erasure is UNet-side). ``restarts``: the first starts from ``init_word`` (or the
    mean embedding), the others from random token embeddings; the lowest final loss is kept."""
    check_attack(base_pipe, erased_pipe, train_prompts, word, steps=steps, probes=probes, n_tokens=n_tokens,
                 restarts=restarts)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the soft-prompt attack's learning rate must be a positive number, got {lr}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    tok = erased_pipe.tokenizer
    te = erased_pipe.text_encoder
    if objective == "auto":
        same = erased_pipe.text_encoder is base_pipe.text_encoder or encoders_identical(base_pipe.text_encoder, te)
        objective = "unet" if same else "encoder"
    if objective not in ("encoder", "unet"):
        raise ValueError(f"objective must be 'encoder', 'unet' or 'auto', not {objective!r}")
    pid = placeholder_id(tok)
    ids_src = tokenize(tok, train_prompts)
    ids_adv = tokenize(tok, [attacked_prompt(p, word, n_tokens, placement) for p in train_prompts])
    table = te.get_input_embeddings().weight.detach()
    init_ids = tok(init_word, add_special_tokens=False).input_ids if init_word else None
    params = [p for p in list(te.parameters()) + list(erased_pipe.unet.parameters())]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target_h = encode_ids(base_pipe.text_encoder, ids_src)
    best = None
    try:
        for restart in range(restarts):
            if restart == 0:
                init = (table[init_ids].mean(0) if init_ids else table.mean(0)).expand(n_tokens, -1)
            else:
                init = table[torch.randint(0, len(table), (n_tokens,), generator=g)]
            v = init.detach().clone().float().requires_grad_(True)
            losses = _optimise(v, te, pid, ids_adv, target_h, erased_pipe, base_pipe, objective, steps, lr, probes,
                               g, progress and restart == 0)
            if best is None or losses[-1] < best[1][-1]:
                best = (v.detach(), losses)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return SoftPromptResult(best[0], pid, objective, placement, best[1])


def _optimise(v, te, pid, ids_adv, target_h, erased_pipe, base_pipe, objective, steps, lr, probes, g, progress):
    """Adam on ``v``; the loss before each step and after the last."""
    opt = torch.optim.Adam([v], lr=lr)
    losses = []
    n = len(ids_adv)
    for step in tqdm(range(steps + 1), desc=f"soft prompt ({objective})", disable=not progress):
        with learned_token(te, pid, v):
            h = encode_ids(te, ids_adv)
        if objective == "encoder":
            loss = F.mse_loss(h, target_h)
        else:
            cfg = erased_pipe.unet.config
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            b = min(n, probes)
            idx = torch.randperm(n, generator=g)[:b]
            x = torch.randn(b, cfg.in_channels, size, size, generator=g)
            t = torch.randint(200, 1000, (b,), generator=g)
            with torch.no_grad():
                target = base_pipe.unet(x, t, encoder_hidden_states=target_h[idx]).sample
            loss = F.mse_loss(erased_pipe.unet(x, t, encoder_hidden_states=h[idx]).sample, target)
        losses.append(loss.item())
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses
