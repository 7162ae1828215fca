"""Every bad command line is a clean refusal: one line on stderr, exit status 2, before any model loads, nothing
written; an existing output is refused unless --overwrite. ``run_cli_cases`` is shared with
``benchmarks/bench_robustness_io.py``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


class Expensive(AssertionError):
    """Raised by the stand-ins for model loading: a refusal must come before it."""


def _write_patches(folder: Path) -> dict[str, Path]:
    from tiny_models import sd_pipeline

    from erase_diffusion.patch import fingerprint, write_patch
    from erase_diffusion.patch_format import LoraFactors

    te = sd_pipeline().text_encoder
    q = te.encoder.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    good = folder / "good.safetensors"
    write_patch(good, {"text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": LoraFactors(
        torch.randn(2, q.in_features, generator=g), torch.randn(q.out_features, 2, generator=g))}}, method="t",
        settings={}, erased=["circle"], protected=[], base_model="tiny", fingerprints={"text_encoder": fingerprint(te)})
    with safe_open(str(good), framework="pt") as fh:
        tensors, meta = {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())
    adapter = json.loads(meta["lora_adapter_metadata"])
    adapter["text_encoder.lora_alpha"] = 0
    alpha0 = folder / "alpha0.safetensors"
    save_file(tensors, str(alpha0), metadata={**meta, "lora_adapter_metadata": json.dumps(adapter)})
    garbage = folder / "garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    a_file = folder / "a_file"
    a_file.write_text("not a folder")
    existing_dir = folder / "existing_dir"
    existing_dir.mkdir()
    (existing_dir / "keep.txt").write_text("x")
    existing = folder / "existing.safetensors"
    existing.write_bytes(good.read_bytes())
    eval_dir = folder / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text("{}")
    run_dir = folder / "run"
    run_dir.mkdir()
    (run_dir / "erase_patch.safetensors").write_bytes(b"x")
    return {"good": good, "alpha0": alpha0, "garbage": garbage, "file": a_file, "dir": existing_dir,
            "existing": existing, "eval": eval_dir, "run": run_dir, "new": folder / "new_output"}


def cases(f: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(name, argv, a word the one-line message must contain); ``argv[0]`` 'train' is train_erase.py."""
    g, file_, new = str(f["good"]), str(f["file"]), str(f["new"])
    return [
        ("erase: output parent is a file", ["erase", "circle", "--output", f"{file_}/p.safetensors"], "is a file"),
        ("erase: output is a directory", ["erase", "circle", "--output", str(f["dir"])], "is a folder"),
        ("erase: output exists", ["erase", "circle", "--output", str(f["existing"])], "--overwrite"),
        ("erase: anchor is the concept", ["erase", "circle", "--anchor", "Circle", "--output", new], "--anchor"),
        ("erase: strength 1e9", ["erase", "circle", "--strength", "1e9", "--output", new], "--strength"),
        ("erase: strength nan", ["erase", "circle", "--strength", "nan", "--output", new], "--strength"),
        ("erase: rank 0", ["erase", "circle", "--rank", "0", "--output", new], "--rank"),
        ("erase: empty concept", ["erase", " ", "--output", new], "empty"),
        ("export-kohya: output is the input", ["export-kohya", g, g], "is the input"),
        ("export-kohya: output exists", ["export-kohya", g, str(f["existing"])], "--overwrite"),
        ("export-kohya: output parent is a file", ["export-kohya", g, f"{file_}/k.safetensors"], "is a file"),
        ("export-kohya: malformed input", ["export-kohya", str(f["garbage"]), new], "safetensors"),
        ("inspect: random bytes", ["inspect", str(f["garbage"])], "safetensors"),
        ("inspect: a directory", ["inspect", str(f["dir"])], "regular file"),
        ("inspect: missing file", ["inspect", str(f["new"])], "does not exist"),
        ("inspect: lora_alpha 0", ["inspect", str(f["alpha0"])], "lora_alpha"),
        ("bake: output exists", ["bake", "--patch", g, "--output_dir", str(f["dir"])], "--overwrite"),
        ("bake: output parent is a file", ["bake", "--patch", g, "--output_dir", f"{file_}/out"], "is a file"),
        ("bake: output is a file", ["bake", "--patch", g, "--output_dir", file_], "is a file"),
        ("bake: malformed patch", ["bake", "--patch", str(f["garbage"]), "--output_dir", new], "safetensors"),
        ("bake: lora_alpha 0", ["bake", "--patch", str(f["alpha0"]), "--output_dir", new], "lora_alpha"),
        ("bake: strength 1e9", ["bake", "--patch", g, "--strength", "1e9", "--output_dir", new], "--strength"),
        ("bake: strength nan", ["bake", "--patch", g, "--strength", "nan", "--output_dir", new], "--strength"),
        ("bake: two strengths, one patch", ["bake", "--patch", g, "--strength", "1", "--strength", "0.5",
                                            "--output_dir", new], "--strength"),
        ("sample: guidance nan", ["sample", "--guidance", "nan", "--output", f"{new}.png"], "--guidance"),
        ("sample: steps 0", ["sample", "--steps", "0", "--output", f"{new}.png"], "--steps"),
        ("sample: malformed patch", ["sample", "--patch", str(f["garbage"]), "--output", f"{new}.png"], "safetensors"),
        ("sample: strength -1", ["sample", "--patch", g, "--strength", "-1", "--output", f"{new}.png"], "--strength"),
        ("sample: output parent is a file", ["sample", "--output", f"{file_}/s.png"], "is a file"),
        ("evaluate: output exists", ["evaluate", "--erase_concept", "circle", "--output_dir", str(f["eval"])],
         "--overwrite"),
        ("evaluate: output parent is a file", ["evaluate", "--erase_concept", "circle", "--output_dir", f"{file_}/e"],
         "is a file"),
        ("evaluate: malformed patch", ["evaluate", "--patch", str(f["garbage"]), "--erase_concept", "circle",
                                       "--output_dir", new], "safetensors"),
        ("evaluate: steps 0", ["evaluate", "--erase_concept", "circle", "--steps", "0", "--output_dir", new], "--steps"),
        ("evaluate: unknown concept", ["evaluate", "--erase_concept", "teapot", "--output_dir", new], "teapot"),
        ("train: batch size 0", ["train", "--erase_concept", "circle", "--train_batch_size", "0", "--output_dir", new],
         "--train_batch_size"),
        ("train: checkpointing_steps 0", ["train", "--erase_concept", "circle", "--checkpointing_steps", "0",
                                          "--output_dir", new], "--checkpointing_steps"),
        ("train: max_train_steps 0", ["train", "--erase_concept", "circle", "--max_train_steps", "0",
                                      "--output_dir", new], "--max_train_steps"),
        ("train: anchor is the concept", ["train", "--erase_concept", "circle", "--anchor_concept", "circle",
                                          "--output_dir", new], "--anchor_concept"),
        ("train: learning rate nan", ["train", "--erase_concept", "circle", "--learning_rate", "nan",
                                      "--output_dir", new], "--learning_rate"),
        ("train: output parent is a file", ["train", "--erase_concept", "circle", "--output_dir", f"{file_}/run"],
         "is a file"),
        ("train: output holds another run", ["train", "--erase_concept", "circle", "--output_dir", str(f["run"])],
         "--overwrite"),
        ("train: explicit checkpoint missing", ["train", "--erase_concept", "circle", "--resume_from_checkpoint",
                                                str(f["new"] / "checkpoint-5"), "--output_dir", new], "checkpoint"),
    ]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns if p.is_file() else None) for p in folder.rglob("*")}


@contextlib.contextmanager
def no_models():
    """Model loading and the expensive entry points raise ``Expensive``: a refusal has to come first."""
    import erase_diffusion.evaluate as evaluate
    import erase_diffusion.models as models
    import erase_diffusion.nullspace as nullspace
    import erase_diffusion.training as training

    def expensive(*a, **k):
        raise Expensive("reached expensive work before refusing")

    saved = [(models, "load_pipeline"), (models, "load_clip"), (nullspace, "erase"), (evaluate, "evaluate"),
             (training, "load_towers"), (training, "Accelerator")]
    originals = [getattr(m, n) for m, n in saved]
    try:
        for m, n in saved:
            setattr(m, n, expensive)
        yield
    finally:
        for (m, n), o in zip(saved, originals):
            setattr(m, n, o)


def run_case(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of one command line, in this process."""
    from erase_diffusion.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if argv[0] == "train":
            from erase_diffusion.training import main as train_main

            try:
                train_main(argv[1:] + ["--report_to", "none"])
                code = 0
            except (ValueError, FloatingPointError, OSError) as e:  # what train_erase.py turns into exit status 2
                print(f"train_erase.py: error: {e}", file=sys.stderr)
                code = 2
        else:
            code = main(argv)
    return code, err.getvalue()


def run_cli_cases(folder: Path) -> list[dict]:
    """Run every case; one dict per case with what was checked."""
    import logging

    files = _write_patches(folder)
    results = []
    logging.disable(logging.WARNING)  # the "starting from scratch" line is not an error line
    try:
        with no_models():
            for name, argv, word in cases(files):
                before = _tree(folder)
                try:
                    code, err = run_case(argv)
                    crash = None
                except BaseException as e:  # noqa: BLE001 - counted: Expensive, tracebacks, SystemExit
                    code, err, crash = None, "", f"{type(e).__name__}: {e}"
                lines = [line for line in err.splitlines() if line.strip()]
                results.append({"case": name, "exit": code, "lines": len(lines), "message": lines[-1] if lines else "",
                                "mentions": word in err, "nothing_written": _tree(folder) == before, "crash": crash})
    finally:
        logging.disable(logging.NOTSET)
    return results


def test_every_bad_command_line_is_a_clean_refusal(tmp_path):
    results = run_cli_cases(tmp_path)
    bad = [r for r in results if not (r["exit"] == 2 and r["lines"] == 1 and r["mentions"] and r["nothing_written"]
                                      and r["crash"] is None)]
    assert not bad, json.dumps(bad, indent=1)
    assert len(results) >= 40


def test_overwrite_replaces_and_train_erase_exits_2_with_one_line(tmp_path):
    import subprocess

    from erase_diffusion.cli import main

    f = _write_patches(tmp_path)
    out = tmp_path / "k.safetensors"
    out.write_bytes(b"old")
    assert main(["export-kohya", str(f["good"]), str(out)]) == 2 and out.read_bytes() == b"old"  # exists: kept
    assert main(["export-kohya", str(f["good"]), str(out), "--overwrite"]) == 0
    from safetensors.torch import load_file

    assert any(k.endswith(".lora_up.weight") for k in load_file(str(out)))
    res = subprocess.run([sys.executable, str(ROOT / "train_erase.py"), "--erase_concept", "circle",
                          "--checkpointing_steps", "0", "--output_dir", str(tmp_path / "r")], capture_output=True,
                         text=True, timeout=300)
    ours = [line for line in res.stderr.splitlines() if not line.startswith("[transformers]")]  # torchvision notice
    assert res.returncode == 2 and ours == ["train_erase.py: error: --checkpointing_steps must be at least 1, got 0"]
    assert not (tmp_path / "r").exists()
