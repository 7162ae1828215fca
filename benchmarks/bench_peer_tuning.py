"""Tune the peers (this project's ESD-x and UCE re-implementations) by the measurement our own defaults were chosen by
(issue 11's "fair peers"), on prompts the benchmark tables do not use.

    OMP_NUM_THREADS=1 python benchmarks/bench_peer_tuning.py [--concept circle] [--n 32]
    python benchmarks/bench_peer_tuning.py --table      # the README table from benchmarks/results/peer_tuning.json

Grid: ESD-x conditioned on the concept's name alone (as the paper) or on captions naming it, × learning rate × steps
(negative guidance 1, batch 4), and UCE's preservation weight λ (the
anchor is the one our methods get by default). Each setting is scored by the scorecard (``scorecard.py``) with prompt
seed 7, so its named / paraphrase / retained prompts differ from those of bench_evaluate.py and bench_robustness.py
(seed 0). Choice per peer: the lowest found rate (named) among the settings that keep retained accuracy within 3
points of base and colour kept ≥ 80 % of base (bench_concepts.py's bars); if none does, the highest sum of
(1 − found), retained accuracy and colour kept. Writes benchmarks/results/peer_tuning.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import erase_diffusion  # noqa: E402,F401  # sets the thread guard before torch loads

from benchmarks._record import write_json  # noqa: E402
from benchmarks.peers import esd_x, uce  # noqa: E402
from erase_diffusion import scorecard  # noqa: E402
from erase_diffusion.anchors import miniworld_anchors  # noqa: E402
from erase_diffusion.concepts import miniworld_spec  # noqa: E402
from erase_diffusion.models import load_judge, load_pipeline  # noqa: E402
from erase_diffusion.stats import percent  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ESD_GRID = [dict(train_on=on, lr=lr, steps=steps) for on in ("word", "captions") for lr in (3e-5, 1e-4, 3e-4)
            for steps in (500, 1000)]
UCE_GRID = [dict(preserve_scale=s) for s in (0.1, 1.0, 10.0, 100.0)]
HEADER = ("| peer | setting | found, named | found, paraphrase | retained base → patched | colour kept base → patched "
          "| meets the bars | erase s | chosen |\n|---|---|---|---|---|---|---|---|---|")


def qualifies(s: dict) -> bool:
    kept = s["kept"].get("colour", {"ratio": 1.0})
    return s["retained_base"]["rate"] - s["retained"]["rate"] <= 0.03 and kept["ratio"] >= 0.8


def choose(rows: list[dict]) -> dict:
    ok = [r for r in rows if qualifies(r["summary"])]
    if ok:
        return min(ok, key=lambda r: r["summary"]["found_named"]["rate"])
    return max(rows, key=lambda r: (1 - r["summary"]["found_named"]["rate"]) + r["summary"]["retained"]["rate"]
               + r["summary"]["kept"].get("colour", {"patched": 0})["patched"])


def row_text(r: dict, chosen: bool) -> str:
    s = r["summary"]
    kept = s["kept"].get("colour")
    setting = ", ".join(f"{k} {v}" if isinstance(v, str) else f"{k} {v:g}" for k, v in r["setting"].items())
    return (f"| {r['peer']} | {setting} | {percent(s['found_named'])} | {percent(s.get('found_paraphrase'))} | "
            f"{100 * s['retained_base']['rate']:.1f} → {percent(s['retained'])} | "
            + (f"{100 * kept['base']:.0f} → {100 * kept['patched']:.0f} %" if kept else "–")
            + f" | {'yes' if qualifies(s) else 'no'} | {r['seconds']:.0f} | {'**chosen**' if chosen else ''} |")


def print_table(path: Path) -> None:
    data = json.loads(path.read_text())
    print(HEADER)
    for r in data["rows"]:
        print(row_text(r, r["setting"] == data["chosen"][r["peer"]]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--n", type=int, default=32, help="prompts per found set (retained: 2n)")
    p.add_argument("--output", default=str(RESULTS / "peer_tuning.json"))
    p.add_argument("--table", action="store_true", help="only print the README table from --output")
    args = p.parse_args()
    if args.table:
        return print_table(Path(args.output))
    spec = miniworld_spec([args.concept])  # checked before any model loads
    if args.n < 1:
        p.error("--n must be at least 1")

    base, judge = load_pipeline("miniworld"), load_judge("miniworld")
    base.set_progress_bar_config(disable=True)
    card = scorecard.Scorecard(base, judge, spec, n=args.n, n_retained=2 * args.n, seed=7)
    anchor = miniworld_anchors(base.text_encoder, base.tokenizer, [args.concept])[args.concept]
    runs = ([("esd-x", g, lambda g=g: esd_x(base, args.concept, time_budget_s=900.0, progress=False, **g))
             for g in ESD_GRID]
            + [("uce", g, lambda g=g: uce(base, args.concept, anchor=anchor, **g)) for g in UCE_GRID])
    rows = []
    print(HEADER)
    for peer, setting, run in runs:
        t0 = time.perf_counter()
        pipe, stats = run()
        seconds = time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=True)
        rows.append({"peer": peer, "setting": setting, "seconds": seconds, "stats": stats,
                     "summary": scorecard.summary(card.score(pipe), spec)[args.concept]})
        print(row_text(rows[-1], False), flush=True)
        chosen = {q: choose([r for r in rows if r["peer"] == q])["setting"]
                  for q in dict.fromkeys(r["peer"] for r in rows)}
        write_json(Path(args.output), {"concept": args.concept, "anchor": anchor, "n": args.n, "prompt_seed": 7,
                                       "chosen": chosen, "rows": rows})
    print("chosen:", chosen)


if __name__ == "__main__":
    main()
