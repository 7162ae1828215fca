"""How both methods scale with the number of concepts erased at once (issue 11): erase k = 1, 2, 4 and 7 shapes, and
7 of the 8 colours, and measure what is left of everything else.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [--sets ...] [--methods nullspace cliperase] [--n 32]
    python benchmarks/bench_scale.py --table      # the README table from benchmarks/results/scale.json

Per (set, method): the worst found rate over the set's concepts (named, paraphrased, held-out phrasings; n prompts
per concept and set), the retained accuracy of the erased attribute on ``--n_retained`` prompts that name no erased
class, base → patched with its Wilson interval, and the judge-feature FID of those generations against real
held-out images of the classes left (so base and patched are compared on the same prompts and the same real set).
Multi-concept closed-form editors are known to lose most utility as k grows (UCE: FID 14 → 107 at 100 concepts);
this shows where ours stand at the miniature world's largest sets. CLIPErase gets train_erase.py's defaults (its
step budget grows with k, ``CLIPEraseConfig.steps_for``); nullspace gets ``nullspace.erase``'s. Writes
benchmarks/results/scale.json.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import erase_diffusion  # noqa: E402,F401  # sets the thread guard before torch loads

from benchmarks._record import write_rows  # noqa: E402
from benchmarks.bench_concepts import run_cliperase, run_nullspace  # noqa: E402
from erase_diffusion import scorecard  # noqa: E402
from erase_diffusion.concepts import miniworld_attribute, miniworld_spec  # noqa: E402
from erase_diffusion.measure import classes, generate, held_out_dataset, judge_fid_kid  # noqa: E402
from erase_diffusion.miniworld import domain  # noqa: E402
from erase_diffusion.models import load_judge, load_pipeline  # noqa: E402
from erase_diffusion.pipelines.loading import load_patches  # noqa: E402
from erase_diffusion.stats import percent  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETS = ["circle", "circle+square", "circle+square+triangle+star", "+".join(domain.SHAPES[:7]),
        "+".join(list(domain.COLOURS)[:7])]
RUNNERS = {"nullspace": run_nullspace, "cliperase": run_cliperase}


def real_images_left(concepts: list[str], n: int = 512):
    """Held-out real images that show no erased class (the reference the retained prompts should look like)."""
    data = held_out_dataset(1152)
    keep = None
    for c in concepts:
        attribute = miniworld_attribute(c)[0]
        mask = getattr(data, attribute) != classes(attribute).index(c)
        keep = mask if keep is None else keep & mask
    return data.float_images(keep.nonzero().squeeze(1)[:n])


def row_text(r: dict) -> str:
    return (f"| {r['k']} | {r['set']} | {r['method']} | {percent(r['worst_found_named'])} | "
            f"{percent(r.get('worst_found_paraphrase'))} | {percent(r['worst_found_heldout'])} | "
            f"{100 * r['retained_base']['rate']:.1f} → {percent(r['retained'])} | "
            f"{r['fid_base']:.2f} → {r['fid']:.2f} ({100 * (r['fid'] / r['fid_base'] - 1):+.0f} %) | "
            f"{r['erase_seconds']:.1f} |")


HEADER = ("| k | erased | method | worst found, named | worst found, paraphrase | worst found, held-out | "
          "retained accuracy base → patched | judge FID base → patched | erase s |\n|---|---|---|---|---|---|---|---|---|")


def print_table(path: Path) -> None:
    rows = json.loads(path.read_text())["rows"]
    print(HEADER)
    for r in sorted(rows, key=lambda r: (SETS.index(r["set"]) if r["set"] in SETS else len(SETS), r["set"],
                                         r["method"] != "nullspace")):
        print(row_text(r))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=SETS, help="concepts; '+' joins a multi-concept set")
    p.add_argument("--methods", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    p.add_argument("--n", type=int, default=32, help="prompts per found set and concept")
    p.add_argument("--n_retained", type=int, default=256, help="retained prompts (accuracy and FID)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per generation")
    p.add_argument("--merge", action="store_true", help="keep the output's rows not re-run")
    p.add_argument("--output", default=str(RESULTS / "scale.json"))
    p.add_argument("--table", action="store_true", help="only print the README table from --output")
    args = p.parse_args()
    if args.table:
        return print_table(Path(args.output))
    sets = [s.split("+") for s in args.sets]
    for s in sets:  # every name is checked before any model loads
        miniworld_spec(s)
        if len({miniworld_attribute(c)[0] for c in s}) > 1:
            p.error(f"{'+'.join(s)}: a set of one attribute only (the retained accuracy is that attribute's)")
    if args.n < 1 or args.n_retained < 2:
        p.error("--n must be ≥ 1 and --n_retained ≥ 2")

    base, judge = load_pipeline("miniworld"), load_judge("miniworld")
    base.set_progress_bar_config(disable=True)
    rows, mine = [], {(s, m) for s in args.sets for m in args.methods}

    def save():
        write_rows(args.output, {"n": args.n, "n_retained": args.n_retained, "steps": args.steps}, rows,
                   rerun=lambda r: (r["set"], r["method"]) in mine, merge=args.merge)

    def fid(pipe, card, real):
        images = generate(pipe, [c.prompt for c in card.sets["retained"]], seed=card.seed, steps=args.steps)
        return judge_fid_kid(judge, real, images)["fid_judge"]

    print(HEADER)
    for concepts in sets:
        spec = miniworld_spec(concepts)
        card = scorecard.Scorecard(base, judge, spec, n=args.n, n_retained=args.n_retained, steps=args.steps)
        real = real_images_left(concepts)
        fid_base = fid(base, card, real)
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                patch, seconds = RUNNERS[method](spec, Path(tmp))
                pipe = load_pipeline("miniworld")
                pipe.set_progress_bar_config(disable=True)
                load_patches(pipe, [patch])
                rows_by_concept = scorecard.summary(card.score(pipe), spec)
                fid_patched = fid(pipe, card, real)
            per = list(rows_by_concept.values())

            def worst(key):
                rates = [r[key] for r in per if key in r]
                return max(rates, key=lambda r: r["rate"]) if rates else None

            attribute = per[0]["attribute"]
            row = {"set": "+".join(concepts), "k": len(concepts), "method": method, "attribute": attribute,
                   "worst_found_named": worst("found_named"), "worst_found_paraphrase": worst("found_paraphrase"),
                   "worst_found_heldout": worst("found_heldout"), "retained_base": per[0]["retained_base"],
                   "retained": per[0]["retained"], "fid_base": fid_base, "fid": fid_patched, "n_real": len(real),
                   "erase_seconds": round(seconds, 2), "per_concept": rows_by_concept}
            rows.append(row)
            print(row_text(row), flush=True)
            save()


if __name__ == "__main__":
    main()
