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
