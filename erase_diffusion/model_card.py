"""A model card beside each patch (``huggingface_hub.ModelCard``), and a tiny Hub upload helper."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_atomic
from .patch import describe_patch

SCOPE = (
    "This patch changes only the CLIP text encoder(s); the UNet is untouched. Text-encoder-only erasure is weakest "
    "against attacks that bypass the tokenizer-to-text-encoder path: soft prompts / textual-inversion embeddings "
    "optimised for the erased concept, and adversarial prompt search, can bring the concept back. It also relies on "
    "the base model's weights matching the recorded fingerprint; on any other base the result is undefined."
)


def write_model_card(patch_path, figures: dict | None = None, output=None, license: str = "apache-2.0") -> Path:
    """Write ``<patch>.md`` (or ``output``): what was erased / protected, method, base, figures, scope, fingerprint."""
    from huggingface_hub import ModelCard, ModelCardData

    d = describe_patch(patch_path)
    figures = {**(d.get("figures") or {}), **(figures or {})}
    data = ModelCardData(license=license, library_name="diffusers", tags=["lora", "concept-erasure", "text-encoder"],
                         base_model=d["base_model"])
    fig_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(figures.items())) or "| (none measured) | |"
    kohya = "no" if d["kind"] == "full" or "clip" in d["components"] else "yes (`erase-diffusion export-kohya`)"
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
pipe.load_lora_weights("{Path(d["path"]).name}", adapter_name="erase")   # plain diffusers{" (lora kind only)" if d["kind"] == "full" else ""}
pipe.set_adapters("erase", adapter_weights=1.0)  # strength; disable_lora() for the original
```

## Measured

| figure | value |
|---|---|
{fig_rows}

## Scope and limits

{SCOPE}
"""
    card = ModelCard(content)
    out = Path(output) if output else Path(patch_path).with_suffix(".md")
    write_atomic(out, str(card))
    return out

