"""Patch size versus delivering a whole text encoder, and fingerprint speed, on a CLIP-L-sized text encoder.

Random weights with the real CLIP-L config (hidden 768, 12 layers, 12 heads, MLP 3072, vocab 49408); a rank-8 patch
on q/k/v/out of every layer, and patches on what CLIPErase trains (``training.TEXT_TARGETS``: q/k/v/out, fc1 and fc2
of every layer) at rank 8 (its default) and rank 4 (adversarial CLIPErase's); CLIPErase writes float16. Prints a table and writes benchmarks/results/patch_size.json.

    python benchmarks/bench_patch_size.py [--rank 8]
"""

from __future__ import annotations

import argparse
import itertools
import re
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from _record import write_json  # adds the "meta" block (commit, command, started, finished)
from erase_diffusion.patch import fingerprint, write_patch
from erase_diffusion.training import TEXT_TARGETS
from erase_diffusion.patch_format import LoraFactors
from erase_diffusion.patch_reader import describe_patch, load_patch

FULL_ENCODER_BYTES = 0.49e9  # AdvUnlearn ships a whole fp32 CLIP-L text encoder (~0.49e9 bytes = 0.46 GiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "patch_size.json"))
    args = parser.parse_args()
    from erase_diffusion.threads import configure_threads

    configure_threads()  # OMP_NUM_THREADS wins; otherwise a count that does not oversubscribe

    torch.manual_seed(0)
    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         vocab_size=49408, max_position_embeddings=77, projection_dim=768)
    te = CLIPTextModel(cfg).eval()
    encoder_params = sum(p.numel() for p in te.parameters())
    wrapped = torch.nn.Module()  # TEXT_TARGETS names modules under a CLIPModel's text_model
    wrapped.text_model = getattr(te, "text_model", te)
    def factors(rank: int) -> dict:
        return {name: LoraFactors(A=torch.randn(rank, lin.in_features) * 0.01, B=torch.randn(lin.out_features, rank) * 0.01)
                for name, lin in wrapped.named_modules()
                if isinstance(lin, torch.nn.Linear) and re.fullmatch(TEXT_TARGETS, name)}

    layers = factors(args.rank)
    attention = {m: f for m, f in layers.items() if ".self_attn." in m}
    kinds = {"": attention, "cliperase_": layers, "cliperase_r4_": factors(4)}  # r4: adversarial CLIPErase's rank

    fingerprint(te)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fp = fingerprint(te)
        times.append(time.perf_counter() - t0)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (kind, chosen), dtype in itertools.product(kinds.items(), (torch.float32, torch.float16)):
            lay = {m: LoraFactors(f.A.to(dtype), f.B.to(dtype)) for m, f in chosen.items()}
            path = Path(tmp) / f"patch_{kind}{str(dtype).split('.')[-1]}.safetensors"
            t0 = time.perf_counter()
            write_patch(path, {"text_encoder": lay}, method="benchmark", settings={"rank": args.rank}, erased=["x"],
                        protected=[], base_model="clip-l-sized-random", fingerprints={"text_encoder": fp})
            t_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_patch(path)
            t_load = time.perf_counter() - t0
            d = describe_patch(path)
            rows[kind + str(dtype).split(".")[-1]] = {
                "parameters": d["parameters"], "bytes": d["size_bytes"],
                "fraction_of_full_encoder": d["size_bytes"] / FULL_ENCODER_BYTES,
                "times_smaller": FULL_ENCODER_BYTES / d["size_bytes"], "save_s": t_save, "load_validate_s": t_load,
            }
    result = {
        "config": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "vocab": 49408,
                   "rank": args.rank, "targets": "q/k/v/out_proj, all 12 layers", "modules": len(attention)},
        "text_encoder_parameters": encoder_params,
        "full_encoder_bytes_reference": FULL_ENCODER_BYTES,
        "patch": {k: rows[k] for k in ("float32", "float16")},
        **{f"patch_{kind.rstrip('_')}": {dtype: rows[kind + dtype] for dtype in ("float32", "float16")}
           for kind in kinds if kind},
        "cliperase_targets": "q/k/v/out_proj, fc1, fc2, all 12 layers", "cliperase_modules": len(layers),
        "fingerprint": {"value": fp, "seconds_best_of_3": min(times), "seconds_all": times},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(f"CLIP-L-sized text encoder: {encoder_params:,} parameters; rank-{args.rank} patches on {len(attention)} "
          f"(attention) and {len(layers)} (CLIPErase's targets) modules")
    print(f"{'patch':<22} {'params':>10} {'bytes':>12} {'MiB':>6} {'vs 0.46 GiB':>11} {'smaller':>9} {'save s':>7} "
          f"{'load s':>7}")
    for k, r in rows.items():
        print(f"{k:<22} {r['parameters']:>10,} {r['bytes']:>12,} {r['bytes'] / 2**20:>6.2f} "
              f"{r['fraction_of_full_encoder']:>11.4%} {r['times_smaller']:>8.0f}x {r['save_s']:>7.3f} "
              f"{r['load_validate_s']:>7.3f}")
    print(f"fingerprint {fp}: {min(times) * 1000:.1f} ms (best of 3)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
