"""CLIPErase: the loss modules as separate pieces, the training script through `accelerate launch`, resume, and
the refusals that must come before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from erase_diffusion import cliperase
from erase_diffusion.patch import load_patch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train_erase import parse_args  # noqa: E402

from erase_diffusion.training import train  # noqa: E402

FAST = ["--max_train_steps", "3", "--train_batch_size", "8", "--validation_steps", "0", "--eval_generations", "0",
        "--report_to", "none"]


def test_forgetting_dot_is_mean_cosine_and_bounded():
    img = torch.randn(5, 16)
    assert torch.isclose(cliperase.forgetting_dot(img, img), torch.tensor(1.0))
    assert torch.isclose(cliperase.forgetting_dot(img, -img), torch.tensor(-1.0))


def test_forgetting_neg_contrastive_is_minus_contrastive():
    img, txt, s = torch.randn(6, 8), torch.randn(6, 8), torch.tensor(10.0)
    assert torch.isclose(cliperase.forgetting_neg_contrastive(img, txt, s), -cliperase.contrastive(img, txt, s))


def test_retention_prefers_matched_pairs():
    img = F.normalize(torch.randn(8, 32), dim=-1)
    s = torch.tensor(20.0)
    assert cliperase.retention(img, img, s) < cliperase.retention(img, img.roll(1, 0), s)


def test_consistency_zero_iff_same_model():
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    s = torch.tensor(10.0)
    assert cliperase.consistency(img, txt, img, txt, s).abs() < 1e-6
    assert cliperase.consistency(img, txt + torch.randn(6, 8), img, txt, s) > 1e-3


def test_token_terms():
    a = torch.randn(2, 77, 16)
    assert cliperase.token_consistency(a, a) == 0
    assert cliperase.token_forgetting(a, a + 1).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--erase_concept", ""], "no concept to erase"),
        (["--erase_concept", "circle", "--keep_concepts", "circle"], "both to erase and to keep"),
        (["--erase_concept", "teapot"], "not in the miniature world's vocabulary"),
    ],
)
def test_bad_concepts_refused_before_loading(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        train(parse_args([*argv, "--output_dir", str(tmp_path / "out"), *FAST]))


def test_output_dir_of_another_run_refused(tmp_path):
    (tmp_path / "erase_patch.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds another run"):
        train(parse_args(["--erase_concept", "circle", "--output_dir", str(tmp_path), *FAST]))


def test_clip_target_writes_a_patch_for_the_clip_model(tmp_path):
    metrics = train(parse_args(["--erase_concept", "circle", "--target", "clip", "--output_dir", str(tmp_path), *FAST]))
    patch = load_patch(tmp_path / "erase_patch.safetensors")
    assert patch.metadata["method"] == "cliperase" and patch.metadata["erased"] == ["circle"]
    assert any("self_attn.q_proj" in m for m in patch.layers["text_encoder"])
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3 == metrics["steps"]


@pytest.mark.slow
def test_accelerate_launch_and_resume(tmp_path):
    from accelerate.utils import write_basic_config

    cfg = tmp_path / "accelerate.yaml"
    write_basic_config(save_location=str(cfg))
    out = tmp_path / "run"
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), str(ROOT / "train_erase.py"),
            "--erase_concept", "circle", "--output_dir", str(out), "--train_batch_size", "8",
            "--checkpointing_steps", "2", "--validation_steps", "2", "--eval_generations", "0"]
    first = subprocess.run([*base, "--max_train_steps", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "erase_patch.safetensors").exists() and (out / "checkpoint-2").is_dir()
    assert list((out / "validation").glob("*.png")) and list((out / "logs").rglob("events.out.tfevents*"))
    # a second run into the same folder is refused unless it resumes (train_erase.py exits 2; `accelerate launch`
    # reports any failure of its child as 1)
    again = subprocess.run([*base, "--max_train_steps", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode != 0 and "already holds another run" in again.stderr
    resumed = subprocess.run([*base, "--max_train_steps", "5", "--resume_from_checkpoint", "latest"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and json.loads((out / "metrics.json").read_text())["steps"] == 5
