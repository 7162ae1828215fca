"""Atomic writes: the target is replaced whole or not at all, and no temp file is left behind."""

import json

import pytest

from erase_diffusion.atomic import atomic_path, write_json


def test_write_json_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "patch.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["patch.safetensors"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    from erase_diffusion.atomic import atomic_dir

    final = tmp_path / "pipeline"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("killed mid-save")
    assert [p.name for p in final.iterdir()] == ["a.txt"]
    with atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("2")
    assert [p.name for p in final.iterdir()] == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_written_files_and_folders_follow_the_umask(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from erase_diffusion.atomic import atomic_dir

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
        with atomic_dir(tmp_path / "pipe") as tmp:
            (tmp / "x").write_text("1")
            save_file({"a": torch.zeros(1)}, str(tmp / "w.safetensors"))  # safetensors itself writes 0600
        save_patch_like = tmp_path / "p.safetensors"
        with atomic_path(save_patch_like) as tmp:
            save_file({"a": torch.zeros(1)}, str(tmp))
        os.umask(0o007)
        write_json(tmp_path / "g.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644  # mkstemp alone gives 0600
    assert stat.S_IMODE((tmp_path / "pipe").stat().st_mode) == 0o755  # mkdtemp alone gives 0700
    assert stat.S_IMODE((tmp_path / "pipe" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(save_patch_like.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.json").stat().st_mode) == 0o660
