"""Adversarial CLIPErase's settings, measured: attack success vs retained accuracy for each variant (issue 12's
trade-off curve), erasing one concept of the miniature world.

    OMP_NUM_THREADS=1 python benchmarks/bench_adversarial.py [--concept circle] [--variants default w2 ...]
        [--budgets 150x2 300x4]

Per variant: train (``train_seconds``), the attacks of ``robustness.SUITE`` that learn against the erased encoder
(``ATTACKS``; n prompts each, Wilson intervals, ``strongest`` = any of them per prompt), retained shape accuracy on
the scorecard's 2n retained prompts (base vs patched, same seeds, McNemar) with the worst class, and found named.
``early`` variants train the LoRA on the first two of the encoder's layers only (HiRM's choice), through a
benchmark-only override of ``training.TEXT_TARGETS``; ``ONE_PER_FORM`` variants keep one attack-pool member per
form (``cliperase.ADV_RESTARTS`` = 1) and 4 inner steps, as the first sweep measured them. ``--budgets``: each variant is trained once
and attacked at every budget (a row each). Prints a table, writes
benchmarks/results/adversarial_sweep.json (``--merge`` keeps the variants not re-run, re-read at every write).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._record import write_rows  # noqa: E402  # adds the "meta" block (commit, command, started, finished)
from erase_diffusion import cliperase, robustness, training  # noqa: E402
from erase_diffusion.concepts import miniworld_attribute, miniworld_spec  # noqa: E402
from erase_diffusion.config import CLIPEraseConfig  # noqa: E402
from erase_diffusion.measure import classes, concept_cases, generate  # noqa: E402
from erase_diffusion.models import load_judge, load_pipeline  # noqa: E402
from erase_diffusion.pipelines.loading import load_patches  # noqa: E402
from erase_diffusion.stats import mcnemar, percent, rate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ATTACKS = ("encoder", "encoder_k4", "suffix_k2")
VARIANTS = {  # name: CLIPEraseConfig overrides
    "default": {},
    "w1": dict(adversarial_weight=1.0),
    "w2": dict(adversarial_weight=2.0),
    "w5": dict(adversarial_weight=5.0),
    "w2_tc30_400": dict(adversarial_weight=2.0, token_consistency_weight=30.0, max_train_steps=400),
    "w5_tc30_400": dict(adversarial_weight=5.0, token_consistency_weight=30.0, max_train_steps=400),
    "w2_tc30_400_early": dict(adversarial_weight=2.0, token_consistency_weight=30.0, max_train_steps=400),
    # the recipe (bench_robustness.ADVERSARIAL) as it was measured here: cliperase.ADV_RESTARTS attacks per form,
    # rank 4, and the then default of 8 inner steps (pinned, so that a re-run measures the same; the recipe now has 16)
    "w2_tc30_400_r4": dict(adversarial_weight=2.0, token_consistency_weight=30.0, max_train_steps=400, rank=4,
                           adversarial_steps=8),
}
EARLY_LAYERS = "[01]"
# the first sweep ran before the pool had restarts and at 4 inner steps: these variants keep its one member per form
# (cliperase.ADV_RESTARTS = 1) and --adversarial_steps 4
ONE_PER_FORM = ("w1", "w2", "w5", "w2_tc30_400", "w5_tc30_400", "w2_tc30_400_early")


def run_variant(name: str, spec, out: Path) -> tuple[Path, float]:
    targets, restarts = training.TEXT_TARGETS, cliperase.ADV_RESTARTS
    if name.endswith("_early"):
        training.TEXT_TARGETS = targets.replace(r"\d+", EARLY_LAYERS)
    if name in ONE_PER_FORM:
        cliperase.ADV_RESTARTS = 1
    try:
        config = CLIPEraseConfig(output_dir=str(out), validation_steps=0, report_to="none", eval_generations=0,
                                 **({"adversarial_steps": 4} if name in ONE_PER_FORM else {}), **VARIANTS[name])
        metrics = training.run(spec, config)
    finally:
        training.TEXT_TARGETS, cliperase.ADV_RESTARTS = targets, restarts
    return Path(metrics["patch"]), metrics["train_seconds"]


HEADER = ("| variant | settings | attack budget | train s | strongest ASR | " + " | ".join(f"{a} ASR" for a in ATTACKS)
          + " | retained base → patched | worst class |\n" + "|---" * (7 + len(ATTACKS)) + "|")


def row_text(row: dict) -> str:
    settings = ", ".join(f"{k} {v:g}" for k, v in row["settings"].items()) or "defaults"
    if row["variant"].endswith("_early"):
        settings += ", LoRA on layers 0–1 only"
    if row["variant"] in ONE_PER_FORM:
        settings += ", one attack per form, 4 inner steps"
    worst = row["per_class"][row["worst"]]
    budget = row["attacks"]["budget"]
    return (f"| {row['variant']} | {settings} | {budget['steps']} steps × {budget['restarts']} | "
            f"{row['train_seconds']:.0f} | {percent(row['attacks']['strongest'])} | "
            + " | ".join(percent(row["attacks"][a]) for a in ATTACKS)
            + f" | {100 * row['retained_base']['rate']:.1f} → {percent(row['retained'])} | {row['worst']} "
            f"{100 * worst['base']:.0f} → {100 * worst['patched']:.0f} % |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--n", type=int, default=64, help="attacked prompts per attack (retained: 2n)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per generation")
    p.add_argument("--budgets", nargs="+", default=[f"{robustness.BUDGET['steps']}x{robustness.BUDGET['restarts']}"],
                   help="attack budgets STEPSxRESTARTS, each a row per variant (default: the suite's)")
    p.add_argument("--merge", action="store_true", help="keep the output's variants not re-run")
    p.add_argument("--output", default=str(RESULTS / "adversarial_sweep.json"))
    p.add_argument("--table", action="store_true", help="only print the README table from --output")
    args = p.parse_args()
    if args.table:
        print(HEADER)
        return print("\n".join(row_text(r) for r in json.loads(Path(args.output).read_text())["rows"]))
    budgets = []
    for b in dict.fromkeys(args.budgets):  # checked before any model loads; repeats dropped
        steps, _, restarts = b.partition("x")
        if not (steps.isdigit() and restarts.isdigit() and int(steps) >= 1 and int(restarts) >= 1):
            p.error(f"--budgets takes STEPSxRESTARTS with both ≥ 1, e.g. 300x4; got {b!r}")
        budgets.append(dict(robustness.BUDGET, steps=int(steps), restarts=int(restarts)))
    spec = miniworld_spec([args.concept])
    attribute = miniworld_attribute(args.concept)[0]
    base, judge = load_pipeline("miniworld"), load_judge("miniworld")
    base.set_progress_bar_config(disable=True)
    retained = concept_cases(spec, n=1, n_retained=2 * args.n)["retained"]
    names = classes(attribute)
    truth = [names.index(getattr(c, attribute)) for c in retained]

    def correct(pipe):
        labels = judge.label(generate(pipe, [c.prompt for c in retained], seed=0, steps=args.steps))[attribute]
        return [int(a) == b for a, b in zip(labels.tolist(), truth)]

    base_correct = correct(base)
    rows = []

    def save():
        write_rows(args.output, {"concept": args.concept, "n": args.n, "steps": args.steps, "variants": VARIANTS,
                                 "attacks": ATTACKS, "budget": robustness.BUDGET}, rows,
                   rerun=lambda r: r["variant"] in args.variants, merge=args.merge)  # a retrained variant: all rows

    print(HEADER)
    for name in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            patch, seconds = run_variant(name, spec, Path(tmp))
            pipe = load_pipeline("miniworld")
            pipe.set_progress_bar_config(disable=True)
            load_patches(pipe, [patch])
            suites = [robustness.attack_suite(base, pipe, args.concept, judge, n=args.n, budget=budget,
                                              suite={a: robustness.SUITE[a] for a in ATTACKS}, steps=args.steps)
                      for budget in budgets]
            patched_correct = correct(pipe)
        per_class = {}
        for k, cls in enumerate(names):
            idx = [i for i, t in enumerate(truth) if t == k]
            if idx:
                per_class[cls] = {"base": sum(base_correct[i] for i in idx) / len(idx),
                                  "patched": sum(patched_correct[i] for i in idx) / len(idx), "n": len(idx)}
        worst = max(per_class, key=lambda c: per_class[c]["base"] - per_class[c]["patched"])
        for suite in suites:
            row = {"variant": name, "settings": VARIANTS[name], "train_seconds": seconds, "attacks": suite,
                   "retained_base": rate(base_correct), "retained": rate(patched_correct),
                   "retained_paired": mcnemar(base_correct, patched_correct), "per_class": per_class, "worst": worst}
            rows.append(row)
            print(row_text(row), flush=True)
        save()


if __name__ == "__main__":
    main()
