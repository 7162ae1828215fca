"""Rates with their uncertainty: every rate the project reports carries its n and a Wilson 95 % interval, and a
base-vs-patched comparison of the same prompts (same seeds) its paired McNemar test."""

from __future__ import annotations

import math

import torch


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial rate k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(mask) -> dict:
    """A boolean mask's rate with its count, n and Wilson interval."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    k, n = int(mask.sum()), int(mask.numel())
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci95": [lo, hi]}


def pooled(rates: list[dict]) -> dict:
    """Several ``rate`` dicts of independent runs (training seeds) as one rate over all their prompts."""
    k, n = sum(r["k"] for r in rates), sum(r["n"] for r in rates)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci95": list(wilson(k, n))}


def percent(r: dict | None) -> str:
    """A ``rate`` dict as the tables print it: "12.5 % [7–21]" (the Wilson interval in whole points); the rate alone
    without a "ci95"; "–" for None."""
    if r is None:
        return "–"
    ci = r.get("ci95")
    return f"{100 * r['rate']:.1f} %" + ("" if ci is None else f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]")


def mcnemar(before, after) -> dict:
    """McNemar's exact test (two-sided) of paired flags: how many turned off (lost), turned on (gained), and p."""
    a, b = torch.as_tensor(before, dtype=torch.bool), torch.as_tensor(after, dtype=torch.bool)
    lost, gained = int((a & ~b).sum()), int((~a & b).sum())
    m = lost + gained
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(min(lost, gained) + 1)) / 2**m) if m else 1.0
    return {"lost": lost, "gained": gained, "mcnemar_p": p}
