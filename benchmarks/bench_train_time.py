"""CLIPErase's training time per concept on the miniature world, at train_erase.py's defaults, one CPU thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_time.py [--sets circle red ...]

One run per set (every single concept of the miniature world and the multi-concept sets of bench_concepts.py by
default): ``train_seconds`` from the run's metrics (data, models and training; no generations), the steps the
default budget gave (``CLIPEraseConfig.steps_for``) and the load average before and after, so a run on a busy machine
shows. Take it on a quiet machine. Prints a table and writes benchmarks/results/train_time.json.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._record import write_json  # noqa: E402  # adds the "meta" block (commit, command, started, finished)
from benchmarks.bench_concepts import MULTI, SINGLE  # noqa: E402
from erase_diffusion.concepts import miniworld_spec  # noqa: E402
from erase_diffusion.training import main as train_main  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=SINGLE + MULTI, help="concepts; '+' joins a multi-concept set")
    p.add_argument("--output", default=str(RESULTS / "train_time.json"))
    p.add_argument("--merge", action="store_true", help="keep the output's rows of the sets not re-run")
    p.add_argument("--train_args", default="", help="more train_erase.py flags for every run (recorded with each row), "
                                                    "e.g. adversarial CLIPErase's")
    args = p.parse_args()
    sets = [s.split("+") for s in args.sets]
    for s in sets:  # every name is checked before any training
        miniworld_spec(s)
    rows = []
    old = json.loads(Path(args.output).read_text()) if args.merge and Path(args.output).is_file() else None
    extra = args.train_args.split()
    kept = [r for r in (old or {}).get("rows", []) if (r["set"], r.get("train_args", "")) not in
            {("+".join(c), " ".join(extra)) for c in sets}]
    print("| erased | steps | train s | load before → after |\n|---|---|---|---|")
    for concepts in sets:
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            m = train_main(["--erase_concept", *concepts, "--output_dir", tmp, "--validation_steps", "0",
                            "--report_to", "none", "--eval_generations", "0", *extra])
        row = {"set": "+".join(concepts), "train_args": " ".join(extra), "steps": m["steps"],
               "train_seconds": m["train_seconds"],
               "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(f"| {row['set']} {row['train_args']} | {row['steps']} | {row['train_seconds']:.1f} | "
              f"{row['load_before']:.1f} → {row['load_after']:.1f} |", flush=True)
        write_json(Path(args.output), {"threads": os.environ.get("OMP_NUM_THREADS"), "rows": kept + rows},
                   merged_from=old)


if __name__ == "__main__":
    main()
