"""What erased prompts are drawn as, and whether they keep the colour they name (issue 11's per-class breakdown; the
"colour kept" column of the robustness table).

    OMP_NUM_THREADS=1 python benchmarks/bench_drawn_as.py [--concept star] [--methods ...] [--seeds 0 1 2] [--n 192]
    python benchmarks/bench_drawn_as.py --table      # the README table from benchmarks/results/drawn_as.json

On ``--n`` prompts naming the concept (the scorecard's "named" set, seeds shared by every row) the judge labels each
generation's shape and colour. Per row: colour kept (the named colour drawn), the shapes drawn and the colour
accuracy of the prompts drawn as each. Two reference rows come from the base model: the prompts as written, and the
same prompts with the concept's word replaced by its default anchor (what the erasers steer toward): the colour the
base model keeps when it draws the anchor, i.e. what an eraser that maps the concept exactly onto its anchor could
keep. Methods are trained / edited as in bench_robustness.py (adversarial CLIPErase: its recipe, one row per
``--seeds``). Writes benchmarks/results/drawn_as.json.
"""

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import erase_diffusion  # noqa: E402,F401  # sets the thread guard before torch loads

import torch  # noqa: E402

from benchmarks._record import write_rows  # noqa: E402
from benchmarks.bench_robustness import erase  # noqa: E402
from erase_diffusion.anchors import miniworld_anchors  # noqa: E402
from erase_diffusion.concepts import miniworld_attribute, miniworld_spec  # noqa: E402
from erase_diffusion.measure import classes, concept_cases, generate  # noqa: E402
from erase_diffusion.miniworld import domain  # noqa: E402
from erase_diffusion.models import load_judge, load_pipeline  # noqa: E402
from erase_diffusion.stats import percent, pooled, rate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["nullspace", "cliperase", "adversarial"]
HEADER = ("| concept | rows | colour kept | drawn as (share of prompts) | colour kept when drawn as that |\n"
          "|---|---|---|---|---|")


def judge_row(judge, pipe, prompts: list[str], truth: torch.Tensor, steps: int) -> dict:
    lab = judge.label(generate(pipe, prompts, seed=0, steps=steps))
    ok = lab["colour"] == truth
    shapes = classes("shape")
    drawn = collections.Counter(shapes[i] for i in lab["shape"].tolist())
    return {"colour_kept": rate(ok), "drawn_as": dict(drawn.most_common()),
            "colour_kept_by_drawn": {s: rate(ok[lab["shape"] == shapes.index(s)]) for s in drawn}}


def row_text(r: dict) -> str:
    n = r["colour_kept"]["n"]
    top = list(r["drawn_as"].items())[:3]
    drawn = ", ".join(f"{s} {100 * c / n:.0f} %" for s, c in top)
    by = ", ".join(f"{s} {percent(r['colour_kept_by_drawn'][s])}" for s, _ in top[:2])
    name = r["method"] + (f", seed {r['seed']}" if r.get("seed") is not None else "")
    return f"| {r['concept']} | {name} | {percent(r['colour_kept'])} | {drawn} | {by} |"


def print_table(path: Path) -> None:
    rows = json.loads(path.read_text())["rows"]
    print(HEADER)
    for r in rows:
        print(row_text(r))
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r["colour_kept"] for r in rows if r["method"] == method]
        if len(runs) > 1:  # one training run cannot tell a seed's luck from the recipe: pool the seeds
            r = pooled(runs)
            print(f"{method}, {len(runs)} training seeds pooled: colour kept {r['k']} of {r['n']}, "
                  f"{100 * r['rate']:.1f} % [{100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f}]")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="star", help="a shape of the miniature world")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="CLIPErase's training seeds (one row each)")
    p.add_argument("--n", type=int, default=192, help="prompts naming the concept")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per generation")
    p.add_argument("--merge", action="store_true", help="keep the rows not re-run (other concepts, methods)")
    p.add_argument("--output", default=str(RESULTS / "drawn_as.json"))
    p.add_argument("--table", action="store_true", help="only print the README table from --output")
    args = p.parse_args()
    if args.table:
        return print_table(Path(args.output))
    spec = miniworld_spec([args.concept])  # checked before any model loads
    if miniworld_attribute(args.concept)[0] != "shape":
        p.error(f"--concept must be a shape (colour kept is measured on the named colour), got {args.concept!r}")
    if args.n < 1:
        p.error("--n must be at least 1")

    base, judge = load_pipeline("miniworld"), load_judge("miniworld")
    base.set_progress_bar_config(disable=True)
    anchor = miniworld_anchors(base.text_encoder, base.tokenizer, [args.concept])[args.concept]
    cases = concept_cases(spec, args.n, 8, seed=0)["named"][args.concept]
    prompts = [c.prompt for c in cases]
    truth = torch.tensor([classes("colour").index(c.colour) for c in cases])
    rows = []

    def rerun(r):  # the rows this run writes: the base rows and the methods asked for
        return r["concept"] == args.concept and (r["method"] not in METHODS or r["method"] in args.methods)

    def add(method, pipe, ps, seed=None):
        rows.append({"concept": args.concept, "anchor": anchor, "method": method, "seed": seed,
                     **judge_row(judge, pipe, ps, truth, args.steps)})
        print(row_text(rows[-1]), flush=True)
        write_rows(args.output, {"n": args.n, "steps": args.steps}, rows,
                   rerun=rerun, merge=args.merge)

    print(HEADER)
    add("base", base, prompts)
    add(f"base, '{anchor}' in place of '{args.concept}'", base,
        [domain.with_articles(q.replace(args.concept, anchor)) for q in prompts])
    for method in args.methods:
        for seed in (args.seeds if method in ("cliperase", "adversarial") else [None]):
            with tempfile.TemporaryDirectory() as tmp:
                pipe, _, _ = erase(method, args.concept, base, Path(tmp), seed or 0)
                add(method, pipe, prompts, seed)


if __name__ == "__main__":
    main()
