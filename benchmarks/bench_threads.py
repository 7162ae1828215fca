"""Threads: one miniature-world generation alone and two generation processes side by side, with torch's default
CPU threads and with the project's guard (erase_diffusion.threads.configure_threads).

    python benchmarks/bench_threads.py [--repeats 3] [--steps 20]

Per mode, three worker processes load the bundled pipeline and wait: one started on its own (its thread decision is
the one a job started alone gets), then two started together (the decision two jobs started at once get). Workers
start with OMP_NUM_THREADS, OMP_WAIT_POLICY and ERASE_DIFFUSION_THREADS removed from their environment, so
"default" is torch's own choice and "guard" is the guard's (thread count and, imported before torch as in the entry
points, OMP_WAIT_POLICY=PASSIVE). Then rounds alternate — the lone worker generates one image while the others
sleep, then the pair generate one image each at the same moment — ``--repeats`` times after a warm-up round, so a
change in the machine's background load hits both sides alike. One image is 64×64 at ``--steps`` steps. The ratio
is the slower pair member's median over the lone worker's median; the target is ≤ 2.5×. The machine is shared, so
its load and busiest processes before and after are recorded. Writes benchmarks/results/threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def worker(mode: str, steps: int) -> None:
    """Load, report ready, then one timed generation per 'go SEED' line on stdin."""
    decision = None
    if mode.startswith("guard"):  # as in the entry points: erase_diffusion (hence .threads) is imported before torch
        from erase_diffusion.threads import configure_threads

        decision = configure_threads()
    import torch  # "default": torch first, so OpenMP keeps its own wait policy

    from erase_diffusion.models import load_pipeline

    pipe = load_pipeline("miniworld")
    pipe.set_progress_bar_config(disable=True)
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                      "decision": decision}), flush=True)
    for line in sys.stdin:
        seed = int(line.split()[1])
        t0 = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


class Worker:
    def __init__(self, mode: str, steps: int):
        drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ERASE_DIFFUSION_THREADS", "OMP_WAIT_POLICY")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["TQDM_DISABLE"] = "1"
        if mode == "guard_all_cores":  # no load-aware count: what the wait policy alone does
            from erase_diffusion.threads import available_cores

            env["ERASE_DIFFUSION_THREADS"] = str(available_cores())
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", mode, "--steps", str(steps)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self.info = None

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def ready(self) -> dict:
        self.info = self.read()
        return self.info

    def go(self, seed: int) -> None:
        self.proc.stdin.write(f"go {seed}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure_mode(mode: str, repeats: int, steps: int) -> dict:
    lone = Worker(mode, steps)
    lone.ready()  # started alone: its decision is a lone job's
    pair = [Worker(mode, steps), Worker(mode, steps)]  # started together
    for w in pair:
        w.ready()
    alone, together = [], [[], []]
    try:
        for r in range(repeats + 1):  # round 0 warms up
            lone.go(r)
            t = lone.read()["seconds"]
            for w in pair:
                w.go(r)
            ts = [w.read()["seconds"] for w in pair]
            if r:
                alone.append(t)
                for i in range(2):
                    together[i].append(ts[i])
            print(f"    {mode} round {r}: alone {t:.3f} s, pair {ts[0]:.3f} / {ts[1]:.3f} s", flush=True)
    finally:
        for w in [lone] + pair:
            w.close()
    med = [statistics.median(x) for x in together]
    return {"mode": mode, "alone": {"threads": lone.info["threads"], "decision": lone.info["decision"],
                                    "times": alone, "median": statistics.median(alone)},
            "pair": [{"threads": w.info["threads"], "decision": w.info["decision"], "times": together[i],
                      "median": med[i]} for i, w in enumerate(pair)],
            "ratio_worst_to_alone": max(med) / statistics.median(alone)}


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
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per mode (median; >= 3)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "threads.json"))
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps)
        return 0
    if args.repeats < 3:
        ap.error("--repeats must be at least 3")

    from benchmarks._record import write_json  # adds the "meta" block (commit, command, started, finished)
    from erase_diffusion.threads import available_cores

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    before = machine_state()
    rows = {}
    for mode in MODES:
        t0 = time.perf_counter()
        rows[mode] = measure_mode(mode, args.repeats, args.steps)
        rows[mode]["wall_s"] = time.perf_counter() - t0
    after = machine_state()

    load = f"load before {' '.join(before['loadavg'][:3])}, after {' '.join(after['loadavg'][:3])}"
    print(f"\none {args.steps}-step 64×64 generation, median of {args.repeats} interleaved rounds; "
          f"{available_cores()} cores; {load}\n")
    print("| threads | alone: threads / s | two side by side: threads / s each | slower process vs alone | target |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        row = rows[mode]
        each = " / ".join(f"{w['threads']}: {w['median']:.3f}" for w in row["pair"])
        print(f"| {LABELS[mode]} | {row['alone']['threads']}: {row['alone']['median']:.3f} | {each} | "
              f"{row['ratio_worst_to_alone']:.2f}× | ≤ {TARGET}× |")
    g = max(w["median"] for w in rows["guard"]["pair"])
    d = max(w["median"] for w in rows["default"]["pair"])
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
