"""The README's main command, timed from a fresh clone: clone, install, run — each step timed on its own.

    python benchmarks/bench_first_run.py [--reuse_venv [PATH]] [--keep] [--output FILE]

1. ``git clone`` of this repository's committed HEAD into a temporary folder (what a newcomer gets);
2. install, in the clone: ``python -m venv .venv && pip install "torch==2.13.0" -e .`` — or, with
   ``--reuse_venv``, a new ``.venv`` that sees an existing environment's packages (a ``.pth`` line; default: this
   checkout's ``.venv``) plus ``pip install --no-deps -e .`` of the clone, to skip the minutes of dependency
   install; the table says which;
3. run, in the clone with its ``.venv/bin`` first on PATH:
   ``accelerate launch train_erase.py --erase_concept circle --output_dir runs/circle``.

``OMP_NUM_THREADS`` / ``ERASE_DIFFUSION_THREADS`` are removed from the steps' environment (a newcomer's shell has
neither; the project's thread guard decides), unless ``--keep_thread_env``. The machine is shared: the load before
and after is recorded. Writes benchmarks/results/first_run.json (``--output``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_threads import git_commit, machine_state  # noqa: E402

RUN = "accelerate launch train_erase.py --erase_concept circle --output_dir runs/circle"
INSTALL = 'python -m venv .venv && pip install "torch==2.13.0" -e .'
RUN_TARGET_S = 120
ACCELERATE_SCRIPT = """#!{python}
import sys
from accelerate.commands.accelerate_cli import main
sys.exit(main())
"""


def step(name: str, cmd: list[str] | str, cwd: Path, env: dict, log: Path, timeout: float) -> dict:
    """Run one step, output to ``log``; wall time, exit code, the log's tail on failure."""
    shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
    print(f"[{name}] {shown}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {shown}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                shell=isinstance(cmd, str)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.perf_counter() - t0
    out = {"command": shown, "seconds": secs, "returncode": rc}
    if rc != 0:
        out["log_tail"] = log.read_text()[-3000:]
        print(out["log_tail"], file=sys.stderr)
    return out


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    if not found:
        raise SystemExit(f"{venv} has no lib/python*/site-packages")
    return found[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reuse_venv", nargs="?", const=str(ROOT / ".venv"), default=None,
                    help="skip the dependency install: the clone's .venv sees this environment's packages "
                         "(default when given without a value: this checkout's .venv)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("--keep_thread_env", action="store_true", help="pass OMP_NUM_THREADS etc. through")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    ap.add_argument("--no_run", action="store_true", help="clone and install only (checks the harness)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "first_run.json"))
    args = ap.parse_args(argv)

    from benchmarks._record import write_json  # adds the "meta" block (commit, command, started, finished)

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    before = machine_state()
    work = Path(tempfile.mkdtemp(prefix="first-run-"))
    clone = work / "erase-diffusion"
    log = work / "log.txt"
    env = dict(os.environ)
    if not args.keep_thread_env:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ERASE_DIFFUSION_THREADS"):
            env.pop(k, None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))  # not this benchmark's venv
    base_python = shutil.which("python3", path=env["PATH"]) or sysconfig.get_config_var("BINDIR") + "/python3"
    steps, mode = {}, None
    try:
        steps["clone"] = step("clone", ["git", "clone", "--quiet", str(ROOT), str(clone)], work, env, log,
                              args.timeout)
        if steps["clone"]["returncode"] != 0:
            raise RuntimeError("clone failed")
        venv = clone / ".venv"
        run_env = dict(env, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
        if args.reuse_venv:
            reused = Path(args.reuse_venv).resolve()
            mode = f"reused packages of {reused} + pip install --no-deps -e . of the clone"
            # the reused venv's interpreter makes the new venv, so the .pth'd packages match its Python
            cmd = (f"{shlex.quote(str(reused / 'bin' / 'python'))} -m venv --without-pip .venv"
                   f" && echo {shlex.quote(str(site_packages(reused)))} > \"$(.venv/bin/python -c "
                   f"'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/_reused.pth\""
                   " && .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .")
            steps["install"] = step("install", cmd, clone, run_env, log, args.timeout)
            script = venv / "bin" / "accelerate"  # pip made no console script without the dependency install
            script.write_text(ACCELERATE_SCRIPT.format(python=venv / "bin" / "python"))
            script.chmod(0o755)
        else:
            mode = f"fresh: {INSTALL}"
            cmd = (f"{shlex.quote(base_python)} -m venv .venv && .venv/bin/python -m pip install -q "
                   '"torch==2.13.0" -e .')
            steps["install"] = step("install", cmd, clone, run_env, log, args.timeout)
        if steps["install"]["returncode"] != 0:
            raise RuntimeError("install failed")
        if args.no_run:
            raise RuntimeError("--no_run: the run step was skipped")
        steps["run"] = step("run", RUN, clone, run_env, log, args.timeout)
        patch = clone / "runs" / "circle" / "erase_patch.safetensors"
        steps["run"]["patch_written"] = patch.exists()
        steps["run"]["patch_bytes"] = patch.stat().st_size if patch.exists() else None
    except RuntimeError as err:
        print(f"bench_first_run: {err}", file=sys.stderr)
    finally:
        after = machine_state()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nThe README's main command from a fresh clone (install: {mode if 'install' in steps else '-'}); load "
          f"before {' '.join(before['loadavg'][:3])}, after {' '.join(after['loadavg'][:3])}\n")
    print("| step | command | seconds | ok |")
    print("|---|---|---|---|")
    for name in ("clone", "install", "run"):
        if name in steps:
            s = steps[name]
            cmd = RUN if name == "run" else (INSTALL if name == "install" and not args.reuse_venv else s["command"])
            if name == "install" and args.reuse_venv:
                cmd = "reuse packages (--reuse_venv), pip install --no-deps -e ."
            print(f"| {name} | `{cmd}` | {s['seconds']:.1f} | {'yes' if s['returncode'] == 0 else s['returncode']} |")
    if "run" in steps:
        verdict = "met" if steps["run"]["seconds"] <= RUN_TARGET_S and steps["run"]["returncode"] == 0 else "missed"
        print(f"\nrun after install: {steps['run']['seconds']:.1f} s (target ≤ {RUN_TARGET_S} s: {verdict})")
    if args.keep:
        print(f"clone kept at {clone} (log: {log})")

    write_json(args.output, {
        "benchmark": "first_run", "time": started, "git_commit": git_commit(), "command": [sys.executable] + sys.argv,
        "install_mode": "reuse" if args.reuse_venv else "fresh", "install_description": mode,
        "readme_command": f"{INSTALL} && {RUN}", "run_target_s": RUN_TARGET_S,
        "thread_env_removed": not args.keep_thread_env, "machine_before": before, "machine_after": after,
        "steps": steps,
    })
    print(f"wrote {args.output}")
    ok = all(s["returncode"] == 0 for s in steps.values())
    return 0 if ok and ("run" in steps or args.no_run) else 1


if __name__ == "__main__":
    raise SystemExit(main())
