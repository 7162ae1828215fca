"""``report.html``: one self-contained page of an evaluation's figures (tables, plots and image grids embedded as
base64 PNG, no external resources), written with ``metrics.json`` by ``write_outputs``."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image

from . import robustness
from .atomic import write_atomic, write_json
from .measure import grid_array


def _png_b64(fig_or_images) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_images, torch.Tensor):
        ims = fig_or_images
        arr = grid_array(ims, columns=min(8, len(ims)))
        Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.Resampling.NEAREST).save(buf, "PNG")
    else:
        fig_or_images.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _bar(labels, series: dict, title: str, ylabel: str) -> Figure:
    # a bare Figure, not pyplot: no global backend switch for whoever imports this module, nothing to close
    fig = Figure(figsize=(max(5, 0.9 * len(labels) + 2), 3.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], [100 * (v or 0) for v in vals], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend()
    return fig


def render_html(m: dict, images: dict) -> str:
    """One self-contained page: tables, plots and grids embedded as base64 PNG (no external resources)."""
    fg, se, rob = m.get("forgetting", {}), m.get("side_effects", {}), m.get("robustness", {})
    parts = [f"<h1>erase-diffusion evaluation: {html.escape(', '.join(m.get('erase', [])))} "
             f"({html.escape(str(m.get('method')))})</h1>",
             f"<p>{'quick' if m.get('quick') else 'full'} mode, {m.get('steps')} sampling steps, seed {m.get('seed')}. "
             "Generations are judged by the independent judge CNN. FID/KID are computed in the judge's feature space "
             "(judge-feature FID, not Inception FID).</p>"]
    labels = ["found (named)", "retained shape", "related", "colour kept", "style kept"]
    base = [fg.get("found_named_base"), se.get("retained_shape_base"), se.get("related_acc_base"),
            se.get("named_colour_kept_base"), se.get("named_style_kept_base")]
    er = [fg.get("found_named_erased"), se.get("retained_shape_erased"), se.get("related_acc_erased"),
          se.get("named_colour_kept_erased"), se.get("named_style_kept_erased")]
    parts.append(f'<h2>Forget vs retain</h2><img alt="forget vs retain" src="data:image/png;base64,'
                 f'{_png_b64(_bar(labels, {"base": base, "erased": er}, "forget vs retain (judged)", "%"))}">')
    names = [k for k in ("paraphrase", "misspelled", "adversarial", "soft_prompt") if k in rob]
    if names:
        fig = _bar(names, {"base (unattacked prompt for adversarial / soft)":
                           [rob[k].get("asr_base", fg.get("found_named_base")) for k in names],
                           "erased": [rob[k]["asr"] for k in names]}, "attack success rate", "ASR %")
        parts.append(f'<h2>Attack success</h2><img alt="ASR" src="data:image/png;base64,{_png_b64(fig)}">')
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                   for k, v in m.items() if k not in ("prompt_sets",))
    parts.append(f"<h2>Metrics</h2><table border=1 cellpadding=3>{rows}</table>")
    for name in ("named", "paraphrase", "heldout", "retained"):
        for tag in ("base", "erased"):
            if (tag, name) in images:
                parts.append(f"<h3>{tag}: {name}</h3><img alt='{tag} {name}' "
                             f"src='data:image/png;base64,{_png_b64(images[(tag, name)][:16])}'>")
    for name in ("adversarial", *robustness.SUITE):
        if ("erased", name) in images:
            parts.append(f"<h3>erased: {name} attack</h3><img alt='{name}' "
                         f"src='data:image/png;base64,{_png_b64(images[('erased', name)][:16])}'>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>erase-diffusion evaluation</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{font-size:12px;vertical-align:top}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")


def write_outputs(m: dict, images: dict, output_dir) -> dict:
    out = Path(output_dir)
    metrics = write_json(out / "metrics.json", m)
    report = write_atomic(out / "report.html", render_html(m, images))
    return {"metrics": metrics, "report": report}
