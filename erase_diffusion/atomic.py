"""Atomic file writes: a temp file beside the target, then ``os.replace``. A reader sees the old file or the new
one, never half of one; on error the temp file is removed and the target is untouched."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


# every temp name below contains this, so that a later run can tell (and remove) what a killed write left behind
PARTIAL = ".partial-"


def remove_stale_temps(folder) -> list[Path]:
    """Remove what killed atomic writes left in ``folder`` (hidden ``.<name>.partial-*`` files and folders); returns
    them. Only for folders no other process is writing into at the same time (a run's own output folder)."""
    folder = Path(folder)
    removed = []
    for p in folder.glob(f".*{PARTIAL}*") if folder.is_dir() else []:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_like_open(path, directory: bool = False) -> None:
    """mkstemp / mkdtemp (and safetensors' save_file) create 0600 / 0700 whatever the umask; give the file the mode
    ``open()`` would (0666 or 0777 minus the umask), so a shared model folder can read what was written."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def chmod_tree(folder) -> None:
    """``_chmod_like_open`` for a folder we just filled, and everything in it (links are left alone)."""
    _chmod_like_open(folder, directory=True)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                _chmod_like_open(p, directory=name in dirs)


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temp path in ``path``'s folder to write to; it replaces ``path`` when the block ends without error.

    ``suffix`` matters to writers that pick a format from the name (PIL: ``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _chmod_like_open(tmp)  # after the writer: some (safetensors) replace the file and make it 0600 again
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(final):
    """Yield a temp folder beside ``final`` to fill; on success it replaces ``final`` (an existing folder is moved
    aside first and removed after), on error it is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}", dir=final.parent))
    try:
        yield tmp
        chmod_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}{PARTIAL}old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path, data: bytes | str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_output(path, *, overwrite: bool = False, folder: bool = False, option: str = "output") -> Path:
    """Refuse, before any work, an output that cannot or should not be written: a parent that is a file, a file where
    a folder goes (or the reverse), or an existing output without ``overwrite`` (an empty folder is no output).
    Raises ValueError with one line; writes nothing."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
            break
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{option} {path} is a dangling symlink")
    if not path.exists():
        return path
    if folder and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, but a folder is written there")
    if not folder and path.is_dir():
        raise ValueError(f"{option} {path} is a folder, but a file is written there")
    if folder and not any(path.iterdir()):
        return path
    if not overwrite:
        raise ValueError(f"{option} {path} already exists; pass --overwrite to replace it")
    return path
