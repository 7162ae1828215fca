"""How every benchmark writes its JSON: the figures plus a ``"meta"`` block that says which code produced them, how the
script was invoked and when it ran, so that a figure in the README can be traced to a run (and a hand-typed file is
one without it).

    from _record import write_json          # scripts run as `python benchmarks/bench_x.py` (benchmarks/ on sys.path)
    write_json(RESULTS / "x.json", figures)                  # adds figures["meta"]
    write_json(path, figures, merged_from=old_file_content)  # rows kept from an earlier run: its meta is kept too
    write_rows(path, figures, rows, rerun=lambda row: ..., merge=True)  # the same, the old file re-read first

``meta``: ``commit`` (``git rev-parse HEAD``), ``dirty`` (tracked files differed from that commit, outside
benchmarks/results/), ``command`` (the command line, with ``OMP_NUM_THREADS`` when set, as the README quotes it),
``started`` (when this module was first imported, i.e. when the script started) and ``finished`` (when the file was
written), both UTC ISO 8601; ``merged_from``: the meta of the file whose rows were kept, if any.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from erase_diffusion.atomic import write_json as _write_json

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

ROOT = Path(__file__).resolve().parent.parent
STARTED = datetime.now(timezone.utc)


def _now(t: datetime | None = None) -> str:
    return (t or datetime.now(timezone.utc)).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line(argv: list[str] | None = None) -> str:
    """``[OMP_NUM_THREADS=n ]python <script relative to the repository> <args>``."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        script = Path(argv[0]).resolve()
        argv[0] = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else argv[0]
    env = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    return " ".join([*env, "python", *(shlex.quote(a) for a in argv)])


def meta(merged_from: dict | None = None) -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    out = {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
           "command": command_line(), "started": _now(STARTED), "finished": _now()}
    if merged_from is not None:
        out["merged_from"] = merged_from.get("meta")  # None: the kept rows came from a file without provenance
    return out


def write_json(path, obj: dict, *, merged_from: dict | None = None) -> Path:
    """``erase_diffusion.atomic.write_json`` of ``obj`` with ``obj["meta"]`` set (``obj`` is not modified)."""
    return _write_json(path, {**obj, "meta": meta(merged_from)})


def write_rows(path, figures: dict, rows: list[dict], *, rerun, merge: bool) -> Path:
    """``write_json`` of ``{**figures, "rows": rows}``; with ``merge`` the file at ``path`` is re-read at every call
    and its rows for which ``rerun(row)`` is false are kept, so runs of other concepts or variants can share it."""
    path = Path(path)
    with _locked(path.parent):  # two runs merging into one file must not drop each other's rows
        old = json.loads(path.read_text()) if merge and path.is_file() else None
        kept = [r for r in (old or {}).get("rows", []) if not rerun(r)]
        return write_json(path, {**figures, "rows": kept + rows}, merged_from=old)


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive ``flock`` on ``directory`` (no lock file left behind); a no-op where ``fcntl`` is missing."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
