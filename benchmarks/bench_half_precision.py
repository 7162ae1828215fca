"""Does CLIPErase's float16 storage (``training.half_precision``) change what the patch does? The default circle run,
trained once; its factors written in float32 and in float16; the difference of the factors' product, of the encoder's
output, and of every judged label of the scorecard's prompt sets (same seeds).

    OMP_NUM_THREADS=1 python benchmarks/bench_half_precision.py [--concept circle]

Prints a table and writes benchmarks/results/half_precision.json.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from benchmarks._record import write_json  # noqa: E402
from erase_diffusion import scorecard, training  # noqa: E402
from erase_diffusion.concepts import miniworld_spec  # noqa: E402
from erase_diffusion.config import CLIPEraseConfig  # noqa: E402
from erase_diffusion.models import load_judge, load_pipeline  # noqa: E402
from erase_diffusion.patch import write_patch  # noqa: E402
from erase_diffusion.patch_reader import load_patch  # noqa: E402
from erase_diffusion.pipelines.loading import load_patches  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--n", type=int, default=64, help="prompts per found set (retained: 2n)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "half_precision.json"))
    args = p.parse_args()
    spec = miniworld_spec([args.concept])
    with tempfile.TemporaryDirectory() as tmp:
        keep = training.half_precision
        training.half_precision = lambda f: f  # the run's factors as trained, in float32
        try:
            config = CLIPEraseConfig(output_dir=str(Path(tmp) / "run"), validation_steps=0, report_to="none",
                                     eval_generations=0)
            full = Path(training.run(spec, config)["patch"])
        finally:
            training.half_precision = keep
        patch = load_patch(full)
        md = patch.metadata
        half_layers = {c: {m: keep(f) for m, f in mods.items()} for c, mods in patch.layers.items()}
        half = write_patch(Path(tmp) / "half.safetensors", half_layers, method=md["method"], settings=md["settings"],
                           erased=md["erased"], protected=md["protected"], base_model=md["base_model"],
                           fingerprints=md["fingerprints"])
        product = max(float((half_layers[c][m].delta() - f.delta()).norm() / f.delta().norm())
                      for c, mods in patch.layers.items() for m, f in mods.items())
        sizes = {"float32": full.stat().st_size, "float16": half.stat().st_size}
        base, judge = load_pipeline("miniworld"), load_judge("miniworld")
        pipes = {}
        for name, path in (("float32", full), ("float16", half)):
            pipes[name] = load_pipeline("miniworld")
            pipes[name].set_progress_bar_config(disable=True)
            load_patches(pipes[name], [path])
    base.set_progress_bar_config(disable=True)
    card = scorecard.Scorecard(base, judge, spec, n=args.n, n_retained=2 * args.n)
    labels = {name: card.labels(pipe) for name, pipe in pipes.items()}
    differ = {}
    for key in labels["float32"]:
        a, b = labels["float32"][key], labels["float16"][key]
        changed = torch.stack([a[attr] != b[attr] for attr in a]).any(0)
        differ["_".join(str(k) for k in key if k)] = {"changed": int(changed.sum()), "n": int(changed.numel())}
    ids = base.tokenizer(["", f"a red {args.concept}"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out32, out16 = (pipes[k].text_encoder(ids)[0] for k in ("float32", "float16"))
    result = {"concept": args.concept, "bytes": sizes, "product_rel_error_max": product,
              "encoder_output_abs_diff_max": float((out32 - out16).abs().max()),
              "encoder_output_abs_max": float(out32.abs().max()), "labels_changed": differ}
    print("| measure | value |\n|---|---|")
    print(f"| patch bytes, float32 → float16 | {sizes['float32']:,} → {sizes['float16']:,} |")
    print(f"| largest relative change of B @ A | {product:.1e} |")
    print(f"| largest change of the encoder's output (empty prompt, 'a red {args.concept}') | "
          f"{result['encoder_output_abs_diff_max']:.1e} of {result['encoder_output_abs_max']:.1f} |")
    for k, v in differ.items():
        print(f"| judged labels changed, {k} | {v['changed']} / {v['n']} |")
    write_json(Path(args.output), result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
