"""Checkpoints and resume: written atomically, ``latest`` picks the newest complete one (stray names and leftovers of
killed writes skipped), no checkpoint means a fresh start, and a run killed with SIGKILL — at a random step or in the
middle of a checkpoint write — resumes to the same patch as an uninterrupted run."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from erase_diffusion.checkpoints import CHECKPOINT_FILES, checkpoints, prepare_output_dir, resume_checkpoint
from erase_diffusion.config import CLIPEraseConfig

ROOT = Path(__file__).resolve().parents[1]
# --target clip: the checkpoint / resume path is the pipeline target's, with less to load per process
RUN = ["--erase_concept", "circle", "--target", "clip", "--train_batch_size", "4", "--checkpointing_steps", "2",
       "--checkpoints_total_limit", "2", "--validation_steps", "0", "--eval_generations", "0", "--report_to", "none"]


def fake_checkpoint(folder: Path, files=CHECKPOINT_FILES) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_bytes(b"x")
    return folder


def test_latest_skips_stray_and_incomplete_checkpoints(tmp_path, caplog):
    args = CLIPEraseConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(args) is None  # nothing yet: a fresh start, said once
    assert sum("starting from scratch" in r.getMessage() for r in caplog.records) == 1
    good = fake_checkpoint(tmp_path / "checkpoint-3")
    fake_checkpoint(tmp_path / "checkpoint-10", files=CHECKPOINT_FILES[:1])  # a kill before atomic checkpoints
    (tmp_path / "checkpoint-12").mkdir()  # empty
    fake_checkpoint(tmp_path / "checkpoint-foo")
    (tmp_path / "checkpoint-20").write_text("a file")
    assert checkpoints(tmp_path) == [good] and resume_checkpoint(args) == good
    for bad in ("checkpoint-10", "checkpoint-foo", "nope"):
        with pytest.raises(ValueError, match="not a complete checkpoint"):
            resume_checkpoint(CLIPEraseConfig(output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path / bad)))


def test_stale_temp_files_and_folders_are_removed_on_start(tmp_path):
    fake_checkpoint(tmp_path / ".checkpoint-4.partial-incomplete")
    (tmp_path / ".erase_patch.safetensors.partial-abcd1234.tmp").write_bytes(b"half")
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / ".step-000002.png.partial-x1y2z3w4.png").write_bytes(b"half")
    keep = fake_checkpoint(tmp_path / "checkpoint-2")
    (tmp_path / ".hidden_but_mine").write_text("kept")
    prepare_output_dir(CLIPEraseConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden_but_mine", "checkpoint-2", "validation"]
    assert not list((tmp_path / "validation").iterdir()) and keep.is_dir()


def run_to_end(out: Path, steps: int, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "train_erase.py"), *RUN, "--max_train_steps", str(steps),
                          "--output_dir", str(out), *extra], capture_output=True, text=True, env=env, cwd=out.parent,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def kill_when(out: Path, steps: int, ready, delay: float = 0.0, env: dict | None = None) -> bool:
    """Start a run, SIGKILL it once ``ready()`` holds (plus ``delay`` seconds); True if it was killed, False if it
    finished first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_erase.py"), *RUN, "--max_train_steps", str(steps),
                             "--output_dir", str(out), "--resume_from_checkpoint", "latest"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=out.parent)
    try:
        deadline = time.monotonic() + 900
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        proc.kill()  # SIGKILL: no cleanup, no atexit, no finally
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def patch_difference(a: Path, b: Path) -> float:
    pa, pb = load_file(str(a)), load_file(str(b))
    assert pa.keys() == pb.keys()
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


@pytest.mark.slow
def test_kill_9_mid_checkpoint_and_at_a_random_step_then_resume_gives_the_same_patch(tmp_path):
    steps = 6
    reference = tmp_path / "uninterrupted"
    run_to_end(reference, steps)
    out = tmp_path / "killed"
    # 1. killed while checkpoint-4 is being written (paused just before its rename)
    partial = out / ".checkpoint-4.partial-incomplete"
    assert kill_when(out, steps, lambda: (partial / "data_state_0.safetensors").is_file(),
                     env={"ERASE_DIFFUSION_TEST_CHECKPOINT_PAUSE": "30"})
    assert partial.is_dir() and not (out / "checkpoint-4").exists() and checkpoints(out) == [out / "checkpoint-2"]
    # 2. the resume is killed at a random moment after its first new checkpoint
    delay = random.Random(os.getpid()).uniform(0.0, 1.0)
    assert kill_when(out, steps, lambda: (out / "checkpoint-4").is_dir(), delay=delay)
    assert not partial.exists()  # the stale temp folder went on start
    # 3. resumed to the end: the same patch as the uninterrupted run
    log = run_to_end(out, steps, "--resume_from_checkpoint", "latest")
    assert "resumed from" in log
    assert patch_difference(out / "erase_patch.safetensors", reference / "erase_patch.safetensors") <= 1e-6
    assert not list(out.glob(".*partial*"))
