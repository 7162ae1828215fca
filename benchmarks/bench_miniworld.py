"""Quality of the bundled miniature world: judge accuracy, CLIP zero-shot accuracy, judged generations, latency.

    python benchmarks/bench_miniworld.py [--prompts-per-pair 4] [--steps 20] [--guidance 7.5]

Prints a table and writes benchmarks/results/miniworld.json. Targets (issue 2): judge ≥ 99 % on held-out images for
shape, colour and style; CLIP zero-shot ≥ 98 % for shape and colour; generations judged with the prompted shape and
colour ≥ 90 % over ≥ 200 prompts; one 64×64 generation at 20 steps < 1 s on 2 CPU cores.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _record import write_json  # adds the "meta" block (commit, command, started, finished)
from erase_diffusion.measure import eval_prompts, generate, held_out_dataset, judge_generations, zero_shot_accuracy
from erase_diffusion.models import MINIWORLD_DIR, load_clip, load_judge, load_pipeline

RESULTS = Path(__file__).parent / "results"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts-per-pair", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    args = p.parse_args()
    from erase_diffusion.threads import configure_threads

    configure_threads()  # OMP_NUM_THREADS wins; otherwise a count that does not oversubscribe
    torch.set_flush_denormal(True)
    res = {"threads": torch.get_num_threads(), "build": json.loads((MINIWORLD_DIR / "build.json").read_text())}

    data = held_out_dataset()
    judge = load_judge()
    labels = judge.label(data.float_images())
    res["judge_heldout"] = {k: (labels[k] == getattr(data, k)).float().mean().item() for k in labels}

    clip, tok = load_clip()
    res["clip_zeroshot"] = {a: zero_shot_accuracy(clip, tok, data, a) for a in ("shape", "colour", "style")}

    pipe = load_pipeline()
    cases = eval_prompts(per_pair=args.prompts_per_pair)
    t = time.time()
    images = generate(pipe, [c.prompt for c in cases], steps=args.steps, guidance=args.guidance)
    res["generation"] = judge_generations(judge, images, cases)
    res["generation"].update(steps=args.steps, guidance=args.guidance, batch_seconds=time.time() - t)
    para = eval_prompts(per_pair=1, paraphrase=True)
    res["generation_paraphrase"] = judge_generations(judge, generate(pipe, [c.prompt for c in para], steps=args.steps,
                                                                     guidance=args.guidance), para)

    latency = []
    for i in range(7):
        t = time.perf_counter()
        pipe("a solid red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(i))
        latency.append(time.perf_counter() - t)
    res["latency_one_image_20_steps_s"] = {"median": statistics.median(latency[1:]), "runs": latency}
    res["sizes_mb"] = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20
                       for d in MINIWORLD_DIR.iterdir() if d.is_dir()}

    z = res["clip_zeroshot"]
    rows = [
        ("judge accuracy, held-out (shape/colour/style)", "/".join(f"{res['judge_heldout'][k]:.1%}" for k in ("shape", "colour", "style")), "≥ 99 %"),
        ("CLIP zero-shot, held-out (shape/colour/style)", "/".join(f"{z[k]['all']:.1%}" for k in ("shape", "colour", "style")), "≥ 98 % shape, colour"),
        (f"generations judged: shape / colour ({res['generation']['n']} prompts)", f"{res['generation']['shape']:.1%} / {res['generation']['colour']:.1%}", "≥ 90 %"),
        ("generations judged: style (prompts naming one)", f"{res['generation']['style']:.1%}", "—"),
        (f"paraphrase prompts: shape ({res['generation_paraphrase']['n']})", f"{res['generation_paraphrase']['shape']:.1%}", "—"),
        ("one 64×64 image, 20 steps (median s)", f"{res['latency_one_image_20_steps_s']['median']:.3f}", "< 1 s"),
        ("weights on disk (MiB)", f"{sum(res['sizes_mb'].values()):.1f}", "≤ 30"),  # sizes_mb holds MiB (2**20)
    ]
    print("| measure | value | target |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    write_json(RESULTS / "miniworld.json", res)


if __name__ == "__main__":
    main()
