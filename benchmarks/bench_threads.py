"""Threads: one miniature-world generation alone and two generation processes side by side, with torch's default
CPU threads and with the project's guard (erase_diffusion.threads.configure_threads).

    python benchmarks/bench_threads.py [--repeats 5] [--steps 20]

Each scenario starts fresh worker processes (OMP_NUM_THREADS, OMP_WAIT_POLICY and ERASE_DIFFUSION_THREADS removed
from their environment, so "default" is torch's own choice and "guard" is the guard's: thread count and, imported
before torch as in the entry points, OMP_WAIT_POLICY=PASSIVE). A worker loads the bundled pipeline,
generates one warm-up image, waits until every worker of its scenario is ready, then times ``--repeats`` generations
of one 64×64 image at ``--steps`` steps and reports the median; it keeps generating (untimed) until its partner has
finished too, so a pair's timed images always run side by side. The ratio is a pair's median over the same mode's
median alone; the target is ≤ 2.5×. The machine is shared, so the load before and after is recorded with the results.
Writes benchmarks/results/threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a solid red circle"
MODES = ("default", "guard", "guard_all_cores")
LABELS = {"default": "torch default", "guard": "guard (`configure_threads`)",
          "guard_all_cores": "guard's wait policy, all cores (`ERASE_DIFFUSION_THREADS=<cores>`)"}
TARGET = 2.5


def worker(mode: str, repeats: int, steps: int, sync: Path, index: int, count: int) -> None:
    decision = None
    if mode.startswith("guard"):  # as in the entry points: erase_diffusion (hence .threads) is imported before torch
        from erase_diffusion.threads import configure_threads

        decision = configure_threads()
    import torch  # "default": torch first, so OpenMP keeps its own wait policy

    from erase_diffusion.models import load_pipeline

    pipe = load_pipeline("miniworld")
    pipe.set_progress_bar_config(disable=True)

    def one(seed):
        t0 = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
        return time.perf_counter() - t0

    one(0)  # warm-up
    (sync / f"ready{index}").touch()
    _wait(sync, "ready", count)
    times = [one(1 + i) for i in range(repeats)]
    (sync / f"done{index}").touch()
    extra = 0
    while not _all(sync, "done", count):  # keep the partner company until it has its figures too
        one(100 + extra)
        extra += 1
    print(json.dumps({"mode": mode, "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                      "decision": decision, "times": times, "median": statistics.median(times),
                      "untimed_after": extra}), flush=True)


def _all(sync: Path, tag: str, count: int) -> bool:
    return all((sync / f"{tag}{i}").exists() for i in range(count))


def _wait(sync: Path, tag: str, count: int, timeout: float = 900) -> None:
    end = time.time() + timeout
    while not _all(sync, tag, count) and time.time() < end:
        time.sleep(0.05)


def scenario(mode: str, count: int, repeats: int, steps: int, timeout: float) -> list[dict]:
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ERASE_DIFFUSION_THREADS", "OMP_WAIT_POLICY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if mode == "guard_all_cores":  # no load-aware count: what the wait policy alone does
        from erase_diffusion.threads import available_cores

        env["ERASE_DIFFUSION_THREADS"] = str(available_cores())
    env["TQDM_DISABLE"] = "1"
    with tempfile.TemporaryDirectory() as sync:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, "--repeats", str(repeats),
                                   "--steps", str(steps), "--sync", sync, "--index", str(i), "--count", str(count)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                 for i in range(count)]
        out = []
        for p in procs:
            try:
                stdout, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise SystemExit(f"{mode} ×{count}: a worker ran past {timeout:.0f} s")
            if p.returncode != 0:
                raise SystemExit(f"{mode} ×{count}: a worker failed (exit {p.returncode})")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def machine_state() -> dict:
    """Load average and the busiest other processes, so a reader can judge how quiet the machine was."""
    state = {"loadavg": open("/proc/loadavg").read().split()[:4]}
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu", "--no-headers"], capture_output=True,
                            text=True, timeout=10).stdout.splitlines()
        state["top"] = [" ".join(line.split()[:2] + [" ".join(line.split()[2:])[:100]]) for line in ps[:5]]
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per process (median; >= 3)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per scenario")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "threads.json"))
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--sync", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.repeats, args.steps, Path(args.sync), args.index, args.count)
        return 0
    if args.repeats < 3:
        ap.error("--repeats must be at least 3")

    from benchmarks._record import write_json  # adds the "meta" block (commit, command, started, finished)
    from erase_diffusion.threads import available_cores

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    before = machine_state()
    rows = {}
    for mode in MODES:  # alone first, then the pair, per mode
        for count in (1, 2):
            t0 = time.perf_counter()
            res = scenario(mode, count, args.repeats, args.steps, args.timeout)
            rows[f"{mode} x{count}"] = {"mode": mode, "processes": count, "workers": res,
                                        "median": statistics.median(r["median"] for r in res),
                                        "worst": max(r["median"] for r in res),
                                        "wall_s": time.perf_counter() - t0}
            print(f"  {mode} ×{count}: threads {[r['threads'] for r in res]}, medians "
                  f"{[round(r['median'], 3) for r in res]} s", flush=True)
    after = machine_state()
    for mode in MODES:
        alone, pair = rows[f"{mode} x1"], rows[f"{mode} x2"]
        pair["ratio_worst_to_alone"] = pair["worst"] / alone["median"]

    load = f"load before {' '.join(before['loadavg'][:3])}, after {' '.join(after['loadavg'][:3])}"
    print(f"\none {args.steps}-step 64×64 generation, median of {args.repeats} per process; "
          f"{available_cores()} cores; {load}\n")
    print("| threads | alone: threads / s | two side by side: threads / s each | slower process vs alone | target |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        alone, pair = rows[f"{mode} x1"], rows[f"{mode} x2"]
        label = LABELS[mode]
        each = " / ".join(f"{w['threads']}: {w['median']:.3f}" for w in pair["workers"])
        print(f"| {label} | {alone['workers'][0]['threads']}: {alone['median']:.3f} | {each} | "
              f"{pair['ratio_worst_to_alone']:.2f}× | ≤ {TARGET}× |")
    g, d = rows["guard x2"]["worst"], rows["default x2"]["worst"]
    print(f"\nside by side, guard vs default: {d / g:.1f}× faster per image")

    write_json(args.output, {
        "benchmark": "threads", "time": started, "git_commit": git_commit(), "command": [sys.executable] + sys.argv,
        "repeats": args.repeats, "steps": args.steps, "cores": available_cores(), "target_ratio": TARGET,
        "machine_before": before, "machine_after": after, "scenarios": rows,
    })
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
