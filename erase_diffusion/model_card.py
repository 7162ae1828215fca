"""The model card beside each patch (``huggingface_hub.ModelCard``): ``patch.save_patch`` writes it as
``<patch>.md`` from the patch's description (``patch_reader.describe_patch``) and the run's figures."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .atomic import write_atomic

SCOPE = (
    "This patch changes only the CLIP text encoder(s); the UNet is untouched. Text-encoder-only erasure is weakest "
    "against attacks that bypass the tokenizer-to-text-encoder path: soft prompts / textual-inversion embeddings "
    "optimised for the erased concept, and adversarial prompt search, can bring the concept back. It also relies on "
    "the base model's weights matching the recorded fingerprint; on any other base the result is undefined."
)


def card_path(patch_path) -> Path:
    """Where the card of a patch goes: beside it, ``erase_patch.safetensors`` → ``erase_patch.md``."""
    return Path(patch_path).with_suffix(".md")


def figure_rows(figures: dict) -> list[tuple[str, object]]:
    """The numbers among ``figures`` as (name, value) rows, one level of nesting flattened (``terms.forget``);
    paths and other text are left out of the card's table."""
    rows = []
    for key, value in sorted(figures.items()):
        items = sorted(value.items()) if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((key if sub is None else f"{key}.{sub}", v))
    return rows


def write_model_card(d: dict, output, figures: dict | None = None, license: str = "apache-2.0") -> Path:
    """Write the card of the patch described by ``d`` (``describe_patch``) to ``output``, atomically: what was
    erased / protected, method, base, figures (the patch header's and ``figures``), scope, fingerprint."""
    figures = {**(d.get("figures") or {}), **(figures or {})}
    data = ModelCardData(license=license, library_name="diffusers", tags=["lora", "concept-erasure", "text-encoder"],
                         base_model=d["base_model"])
    fig_rows = "\n".join(f"| {k} | {v} |" for k, v in figure_rows(figures)) or "| (none measured) | |"
    kohya = "no" if "clip" in d["components"] else "yes (`erase-diffusion export-kohya`)"
    content = f"""---
{data.to_yaml()}
---

# Concept-erasure patch: {", ".join(d["erased"]) or "(unnamed)"}

A {d["kind"]}-mode erase-diffusion patch ({d["size_bytes"]:,} bytes, {d["parameters"]:,} parameters) for `{d["base_model"]}`.

- **Erased:** {", ".join(d["erased"]) or "-"}
- **Protected:** {", ".join(d["protected"]) or "-"}
- **Method:** {d["method"]} (settings: `{json.dumps(d["settings"], sort_keys=True)}`)
- **Components:** {", ".join(f"{c} ({n} modules)" for c, n in d["components"].items())}; rank {d["rank"]}
- **Base fingerprint(s):** {", ".join(f"{c}={fp}" for c, fp in d["fingerprints"].items()) or "-"}
- **Kohya/A1111 export:** {kohya}

## Use

```python
pipe.load_lora_weights("{Path(d["path"]).name}", adapter_name="erase")   # plain diffusers
pipe.set_adapters("erase", adapter_weights=1.0)  # strength; disable_lora() for the original
```

## Measured

| figure | value |
|---|---|
{fig_rows}

## Scope and limits

{SCOPE}
"""
    out = Path(output)
    write_atomic(out, str(ModelCard(content)))
    return out

