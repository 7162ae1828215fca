"""Bad input and bad luck: fuzzed patch files, kill -9 during training, bad command lines (issue 13's "Must reach").

1. ``--fuzz`` seeded mutations of valid patches through inspect, apply_to_clip and load_patches on a tiny random SD
   pipeline (``tests/test_patch_fuzz.py``): crashes (any exception but PatchError), pipelines changed after a
   refusal, accepted files whose effect differs from their own B @ A or whose conditioning is not finite.
2. ``--kills`` runs of ``python train_erase.py`` (miniature world, --target clip, 6 steps, a checkpoint every 2)
   killed with SIGKILL at a seeded random point — a random moment, in the middle of a checkpoint write (held just
   before its rename), or after the patch is written but before metrics.json — then resumed with
   ``--resume_from_checkpoint latest``; each resumed patch is compared with an uninterrupted run's.
3. The bad command lines of ``tests/test_cli_refusals.py``: exit status 2, one line, nothing written, before any model
   loads.

Prints a table and writes benchmarks/results/robustness_io.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_robustness_io.py [--fuzz 1000] [--kills 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import write_json  # noqa: E402
from test_cli_refusals import run_cli_cases  # noqa: E402
from test_patch_fuzz import run_fuzz  # noqa: E402
from test_resume import kill_when, patch_difference, run_to_end  # noqa: E402

STEPS = 6
# "the same patch to float round-off": float32 weights of order 1 after a few Adam steps. Resumes here are usually bit
# for bit (0.0); the tolerance only absorbs arithmetic that changes between processes (thread count, a changed tree).
TOLERANCE = 1e-5


def kill_points(n: int, rng: random.Random) -> list[dict]:
    """Seeded: the first three are one of each kind, the rest drawn at random."""
    kinds = ["checkpoint_write", "after_patch", "random_moment"]
    points = []
    for i in range(n):
        kind = kinds[i] if i < len(kinds) else rng.choice(kinds)
        point = {"kind": kind}
        if kind == "checkpoint_write":
            point["step"] = rng.choice([2, 4])
        elif kind == "random_moment":
            point["after_checkpoint"] = rng.choice([None, 2, 4])  # None: from the start, maybe before any checkpoint
            point["delay_s"] = round(rng.uniform(0.0, 15.0 if point["after_checkpoint"] is None else 2.0), 2)
        points.append(point)
    return points


def one_kill(point: dict, out: Path, reference: Path) -> dict:
    t0 = time.perf_counter()
    env, delay = None, 0.0
    if point["kind"] == "checkpoint_write":
        partial = out / f".checkpoint-{point['step']}.partial-incomplete"
        ready = lambda: (partial / "data_state_0.safetensors").is_file()  # noqa: E731
        env = {"ERASE_DIFFUSION_TEST_CHECKPOINT_PAUSE": "30"}
    elif point["kind"] == "after_patch":
        ready = lambda: (out / "erase_patch.safetensors").is_file()  # noqa: E731
    else:
        ck = point["after_checkpoint"]
        ready = (lambda: True) if ck is None else (lambda: (out / f"checkpoint-{ck}").is_dir())
        delay = point["delay_s"]
    killed = kill_when(out, STEPS, ready, delay=delay, env=env)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    log = run_to_end(out, STEPS, "--resume_from_checkpoint", "latest")
    resumed_from = next((line.split("resumed from ")[1].split()[0] for line in log.splitlines()
                         if "resumed from " in line), None)
    diff = patch_difference(out / "erase_patch.safetensors", reference / "erase_patch.safetensors")
    return {**point, "killed": killed, "left_behind": left, "resumed_from": Path(resumed_from).name if resumed_from
            else "scratch", "max_abs_difference": diff, "equal": diff <= TOLERANCE,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "robustness_io.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="robustness-io-"))

    fuzz = run_fuzz(args.fuzz, seed=args.seed, folder=work / "fuzz")
    print(f"fuzz: {fuzz['cases']} cases in {fuzz['seconds']} s: {fuzz['accepted']} accepted, {fuzz['refused']} refused",
          flush=True)

    cli = run_cli_cases(_mkdir(work / "cli"))
    clean = [r for r in cli if r["exit"] == 2 and r["lines"] == 1 and r["nothing_written"] and r["crash"] is None]
    print(f"cli: {len(clean)}/{len(cli)} clean refusals", flush=True)

    kills = []
    if args.kills:
        reference = work / "uninterrupted"
        t0 = time.perf_counter()
        run_to_end(reference, STEPS)
        reference_s = round(time.perf_counter() - t0, 1)
        for i, point in enumerate(kill_points(args.kills, random.Random(args.seed))):
            kills.append(one_kill(point, work / f"kill{i}", reference))
            print(f"kill {i}: {kills[-1]}", flush=True)
        # the working tree is shared: a second uninterrupted run tells whether the code changed during the benchmark
        again = work / "uninterrupted_again"
        run_to_end(again, STEPS)
        reference_drift = patch_difference(again / "erase_patch.safetensors", reference / "erase_patch.safetensors")
    equal = sum(k["equal"] for k in kills)
    identical = sum(k["max_abs_difference"] == 0.0 for k in kills)

    rows = [
        ("fuzzed patches (inspect, apply_to_clip, load_patches)", f"{fuzz['cases']:,} in {fuzz['seconds']} s",
         "1,000 in ≤ 2 min"),
        ("… crashes (not a PatchError)", str(fuzz["crashes"]), "0"),
        ("… pipelines changed after a refusal", str(fuzz["changed_after_refusal"]), "0"),
        ("… accepted but off their B @ A or non-finite", str(fuzz["silent_corruption"]), "0"),
        ("… accepted / refused", f"{fuzz['accepted']} / {fuzz['refused']}", "–"),
        ("kill -9 points (checkpoint write, after the patch, random moment)", str(len(kills)), "10"),
        (f"… resumed to the uninterrupted run's patch (max |Δ| ≤ {TOLERANCE:g})", f"{equal} / {len(kills)}", "all"),
        ("… of which bit for bit", f"{identical} / {len(kills)}", "–"),
        ("… largest difference", f"{max((k['max_abs_difference'] for k in kills), default=0):.1e}", "round-off"),
        ("bad command lines: exit 2, one line, nothing written, no model loaded", f"{len(clean)} / {len(cli)}", "all"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measure':<{width}} | value | target |\n|{'-' * (width + 2)}|-------|--------|")
    for r in rows:
        print(f"| {r[0]:<{width}} | {r[1]} | {r[2]} |")
    figures = {
        "fuzz": {k: v for k, v in fuzz.items() if k != "failures"}, "fuzz_failures": fuzz["failures"][:50],
        "kills": kills, "kills_equal": equal, "kills_identical": identical, "tolerance": TOLERANCE, "steps_per_run": STEPS,
        "reference_drift": reference_drift if args.kills else None,
        "uninterrupted_run_seconds": reference_s if args.kills else None,
        "cli": cli, "cli_clean": len(clean),
    }
    print(f"wrote {write_json(Path(args.output), figures)}")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


if __name__ == "__main__":
    main()
