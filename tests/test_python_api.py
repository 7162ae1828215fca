"""The README's "Python API" snippets run as written (CLIPErase with fewer steps, through ``CLIPEraseConfig``'s
documented fields), stay within five lines, and write what they promise: a patch and its model card. The CLIPErase
call gives the same patch tensors as ``train_erase.py`` with the same settings."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

import erase_diffusion
from erase_diffusion.patch_reader import load_patch
from erase_diffusion.training import main

ROOT = Path(__file__).resolve().parents[1]
# the CLIPErase snippet's run, shortened: every one of these is a documented CLIPEraseConfig field / train_erase.py flag
FAST = {"max_train_steps": 3, "train_batch_size": 8, "validation_steps": 0, "report_to": "none"}


def snippets() -> list[str]:
    """The ```python blocks of the README's "## Python API" section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_each_method_is_at_most_five_lines():
    blocks = snippets()
    assert len(blocks) == 2 and "import erase" in blocks[0] and "train_cliperase" in blocks[1]
    for block in blocks:
        assert len([line for line in block.splitlines() if line.strip()]) <= 5, block


def test_closed_form_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(snippets()[0], {})
    patch = load_patch(tmp_path / "circle.safetensors")
    assert patch.metadata["method"] == "nullspace" and patch.metadata["erased"] == ["circle"]
    assert "circle" in (tmp_path / "circle.md").read_text()


def _sha256(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["erase_diffusion.sha256"]


@pytest.mark.slow
def test_cliperase_snippet_is_the_command_line_run(tmp_path, monkeypatch):
    config_type = erase_diffusion.CLIPEraseConfig
    monkeypatch.setattr(erase_diffusion, "CLIPEraseConfig", lambda **kw: replace(config_type(**kw), **FAST))
    monkeypatch.chdir(tmp_path)
    exec(snippets()[1], {})
    run = tmp_path / "runs" / "circle"
    patch = load_patch(run / "erase_patch.safetensors")
    assert patch.metadata["method"] == "cliperase" and patch.metadata["settings"]["max_train_steps"] == 3
    card = (run / "erase_patch.md").read_text()
    assert "circle" in card and "| steps | 3 |" in card
    flags = [f"--{k}={v}" for k, v in FAST.items()]
    main(["--erase_concept", "circle", "--output_dir", str(tmp_path / "cli"), "--eval_generations", "0", *flags])
    cli = load_patch(tmp_path / "cli" / "erase_patch.safetensors").metadata
    assert _sha256(tmp_path / "cli" / "erase_patch.safetensors") == _sha256(run / "erase_patch.safetensors")
    settings = {k: v for k, v in patch.metadata["settings"].items() if k not in ("output_dir", "eval_generations")}
    assert settings == {k: v for k, v in cli["settings"].items() if k not in ("output_dir", "eval_generations")}
