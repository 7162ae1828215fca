"""A CLIPErase run's output folder: refusing another run's folder, clearing what killed runs left, and checkpoints
that are written atomically and resumed from exactly.

A checkpoint is Accelerate's ``save_state`` (optimizer, RNG, the trainable weights through the hooks of
``register_trainable_state``) plus the batch generator's state, written into a hidden temp folder and renamed to
``checkpoint-<step>``. Accelerate's own ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)`` is
not used: it writes ``checkpoints/checkpoint_<i>`` in place (numbered by save, not step) and prunes with an in-place
``rmtree``, so a kill mid-write or mid-prune leaves a half checkpoint under a final name that ``latest`` would pick —
the guarantee tests/test_resume.py checks with ``kill -9``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import check_output, chmod_tree, remove_stale_temps

logger = logging.getLogger(__name__)
PATCH_NAME = "erase_patch.safetensors"
# what resume reads (Accelerate's optimizer and RNG states, our trainable weights); the batch generator's state
# (data_state_<rank>.safetensors) is there too, except in checkpoints of versions before it was saved
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.bin", "random_states_0.pkl")


def check_output_dir(config) -> None:
    """Refuse a folder that holds another run (its patch or checkpoints) unless resuming or ``--overwrite``."""
    out = Path(config.output_dir)
    # a parent that is a file, or a file where the folder goes; what an existing folder may hold is decided below
    check_output(out, folder=True, overwrite=True, option="--output_dir")
    if config.resume_from_checkpoint or not out.exists() or config.overwrite:
        return
    if (out / PATCH_NAME).exists() or any(out.glob("checkpoint-*")):
        raise ValueError(
            f"{out} already holds another run ({PATCH_NAME} or checkpoints); pass --resume_from_checkpoint latest to "
            "continue it, --overwrite to replace it, or choose another --output_dir"
        )


def resume_checkpoint(config) -> Path | None:
    """The checkpoint to resume from, decided before any model loads: ``latest`` is the newest complete one, or none
    (then the run starts from scratch, said in one line, as diffusers' training examples do)."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = checkpoints(Path(config.output_dir))
        if not found:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting from scratch",
                           config.output_dir)
        return found[-1] if found else None
    path = Path(config.resume_from_checkpoint)
    if not checkpoint_step(path) or not _complete(path):
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint folder (checkpoint-<step> "
                         f"holding {', '.join(CHECKPOINT_FILES)})")
    return path


def prepare_output_dir(config) -> None:
    """After every refusal: remove what killed runs left behind (temp checkpoint folders, partial atomic writes) and,
    with --overwrite, the previous run's checkpoints (so ``latest`` and pruning never mix two runs)."""
    out = Path(config.output_dir)
    for stale in remove_stale_temps(out) + remove_stale_temps(out / "validation"):
        logger.warning("removed %s, left by an interrupted write", stale)
    if config.overwrite and not config.resume_from_checkpoint:
        for old in out.glob("checkpoint-*"):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)  # every process of a launch runs this


def checkpoint_step(path: Path) -> int | None:
    """The step in a ``checkpoint-<step>`` folder's name (None for any other name)."""
    m = re.fullmatch(r"checkpoint-([0-9]{1,12})", path.name)
    return int(m.group(1)) if m else None


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in CHECKPOINT_FILES)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders, oldest first. Stray names (``checkpoint-foo``) and folders lacking a
    file resume reads (left by a kill before checkpoints were written atomically) are skipped."""
    found = [p for p in output_dir.glob("checkpoint-*") if checkpoint_step(p) is not None and _complete(p)]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - limit + 1)]:
        trash = old.with_name(f".{old.name}.partial-deleting")  # renamed first: a kill mid-delete leaves no half
        old.rename(trash)  # checkpoint-N, only a hidden folder that the next start removes
        shutil.rmtree(trash)


def register_trainable_state(accelerator, model) -> None:
    """Checkpoints hold the trainable weights only (LoRA: a few hundred KB), not whole CLIPs; the optimizer, RNG and
    step come from Accelerate's ``save_state``. Resuming with other trainable weights is refused."""
    unwrapped = accelerator.unwrap_model(model)
    # the adversarial CLIPErase attack embeddings (buffers) are training state too
    trainable = ({n for n, p in unwrapped.named_parameters() if p.requires_grad}
                 | {n for n, _ in unwrapped.named_buffers() if n.startswith("attack")})

    def save_hook(models, weights, out):
        if accelerator.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(models[0]).state_dict().items()
                     if k in trainable}
            save_file(state, os.path.join(out, "trainable.safetensors"))
        weights.clear()

    def load_hook(models, inp):
        state = load_file(os.path.join(inp, "trainable.safetensors"))
        target = accelerator.unwrap_model(models.pop())
        mine = target.state_dict()
        differ = set(state) ^ trainable | {k for k in set(state) & trainable if state[k].shape != mine[k].shape}
        if differ:  # other names, or other shapes (another --rank, another attack pool)
            raise ValueError(f"checkpoint {inp} holds other trainable weights than this run "
                             f"({len(differ)} differ): resume with the same settings")
        target.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: Path, step: int, generator: torch.Generator, limit: int | None) -> Path:
    """``save_state`` into a temp folder, the batch generator's state beside it, then one rename: a kill at any point
    leaves either a complete ``checkpoint-<step>`` or none (and a hidden temp folder the next start removes)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".{final.name}.partial-incomplete"  # the same name on every process
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_file({"generator": generator.get_state()}, str(tmp / f"data_state_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.environ.get("ERASE_DIFFUSION_TEST_CHECKPOINT_PAUSE"):  # lets the kill -9 test hit this very moment
            time.sleep(float(os.environ["ERASE_DIFFUSION_TEST_CHECKPOINT_PAUSE"]))
        chmod_tree(tmp)
        if final.exists():  # an incomplete leftover of the same step (complete ones are resumed from, never redone)
            stale = final.with_name(f".{final.name}.partial-stale")
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def restore_data_order(generator: torch.Generator, checkpoint: Path, process_index: int) -> None:
    """Continue the batch sequence where the checkpoint left it, so a resumed run draws the same batches as an
    uninterrupted one (re-seeding would draw others and train another patch)."""
    path = checkpoint / f"data_state_{process_index}.safetensors"
    if not path.is_file():
        logger.warning("%s has no data state (an older checkpoint): batches are re-seeded, so the result will differ "
                       "from an uninterrupted run", checkpoint)
        return
    generator.set_state(load_file(str(path))["generator"])
