"""The README's erasure table: base, nullspace patch, CLIPErase patch, ESD-x and UCE on the miniature world, all
measured by the same harness (``erase_diffusion.evaluate.evaluate_pipelines``), erasing "circle".

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py [--quick] [--cliperase_patch P] [--methods ...]

CLIPErase's erase time is the ``train_seconds`` its run measured and wrote to ``metrics.json`` beside the patch
(whether this script trains it or ``--cliperase_patch`` reuses one): never a number passed in.

Columns: forget = share of generations from prompts naming the concept in which the judge still finds it (↓);
retain = judged shape accuracy on prompts naming other shapes (↑); related damage = drop (points) of the judged
accuracy of the two shapes closest to the concept by CLIP text similarity; FID = judge-feature FID of retained-prompt
generations vs real held-out images (not Inception FID); ASRs (↓, pre-attack successes included); erase time; peak
extra RSS while erasing (sampled /proc/self/status, or the child's ru_maxrss for a subprocess); artifact bytes.
Targets: paraphrase ASR ≤ 5 %, adversarial ASR ≤ 10 %, FID within 10 % of base. Writes benchmarks/results/evaluate.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {"paraphrase_asr": 0.05, "adversarial_asr": 0.10, "fid_rel": 0.10}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def train_seconds(patch: Path) -> float | None:
    """The training time a CLIPErase run measured (``metrics.json`` beside its patch); None if it has none."""
    try:
        return float(json.loads((Path(patch).parent / "metrics.json").read_text())["train_seconds"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def run_cliperase(out_dir: Path, extra_args=()) -> tuple[Path, float, int]:
    """``python train_erase.py --erase_concept circle`` with its defaults, except that the logging and the
    before/after validation generations are off (they measure, they do not erase); (patch, seconds, child peak RSS)."""
    cmd = [sys.executable, str(ROOT / "train_erase.py"), "--erase_concept", "circle", "--output_dir", str(out_dir),
           "--report_to", "none", "--validation_steps", "0", "--eval_generations", "0", *extra_args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return out_dir / "erase_patch.safetensors", seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=["base", "nullspace", "cliperase", "esd-x", "uce"])
    ap.add_argument("--cliperase_patch", default=None, help="reuse a CLIPErase patch instead of training one")
    ap.add_argument("--model", default="miniworld", help="pipeline (default: the bundled miniature world)")
    ap.add_argument("--esd_budget_s", type=float, default=180.0)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of methods not re-run from an existing --output (same settings assumed)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "evaluate.json"))
    ap.add_argument("--reports", default=str(ROOT / "benchmarks" / "results" / "evaluate"))
    ap.add_argument("--table", action="store_true", help="only print the README table from --output")
    args = ap.parse_args()
    if args.table:
        return print(json.loads(Path(args.output).read_text())["markdown"])
    from erase_diffusion.threads import configure_threads

    configure_threads()  # OMP_NUM_THREADS wins; otherwise a count that does not oversubscribe

    from benchmarks.peers import esd_x, uce
    from erase_diffusion import nullspace
    from erase_diffusion.anchors import miniworld_anchors
    from erase_diffusion.concepts import miniworld_spec
    from benchmarks._record import write_json  # adds the "meta" block (commit, command, started, finished)
    from erase_diffusion.evaluate import evaluate_pipelines
    from erase_diffusion.models import load_clip, load_judge, load_pipeline
    from erase_diffusion.patch import apply_to_clip
    from erase_diffusion.pipelines.loading import load_patches
    from erase_diffusion.stats import percent

    spec = miniworld_spec(["circle"])
    base = load_pipeline(args.model)
    try:
        clip = load_clip(args.model)
    except ValueError:  # a bare pipeline folder (smoke tests): no CLIP zero-shot / retrieval / CLIP score
        clip = None
    judge = load_judge("miniworld")
    cache: dict = {}
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    rows = {}
    merged_from = None
    if args.merge and Path(args.output).is_file():
        merged_from = json.loads(Path(args.output).read_text())
        rows = {k: v for k, v in merged_from["details"].items() if k not in args.methods}

    def patched(patch):
        pipe = load_pipeline(args.model)
        load_patches(pipe, [patch])
        if clip is None:
            return pipe, None
        c1 = copy.deepcopy(clip[0])
        apply_to_clip(c1, patch)
        return pipe, (c1, clip[1])

    for method in args.methods:
        print(f"=== {method}", flush=True)
        erased_clip, cost = None, {}
        if method == "base":
            erased, cost = base, {"erase_s": 0.0, "peak_bytes": 0, "artifact_bytes": 0}
        elif method == "nullspace":
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                patch = nullspace.erase(args.model, ["circle"], output=work / "nullspace.safetensors", pipe=base)
                secs = time.perf_counter() - t0
            erased, erased_clip = patched(patch)
            cost = {"erase_s": secs, "peak_bytes": mem.extra, "artifact_bytes": patch.stat().st_size}
        elif method == "cliperase":
            if args.cliperase_patch:
                patch, process_s, peak = Path(args.cliperase_patch), None, None
            else:
                patch, process_s, peak = run_cliperase(work / "cliperase")
            erased, erased_clip = patched(patch)
            cost = {"erase_s": train_seconds(patch), "erase_s_kind": "train_seconds in the run's metrics.json",
                    "process_s": process_s, "peak_bytes": peak, "peak_kind": "child process ru_maxrss (absolute)",
                    "artifact_bytes": patch.stat().st_size, "patch": str(patch)}
        elif method == "esd-x":
            with PeakRSS() as mem:
                erased, st = esd_x(base, "circle", time_budget_s=args.esd_budget_s)  # peers.py's tuned defaults
            cost = {"erase_s": st["seconds"], "peak_bytes": mem.extra, "artifact_bytes": st["artifact_bytes"],
                    "esd": st}
        elif method == "uce":
            # the anchor our methods get by default (the least similar sibling, "star"), not a hand-picked one
            anchor = miniworld_anchors(base.text_encoder, base.tokenizer, ["circle"])["circle"]
            with PeakRSS() as mem:
                erased, st = uce(base, "circle", anchor=anchor)
            cost = {"erase_s": st["seconds"], "peak_bytes": mem.extra, "artifact_bytes": st["artifact_bytes"],
                    "uce": {**st, "anchor": anchor}}
        else:
            raise SystemExit(f"unknown method {method}")
        m = evaluate_pipelines(base, erased, spec, quick=args.quick, clip=clip, erased_clip=erased_clip or clip,
                               judge=judge, steps=args.steps, method=method, cache=cache,
                               output_dir=Path(args.reports) / method)
        write_json(Path(args.reports) / method / "metrics.json", m)  # the same metrics, with the meta block
        rows[method] = {"cost": cost, "metrics": m}
        print(json.dumps({"method": method, "found": m["forgetting"]["found_named_erased"],
                          "asr": {k: v["asr"] for k, v in m["robustness"].items() if isinstance(v, dict)},
                          "seconds": m["seconds"]}), flush=True)

    order = ["base", "nullspace", "cliperase", "esd-x", "uce"]
    rows = dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    base_fid = None
    if "base" in rows:
        base_fid = rows["base"]["metrics"]["utility"]["erased"]["fid_judge"]
    table = []
    for method, r in rows.items():
        m, c = r["metrics"], r["cost"]
        se, rob, ut = m["side_effects"], m["robustness"], m["utility"]
        fid = ut["erased"]["fid_judge"]
        ref = base_fid if base_fid is not None else ut["base"]["fid_judge"]
        row = {
            "method": method,
            "forget_found": m["forgetting"]["found_named_erased"],
            "heldout_found": m["forgetting"].get("heldout", {}).get("found_erased", {}).get("rate"),
            "retain_shape": se["retained_shape_erased"],
            "related_damage": (se.get("related_acc_base", 0) - se.get("related_acc_erased", 0)) if se.get("related") else None,
            "colour_kept": se.get("named_colour_kept_erased"),
            "fid_judge": fid, "fid_rel": fid / ref - 1 if ref else None,
            "paraphrase_asr": rob.get("paraphrase", {}).get("asr"),
            "misspelling_asr": rob.get("misspelled", {}).get("asr"),
            "adversarial_asr": rob.get("adversarial", {}).get("asr"),
            "soft_prompt_asr": rob.get("soft_prompt", {}).get("asr"),
            "erase_s": c.get("erase_s"), "peak_bytes": c.get("peak_bytes"), "artifact_bytes": c.get("artifact_bytes"),
            "ci95": {"forget_found": m["forgetting"].get("found_named_erased_ci95"),
                     "heldout_found": m["forgetting"].get("heldout", {}).get("found_erased", {}).get("ci95"),
                     "retain_shape": se.get("retained_shape_erased_ci95"),
                     "colour_kept": se.get("named_colour_kept_erased_ci95"),
                     **{f"{k}_asr": rob.get(name, {}).get("asr_ci95") for k, name in
                        (("paraphrase", "paraphrase"), ("misspelling", "misspelled"), ("adversarial", "adversarial"),
                         ("soft_prompt", "soft_prompt"))}},
            "n": {"named": m["forgetting"]["n"],
                  "heldout": m["forgetting"].get("heldout", {}).get("found_erased", {}).get("n"), "retained": se.get("n_retained"),
                  **{k: rob.get(k, {}).get("n") for k in ("paraphrase", "misspelled", "adversarial", "soft_prompt")}},
        }
        row["missed"] = [k for k, lim in (("paraphrase_asr", TARGETS["paraphrase_asr"]),
                                          ("adversarial_asr", TARGETS["adversarial_asr"]))
                         if row[k] is not None and row[k] > lim]
        if row["fid_rel"] is not None and abs(row["fid_rel"]) > TARGETS["fid_rel"] and row["fid_rel"] > 0:
            row["missed"].append("fid")
        table.append(row)

    def mark(row, key, text):
        return f"{text} (missed)" if key in row["missed"] and row["method"] != "base" else text

    lines = ["| method | forget ↓ | forget, held-out phrasing ↓ | retain ↑ | related damage | colour kept | FID (judge) | paraphrase ASR | "
             "misspelling ASR | adversarial ASR | soft-prompt ASR | erase time | peak mem | artifact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        peak = "–" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
        dmg = "–" if r["related_damage"] is None else f"{100 * r['related_damage']:+.1f} pt"
        fid = f"{r['fid_judge']:.2f} ({100 * r['fid_rel']:+.0f} %)" if r["fid_rel"] is not None else f"{r['fid_judge']:.2f}"
        secs = "–" if r["erase_s"] is None else f"{r['erase_s']:.1f} s"
        def pct(key):
            return percent(None if r[key] is None else {"rate": r[key], "ci95": r["ci95"].get(key)})

        cells = [r["method"], pct("forget_found"), pct("heldout_found"), pct("retain_shape"), dmg, pct("colour_kept"),
                 mark(r, "fid", fid), mark(r, "paraphrase_asr", pct("paraphrase_asr")),
                 pct("misspelling_asr"), mark(r, "adversarial_asr", pct("adversarial_asr")),
                 pct("soft_prompt_asr"), secs, peak, f"{(r['artifact_bytes'] or 0) / 1024:.1f} KiB"]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    print(md)
    print("Targets: paraphrase ASR ≤ 5 %, adversarial ASR ≤ 10 %, FID within 10 % of base (judge-feature FID, not "
          "Inception). ASR includes pre-attack successes.")
    out = {"quick": args.quick, "targets": TARGETS, "table": table, "markdown": md,
           "details": {k: {"cost": v["cost"], "metrics": v["metrics"]} for k, v in rows.items()}}
    write_json(args.output, out, merged_from=merged_from)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
