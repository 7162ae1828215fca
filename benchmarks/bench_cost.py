"""What erasing one concept costs, per method: wall time, peak memory, artifact bytes — on the miniature world and at
real size — and the inference latency of a patched pipeline (unfused LoRA and fused) against the base.

    OMP_NUM_THREADS=1 python benchmarks/bench_cost.py [--only all|mini|real] [--skip_esd_real] [--repeats 7]

Real size uses random weights with real configs: a CLIP-L text encoder (hidden 768, 12 layers, vocab 49408) for the
nullspace edit; one step of the project's CLIPErase objective (training.EraseObjective, LoRA r8, the original
model's passes included, image features precomputed as in training) for SD 1.5's CLIP-L (batch 32) and SDXL's
CLIP-L + bigG (batch 8), with and without activation checkpointing, each in its own process; and an SD 1.5
UNet2DConditionModel (860 M parameters) for **one** ESD-x step (two frozen forward passes + one forward/backward
through the UNet, batch 1). The 2-core CPU cannot afford whole real-size runs, so the table shows one step and an
extrapolation, labelled as such. Latency: medians of ``--repeats`` interleaved runs in one process.
Writes benchmarks/results/cost.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_evaluate import PeakRSS  # noqa: E402
from benchmarks._record import write_json  # noqa: E402  # adds the "meta" block (commit, command, started, finished)

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


def measure(fn):
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t0
    return out, secs, mem.extra


def clip_l_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, vocab_size=49408, max_position_embeddings=77)).eval()


CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu")  # openai/clip-vit-large-patch14
BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (SDXL's 2nd)


def real_clip(text: dict):
    """A CLIPModel with a real-size text tower (random weights) and a token vision tower: the CLIPErase step reads
    image features computed once by the frozen vision tower, so its size does not enter the step's cost."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=text["projection_dim"])
    return CLIPModel(CLIPConfig(text_config={**text, "vocab_size": 49408, "max_position_embeddings": 77},
                                vision_config=vision, projection_dim=text["projection_dim"])).eval()


def cliperase_step(texts: list[dict], tok, batch: int, gradient_checkpointing: bool = False, rank: int = 8) -> dict:
    """One optimisation step of the project's own objective (``cliperase.EraseObjective``: the three CLIPErase
    modules + token terms, the original model's passes included) with ``train_erase.py``'s LoRA on every text tower in ``texts``
    (SD 1.5: CLIP-L, last layer; SDXL: CLIP-L + bigG, penultimate layer and bigG's pooled embedding).
    Times the second step (the first warms up). Run it in its own process (``isolated``): the peak is per process."""
    import argparse

    from erase_diffusion.cliperase import EraseObjective, LossWeights, TextTower, original, original_outputs
    from erase_diffusion.concepts import ConceptSpec
    from erase_diffusion.config import CLIPEraseConfig
    from erase_diffusion.data import prompt_sets
    from erase_diffusion.training import make_trainable

    sdxl = len(texts) == 2
    names = ["text_encoder", "text_encoder_2"][: len(texts)]
    args = argparse.Namespace(rank=rank, lora_alpha=None, full_finetune=False, train_vision_tower=False,
                              gradient_checkpointing=gradient_checkpointing)
    students, towers = {}, []
    for name, text in zip(names, texts):
        student = real_clip(text)
        make_trainable(student, args)
        g = torch.Generator().manual_seed(1)
        dim = text["projection_dim"]
        towers.append(TextTower(name, "random", tok, "", layer=-2 if sdxl else -1, pooled=name == "text_encoder_2",
                                forget_img=torch.randn(64, dim, generator=g), retain_img=torch.randn(64, dim, generator=g)))
        students[name] = student
    model = EraseObjective(students, towers, LossWeights.of(CLIPEraseConfig()), "dot")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    prompts = prompt_sets(ConceptSpec(["apple"], keep=["pear", "banana"], anchor="fruit"), miniworld=False)
    caption = prompts["forget"][:batch]
    idx = torch.arange(batch) % 64
    # the original model's outputs are computed once before training (cliperase.original_outputs), not per step
    for tower in towers:
        with original(students[tower.name], tower) as ref:
            tower.retain_txt = original_outputs(ref, tower, prompts["retain"][:64], "cpu", pooled_only=True)
            tower.targets = {k: original_outputs(ref, tower, prompts[k][:batch], "cpu") for k in ("anchor", "retain")}
        longest = max(len(ids) for ids in tok(prompts["forget"] + prompts["retain"]).input_ids)
        tower.fit = min(tok.model_max_length, longest + 1)
    order = torch.arange(batch)
    data = {"fi": idx, "ri": idx, "forget_captions": caption, "retain_captions": prompts["retain"][:batch],
            "forget_prompts": caption, "pi": order, "retain_prompts": prompts["retain"][:batch], "qi": order}

    def step():
        loss, _ = model(data)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    _, secs, peak = measure(step)
    # the warm-up step's allocations stay cached, so the step's "extra" alone understates the footprint
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for m in students.values() for p in m.parameters())
    return {"seconds": secs, "peak_bytes": peak, "process_peak_bytes": process_peak, "weights_bytes": weights,
            "seconds_200_steps_extrapolated": secs * 200,  # train_erase.py's default --max_train_steps
            "batch": batch, "lora_params": sum(p.numel() for p in params), "gradient_checkpointing": gradient_checkpointing,
            "note": "one step of EraseObjective after a warm-up step; image features precomputed (frozen vision tower)"}


def isolated(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh spawned process, so its ru_maxrss is its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def esd_step_sd15(latent: int = 64):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    n_params = sum(p.numel() for p in unet.parameters())
    for p in unet.parameters():
        p.requires_grad_(False)
    attn2 = [p for n, p in unet.named_parameters() if ".attn2." in n]
    for p in attn2:
        p.requires_grad_(True)
    opt = torch.optim.Adam(attn2, lr=1e-5)
    x = torch.randn(1, 4, latent, latent)
    t = torch.tensor([500])
    c, u = torch.randn(1, 77, 768), torch.randn(1, 77, 768)

    def step():
        with torch.no_grad():
            e_c = unet(x, t, encoder_hidden_states=c).sample
            e_u = unet(x, t, encoder_hidden_states=u).sample
            target = e_u - (e_c - e_u)
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=c).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    _, secs, peak = measure(step)
    to_kv = sum(p.numel() for n, p in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n)
    return {"unet_params": n_params, "step_s": secs, "step_peak_bytes": peak, "latent": latent,
            "esd_x_artifact_bytes": sum(p.numel() for p in attn2) * 4, "uce_artifact_bytes": to_kv * 4}


def latency(pipe_a, pipe_b, prompts, steps, repeats):
    """Interleaved medians (s) of full pipeline calls on the same seeds."""
    ta, tb = [], []
    for r in range(repeats + 1):
        for pipe, acc in ((pipe_a, ta), (pipe_b, tb)) if r % 2 == 0 else ((pipe_b, tb), (pipe_a, ta)):
            gens = [torch.Generator().manual_seed(k) for k in range(len(prompts))]
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=steps, generator=gens, output_type="pt")
            if r > 0:  # the first round warms up
                acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def encoder_latency(te_a, te_b, ids, repeats):
    ta, tb = [], []
    with torch.no_grad():
        for r in range(repeats + 1):
            for te, acc in ((te_a, ta), (te_b, tb)) if r % 2 == 0 else ((te_b, tb), (te_a, ta)):
                t0 = time.perf_counter()
                for _ in range(10):
                    te(ids)
                if r > 0:
                    acc.append((time.perf_counter() - t0) / 10)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="miniworld")
    ap.add_argument("--only", choices=("all", "mini", "real"), default="all",
                    help="measure one part and merge it into an existing --output file")
    ap.add_argument("--skip_esd_real", action="store_true")
    ap.add_argument("--esd_latent", type=int, default=64, help="SD 1.5 latent side (64 = 512 px)")
    ap.add_argument("--esd_steps", type=int, default=20, help="ESD-x steps timed on the miniworld (then ×300/steps)")
    ap.add_argument("--cliperase_json", default=str(ROOT / "benchmarks" / "results" / "evaluate.json"),
                    help="bench_evaluate output to take the measured CLIPErase training time from")
    ap.add_argument("--real_batch", type=int, default=32, help="CLIPErase step batch at CLIP-L size")
    ap.add_argument("--sdxl_batch", type=int, default=8, help="CLIPErase step batch at SDXL size (CLIP-L + bigG)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--latency_steps", type=int, default=20)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cost.json"))
    args = ap.parse_args()
    from erase_diffusion.threads import configure_threads

    configure_threads()  # OMP_NUM_THREADS wins; otherwise a count that does not oversubscribe

    from benchmarks.peers import esd_x, uce
    from erase_diffusion import nullspace
    from erase_diffusion.models import load_pipeline
    from erase_diffusion.pipelines.loading import fuse, load_patches

    res: dict = {"threads": torch.get_num_threads(), "mini": {}, "real": {}, "latency": {}}
    if args.only != "all" and Path(args.output).is_file():
        old = json.loads(Path(args.output).read_text())
        res.update({k: old.get(k, {}) for k in ("mini", "real", "latency")})
        args.merged_from = old  # its meta is kept in this file's (report → write_json)
    work = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    if args.only == "real":
        from transformers import CLIPTokenizer

        from erase_diffusion.miniworld.tokenizer import write_tokenizer

        write_tokenizer(work / "tok")
        real_part(res, CLIPTokenizer.from_pretrained(work / "tok"), args)
        report(res, args)
        return
    base = load_pipeline(args.model)

    # ---- miniworld: erase one concept
    patch, secs, peak = measure(lambda: nullspace.erase(args.model, ["circle"], output=work / "ns.safetensors",
                                                        pipe=base))
    res["mini"]["nullspace"] = {"seconds": secs, "peak_bytes": peak, "artifact_bytes": patch.stat().st_size}
    (_, st), secs, peak = measure(lambda: uce(base, "circle"))
    res["mini"]["uce"] = {"seconds": secs, "peak_bytes": peak, "artifact_bytes": st["artifact_bytes"]}
    (_, st), secs, peak = measure(lambda: esd_x(base, "circle", steps=args.esd_steps, progress=False))
    res["mini"]["esd-x"] = {"seconds_measured": secs, "steps_measured": st["steps"],
                            "seconds_300_steps_extrapolated": secs / st["steps"] * 300, "peak_bytes": peak,
                            "artifact_bytes": st["artifact_bytes"]}
    try:
        ev = json.loads(Path(args.cliperase_json).read_text())
        c = ev["details"]["cliperase"]["cost"]
        res["mini"]["cliperase"] = {"seconds": c["erase_s"], "peak_bytes": c["peak_bytes"],
                                    "peak_kind": c.get("peak_kind"), "artifact_bytes": c["artifact_bytes"],
                                    "source": args.cliperase_json, "source_meta": ev.get("meta")}
    except (OSError, KeyError, ValueError):
        res["mini"]["cliperase"] = {"note": "run bench_evaluate.py first (it trains CLIPErase with its defaults)"}

    if args.only == "all":
        real_part(res, base.tokenizer, args)
    latency_part(res, base, patch, args, load_pipeline, load_patches, fuse)
    report(res, args)


def real_part(res, tok, args):
    """Real-size costs. ``tok``: token ids < 49408 fit CLIP-L's table; the vocabulary does not change the cost."""
    if True:
        from erase_diffusion.nullspace import encoder_edit
        from erase_diffusion.prompts import PromptSet

        te = clip_l_text_encoder()
        _, secs, peak = measure(lambda: encoder_edit(te, tok, ["circle"], [], prompts=PromptSet(), anchor=""))
        res["real"]["nullspace_clip_l"] = {"seconds": secs, "peak_bytes": peak}
        del te
        gc.collect()
        for ckpt in (False, True):
            suffix = "_checkpointing" if ckpt else ""
            res["real"][f"cliperase_step_clip_l{suffix}"] = isolated(cliperase_step, [CLIP_L_TEXT], tok,
                                                                     batch=args.real_batch, gradient_checkpointing=ckpt)
            res["real"][f"cliperase_step_sdxl{suffix}"] = isolated(cliperase_step, [CLIP_L_TEXT, BIGG_TEXT], tok,
                                                                   batch=args.sdxl_batch, gradient_checkpointing=ckpt)
        if not args.skip_esd_real:
            res["real"]["esd_x_sd15_one_step"] = esd_step_sd15(args.esd_latent)
            r = res["real"]["esd_x_sd15_one_step"]
            r["seconds_1000_steps_extrapolated"] = r["step_s"] * 1000
        gc.collect()



def latency_part(res, base, patch, args, load_pipeline, load_patches, fuse):
    """Inference latency on the miniworld: base vs patched (unfused LoRA, fused)."""
    patched = load_pipeline(args.model)
    load_patches(patched, [patch])
    prompts = ["a red circle", "a solid blue square", "a striped green star", "an outlined yellow heart"]
    ids = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    b, u = latency(base, patched, prompts, args.latency_steps, args.repeats)
    eb, eu = encoder_latency(base.text_encoder, patched.text_encoder, ids, args.repeats)
    fuse(patched)
    b2, f = latency(base, patched, prompts, args.latency_steps, args.repeats)
    eb2, ef = encoder_latency(base.text_encoder, patched.text_encoder, ids, args.repeats)
    res["latency"] = {
        "prompts": len(prompts), "steps": args.latency_steps, "repeats": args.repeats,
        "pipeline_base_s": b, "pipeline_unfused_s": u, "unfused_overhead": u / b - 1,
        "pipeline_base_s_2": b2, "pipeline_fused_s": f, "fused_overhead": f / b2 - 1,
        "encoder_base_s": eb, "encoder_unfused_s": eu, "encoder_unfused_overhead": eu / eb - 1,
        "encoder_fused_s": ef, "encoder_fused_overhead": ef / eb2 - 1,
        "targets": {"fused_overhead": 0.0, "unfused_overhead": 0.03},
    }



def report(res, args):
    def mib(x):
        return "–" if x is None else f"{x / 2**20:.0f} MiB"

    mini = res["mini"]
    lines = []
    if "nullspace" in mini:
        lines += table_mini(mini, mib)
    real, L = res["real"], res["latency"]
    lines += table_real(real, L, mib)
    md = "\n".join(lines)
    print(md)
    res["markdown"] = md
    write_json(args.output, res, merged_from=getattr(args, "merged_from", None))
    print(f"wrote {args.output}")


def table_mini(mini, mib):
    lines = ["| method | scale | erase time | peak extra RSS | artifact |", "|---|---|---|---|---|"]
    lines.append(f"| nullspace | miniworld | {mini['nullspace']['seconds']:.2f} s | {mib(mini['nullspace']['peak_bytes'])} "
                 f"| {mini['nullspace']['artifact_bytes'] / 1024:.1f} KiB |")
    if "seconds" in mini["cliperase"]:
        c = mini["cliperase"]
        lines.append(f"| CLIPErase (train_erase.py defaults) | miniworld | {c['seconds']:.1f} s | "
                     f"{mib(c['peak_bytes'])} (process total) | {c['artifact_bytes'] / 1024:.1f} KiB |")
    e = mini["esd-x"]
    lines.append(f"| ESD-x | miniworld | {e['seconds_measured']:.1f} s for {e['steps_measured']} steps "
                 f"(≈ {e['seconds_300_steps_extrapolated']:.0f} s / 300, extrapolated) | {mib(e['peak_bytes'])} | "
                 f"{e['artifact_bytes'] / 1024:.1f} KiB |")
    lines.append(f"| UCE | miniworld | {mini['uce']['seconds']:.2f} s | {mib(mini['uce']['peak_bytes'])} | "
                 f"{mini['uce']['artifact_bytes'] / 1024:.1f} KiB |")
    return lines


def table_real(real, L, mib):
    lines = ["", "| method | scale | erase time | peak extra RSS | artifact |", "|---|---|---|---|---|"]
    if "nullspace_clip_l" in real:
        lines.append(f"| nullspace | CLIP-L text encoder | {real['nullspace_clip_l']['seconds']:.1f} s | "
                     f"{mib(real['nullspace_clip_l']['peak_bytes'])} | – |")
        for key, scale in (("cliperase_step_clip_l", "CLIP-L (SD 1.5)"), ("cliperase_step_sdxl", "CLIP-L + bigG (SDXL)"),
                           ("cliperase_step_clip_l_checkpointing", "CLIP-L (SD 1.5), --gradient_checkpointing"),
                           ("cliperase_step_sdxl_checkpointing", "CLIP-L + bigG (SDXL), --gradient_checkpointing")):
            if key in real:
                c = real[key]
                lines.append(f"| CLIPErase, one step, batch {c['batch']} | {scale} | {c['seconds']:.1f} s (×200 ≈ "
                             f"{c['seconds_200_steps_extrapolated'] / 3600:.1f} h, extrapolated) | {mib(c['peak_bytes'])} "
                             f"after a warm-up step; its process's peak {c['process_peak_bytes'] / 2**30:.1f} GiB, of which "
                             f"{c['weights_bytes'] / 2**30:.1f} GiB weights | – |")
    if "esd_x_sd15_one_step" in real:
        r = real["esd_x_sd15_one_step"]
        lines.append(f"| ESD-x, one step | SD 1.5 UNet ({r['latent'] * 8} px) | {r['step_s']:.1f} s (×1000 ≈ "
                     f"{r['seconds_1000_steps_extrapolated'] / 3600:.1f} h, extrapolated) | {mib(r['step_peak_bytes'])} | "
                     f"{r['esd_x_artifact_bytes'] / 2**20:.0f} MiB (UCE K/V: {r['uce_artifact_bytes'] / 2**20:.0f} MiB) |")
    if not L:
        return lines
    lines += ["", "| inference (miniworld, 4 prompts) | base | patched | overhead | target |", "|---|---|---|---|---|",
              f"| pipeline, unfused LoRA | {L['pipeline_base_s']:.3f} s | {L['pipeline_unfused_s']:.3f} s | "
              f"{100 * L['unfused_overhead']:+.1f} % | ≤ 3 % |",
              f"| pipeline, fused | {L['pipeline_base_s_2']:.3f} s | {L['pipeline_fused_s']:.3f} s | "
              f"{100 * L['fused_overhead']:+.1f} % | 0 % |",
              f"| text encoder only, unfused | {1000 * L['encoder_base_s']:.2f} ms | {1000 * L['encoder_unfused_s']:.2f} ms"
              f" | {100 * L['encoder_unfused_overhead']:+.1f} % | – |",
              f"| text encoder only, fused | {1000 * L['encoder_base_s']:.2f} ms | {1000 * L['encoder_fused_s']:.2f} ms | "
              f"{100 * L['encoder_fused_overhead']:+.1f} % | – |"]
    return lines


if __name__ == "__main__":
    main()
