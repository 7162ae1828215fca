"""Seeded fuzzing of patch files: >= 1,000 mutated patches through every reader on a tiny random SD pipeline.

Each case is one mutation of a valid patch (byte flips, truncation, header edits, NaN / Inf / huge tensors, extra or
missing keys, rank mismatches, metadata edits, pickles, directories, symlinks, special files). Per case:
``load_patches`` must either accept the file, with a text-encoder effect equal to the file's own B @ A (read
independently with safetensors) and finite, or raise ``PatchError`` leaving the pipeline bit-identical (same tensors,
no adapter); ``describe_patch`` (inspect) and ``apply_to_clip`` must likewise succeed or raise ``PatchError``.

``run_fuzz`` is shared with ``benchmarks/bench_robustness_io.py``, which prints the table.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import struct
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from erase_diffusion.patch import apply_to_clip, fingerprint, write_patch
from erase_diffusion.patch_format import LoraFactors, PatchError, content_sha256
from erase_diffusion.patch_reader import describe_patch, load_patch
from erase_diffusion.pipelines.loading import load_patches

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 0]])
CATEGORIES = ("byte_flip", "data_flip", "truncate", "trailing", "header_edit", "header_length", "nan_inf", "huge",
              "extra_key", "missing_key", "rank_mismatch", "adapter_metadata", "our_metadata", "dtype", "pickle",
              "directory", "symlink", "special", "consistent_edit")


# --------------------------------------------------------------------------------------------------- the valid patches
def base_patches(pipe, folder: Path) -> list[Path]:
    """Two patches for ``pipe``'s text encoder: LoRA with mixed ranks, and two of its modules plus a CLIPModel-only
    ``clip.visual_projection`` (shaped for ``tiny_models.clip_for``; loaded through the in-memory state dict)."""
    te = pipe.text_encoder
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, layer in enumerate(te.encoder.layers):
        for t in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"):
            lin = layer.get_submodule(t)
            r = 2 + i
            layers[f"text_model.encoder.layers.{i}.{t}"] = LoraFactors(
                A=torch.randn(r, lin.in_features, generator=g) * 0.2, B=torch.randn(lin.out_features, r, generator=g) * 0.2)
    projection = te.config.projection_dim or te.config.hidden_size  # clip_for's vision tower is 32 wide
    visual = LoraFactors(A=torch.randn(1, 32, generator=g) * 0.2, B=torch.randn(projection, 1, generator=g) * 0.2)
    kw = dict(method="fuzz", settings={"seed": 0}, erased=["cat"], protected=["dog"], base_model="tiny",
              fingerprints={"text_encoder": fingerprint(te)})
    lora, with_clip = folder / "base_lora.safetensors", folder / "base_clip.safetensors"
    write_patch(lora, {"text_encoder": layers}, **kw)
    write_patch(with_clip, {"text_encoder": dict(list(layers.items())[:2]), "clip": {"visual_projection": visual}}, **kw)
    return [lora, with_clip]


def split(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a valid safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def write(path: Path, tensors: dict, meta: dict, rehash: bool) -> None:
    """A well-formed safetensors file; ``rehash``: the checksum recomputed, as a careful attacker would."""
    meta = dict(meta)
    if rehash:
        meta["erase_diffusion.sha256"] = content_sha256(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def raw_parts(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def raw_join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


# --------------------------------------------------------------------------------------------------------- mutations
def mutate(rng: random.Random, category: str, src: Path, dst: Path) -> str:
    """Write one mutation of ``src`` at ``dst`` (a file, folder, link or FIFO); returns a short description."""
    data = src.read_bytes()
    tensors, meta = split(src)
    keys = sorted(tensors)
    rehash = rng.random() < 0.5
    if category == "byte_flip":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        dst.write_bytes(bytes(buf))
        return "bits flipped anywhere"
    if category == "data_flip":
        (n,) = struct.unpack("<Q", data[:8])
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(8 + n, len(buf))] ^= 1 << rng.randrange(8)
        dst.write_bytes(bytes(buf))
        return "bits flipped in tensor data"
    if category == "truncate":
        dst.write_bytes(data[: rng.randrange(len(data))])
        return "truncated"
    if category == "trailing":
        dst.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
        return "trailing bytes"
    if category == "header_length":
        n = rng.choice([0, 1, 7, 2**63, 2**40, rng.randrange(len(data) * 2)])
        dst.write_bytes(struct.pack("<Q", n % 2**64) + data[8:])
        return f"header length {n}"
    if category == "header_edit":
        header, body = raw_parts(data)
        key = rng.choice([k for k in header if k != "__metadata__"])
        what = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "meta_type", "not_dict", "nested"])
        if what == "dtype":
            header[key]["dtype"] = rng.choice(["F64", "I32", "U8", "BOOL", "F16", "BF16", "XX", 3])
        elif what == "shape":
            header[key]["shape"] = rng.choice([[], [1], [0, 4], [10**9, 10**9], [-1, 2], "x",
                                               list(reversed(header[key]["shape"]))])
        elif what == "offsets":
            header[key]["data_offsets"] = rng.choice([[0, 0], [5, 2], [-4, 8], [0, 10**12], "x", [1, 2, 3]])
        elif what == "drop":
            del header[key]
        elif what == "rename":
            header[key.replace("layers.0", "layers.7").replace("lora_A", "lora_C")] = header.pop(key)
        elif what == "meta_type":
            header["__metadata__"] = rng.choice([[1, 2], {"erase_diffusion.format_version": 1}, "x", None])
        elif what == "not_dict":
            dst.write_bytes(raw_join([header], body)[:8] + json.dumps([1]).encode().ljust(0) + body)
            return "header not an object"
        else:
            header[key] = rng.choice([None, 1, "x", [], {"dtype": "F32"}])
        dst.write_bytes(raw_join(header, body))
        return f"header {what} ({key[-40:]})"
    if category in ("nan_inf", "huge", "rank_mismatch", "extra_key", "missing_key", "dtype"):
        key = rng.choice(keys)
        t = dict(tensors)
        if category == "nan_inf":
            v = t[key].clone()
            v.view(-1)[rng.randrange(v.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
            t[key], desc = v, "NaN/Inf entry"
        elif category == "huge":
            scale = rng.choice([1e4, 1e8, 1e19, 1e30, 3e38])
            t[key], desc = t[key] * scale, f"scaled by {scale:g}"
            if not torch.isfinite(t[key]).all():
                t[key] = torch.nan_to_num(t[key], posinf=3e38, neginf=-3e38)
        elif category == "rank_mismatch":
            v = t[key]
            t[key] = v[:-1] if key.endswith("lora_A.weight") and v.shape[0] > 1 else torch.cat([v, v[:, :1]], dim=1) \
                if key.endswith("lora_B.weight") else torch.cat([v, v[:1]])
            desc = "rank mismatch"
        elif category == "extra_key":
            extra = rng.choice(["unet.down.lora_A.weight", "text_encoder.text_model.embeddings.token_embedding.weight",
                                "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight",
                                "text_encoder.text_model.encoder.layers.9.self_attn.q_proj.lora_A.weight",
                                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                                "clip.visual_projection.lora_A.weight", "text_encoder.x.y.lora_B.weight", "version"])
            t[extra] = torch.randn(2, 32) * 0.1
            desc = f"extra {extra[-40:]}"
            if rng.random() < 0.5 and extra.endswith("lora_A.weight"):  # its B too, so the module is whole
                t[extra.replace("lora_A", "lora_B")] = torch.randn(32, 2) * 0.1
                desc += " + B"
        elif category == "missing_key":
            drop = [key] if rng.random() < 0.5 else [k for k in keys if k.rsplit(".", 2)[0] == key.rsplit(".", 2)[0]]
            for k in drop:
                t.pop(k)
            desc = f"missing {len(drop)} key(s)"
        else:
            dtype = rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.bool])
            t[key], desc = t[key].to(dtype), f"{key[-20:]} as {dtype}"
        write(dst, t, meta, rehash)
        return desc + (" (rehashed)" if rehash else "")
    if category == "adapter_metadata":
        adapter = json.loads(meta["lora_adapter_metadata"])
        field = rng.choice(["lora_alpha", "use_rslora", "use_dora", "target_modules", "r", "rank_pattern",
                            "alpha_pattern", "unknown", "lora_dropout", "bias", "component", "json", "drop"])
        value = None
        if field == "lora_alpha":
            value = rng.choice([256, -128, 0, 4, 2.0, "2", None])
        elif field in ("use_rslora", "use_dora"):
            value = rng.choice([True, 1, "yes"])
        elif field == "target_modules":
            targets = adapter["text_encoder.target_modules"]
            value = rng.choice([targets[:-1], targets + ["encoder.layers.0.self_attn.k_proj"], ["q_proj"], "q_proj",
                                targets[::-1], []])
        elif field == "r":
            value = rng.choice([0, -1, 1, 3, 64, "2", 2.5])
        elif field in ("rank_pattern", "alpha_pattern"):
            value = rng.choice([{}, {"encoder.layers.0.self_attn.q_proj": 7}, {"nope": 2}, [1], {"encoder.layers.1.mlp.fc1": 0}])
        elif field == "unknown":
            field, value = rng.choice([("init_lora_weights", "pissa"), ("layer_replication", [[0, 1]]),
                                       ("fan_in_fan_out", True), ("exclude_modules", ["q_proj"]),
                                       ("init_lora_weights", True), ("peft_version", "0.21.2"),
                                       ("modules_to_save", ["x"]), ("new_field", 1)])
        elif field == "lora_dropout":
            value = rng.choice([0.5, -1, "0"])
        elif field == "bias":
            value = rng.choice(["all", "lora_only"])
        if field == "component":
            adapter["text_encoder_2.r"] = 2
        elif field == "json":
            meta["lora_adapter_metadata"] = rng.choice(["{", "[]", "null", "1"])
        elif field == "drop":
            del meta["lora_adapter_metadata"]  # diffusers then infers alpha = r: valid
        else:
            adapter[f"text_encoder.{field}"] = value
        if field not in ("json", "drop"):
            meta["lora_adapter_metadata"] = json.dumps(adapter)
        write(dst, tensors, meta, False)
        return f"lora_adapter_metadata {field}={value!r}"
    if category == "our_metadata":
        field = rng.choice(["format_version", "kind", "ranks", "fingerprints", "sha256", "settings", "erased",
                            "lora_alpha", "all"])
        key = f"erase_diffusion.{field}"
        value = {
            "format_version": ["abc", "2", "0", "-1", "1.0", "99999999999999999999"],
            "kind": ["full", "x", "lora", ""],
            "ranks": ["{}", '{"text_encoder": {}}', '{"text_encoder": 5}', "[", "null",
                      meta["erase_diffusion.ranks"].replace("2", "3", 1)],
            "fingerprints": ['{"text_encoder": "0000000000000000"}', "{}", '{"text_encoder": 5}', "x"],
            "sha256": ["", "0" * 64, "zz", None],
            "settings": ["{", "[]", "null"],
            "erased": ["[1, 2]", '"cat"', "{"],
            "lora_alpha": ["256", "rank"],
            "all": [None],
        }[field]
        v = rng.choice(value)
        if field == "all":
            meta = {"format": "pt"}
        elif v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
        write(dst, tensors, meta, False)
        return f"{key}={v!r}"
    if category == "pickle":
        kind = rng.choice(["pickle", "torch", "torch_legacy"])

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch PWNED",))

        if kind == "pickle":
            dst.write_bytes(pickle.dumps({"x": Evil()}))
        else:
            torch.save({k: v for k, v in tensors.items()}, dst, _use_new_zipfile_serialization=kind == "torch")
        return kind
    if category == "directory":
        dst.mkdir()
        if rng.random() < 0.5:
            (dst / "erase_patch.safetensors").write_bytes(data)  # a folder holding a valid patch is still not a file
        return "directory"
    if category == "symlink":
        kind = rng.choice(["valid", "dangling", "to_dir", "loop", "dev_null"])
        target = {"valid": src, "dangling": dst.with_name(dst.name + ".missing"), "to_dir": dst.parent,
                  "loop": dst, "dev_null": Path("/dev/null")}[kind]
        os.symlink(target, dst)
        return f"symlink {kind}"
    if category == "special":
        kind = rng.choice(["fifo", "empty", "random", "text"])
        if kind == "fifo":
            os.mkfifo(dst)  # opening it would block forever: must be refused without opening
        elif kind == "empty":
            dst.write_bytes(b"")
        elif kind == "random":
            dst.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(8, 4096))))
        else:
            dst.write_text("hello, this is not a patch\n" * 10)
        return kind
    if category == "consistent_edit":  # well-formed and self-consistent: must load, with exactly this B @ A
        p = load_patch(src)
        layers = {c: dict(m) for c, m in p.layers.items()}
        mods = layers["text_encoder"]
        what = rng.choice(["scale", "drop_module", "add_module", "fp16", "zero"])
        if what == "scale":
            k = rng.choice([0.0, 0.5, 3.0, -1.0])
            mods = {m: LoraFactors(f.A * k, f.B) for m, f in mods.items()}
        elif what == "drop_module":
            mods.pop(rng.choice(sorted(mods)[1:]))  # sorted()[0] is a q_proj or out_proj: never MLP-only
        elif what == "add_module":
            g = torch.Generator().manual_seed(rng.randrange(2**31))
            r = rng.randint(1, 4)
            mods["text_model.encoder.layers.0.self_attn.k_proj"] = LoraFactors(
                torch.randn(r, 32, generator=g) * 0.3, torch.randn(32, r, generator=g) * 0.3)
        elif what == "fp16":
            mods = {m: LoraFactors(f.A.half(), f.B.half()) for m, f in mods.items()}
        else:
            mods = {m: LoraFactors(torch.zeros_like(f.A), torch.zeros_like(f.B)) for m, f in mods.items()}
        layers["text_encoder"] = mods
        md = p.metadata
        write_patch(dst, layers, method="fuzz", settings=md["settings"], erased=md["erased"],
                    protected=md["protected"], base_model=md["base_model"], fingerprints=md["fingerprints"])
        return what
    raise ValueError(category)


# ------------------------------------------------------------------------------------------------------------- oracle
def snapshot(pipe) -> dict:
    return {k: v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()}


def unchanged(pipe, before: dict) -> bool:
    now = pipe.text_encoder.state_dict()
    return (now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)
            and not pipe.get_list_adapters())


def expected_output(base_te, path: Path) -> torch.Tensor:
    """The text encoder with the file's own ΔW (B @ A) merged by hand, read with safetensors."""
    te = copy.deepcopy(base_te)
    tensors = load_file(str(path))
    with torch.no_grad():
        for key, t in tensors.items():
            if not key.startswith("text_encoder."):
                continue
            module = key.removeprefix("text_encoder.text_model.").rsplit(".", 2)[0]
            if key.endswith(".lora_A.weight"):
                B = tensors[key.replace("lora_A", "lora_B")]
                te.get_submodule(module).weight += B.float() @ t.float()
        return te(IDS)[0]


def run_fuzz(n: int = 1000, seed: int = 0, folder: Path | None = None) -> dict:
    """Run ``n`` seeded cases; returns counts, the failures (empty when all is well) and timings."""
    import tempfile

    from tiny_models import clip_for, sd_pipeline

    folder = Path(folder or tempfile.mkdtemp(prefix="patch-fuzz-"))
    start = time.perf_counter()
    pipe = sd_pipeline()
    base_te = copy.deepcopy(pipe.text_encoder)
    clip, _ = clip_for(pipe.text_encoder)
    before = snapshot(pipe)
    with torch.no_grad():
        base_out = pipe.text_encoder(IDS)[0].clone()
    bases = base_patches(pipe, folder)
    rng = random.Random(seed)
    counts = Counter()
    per_category = {c: Counter() for c in CATEGORIES}
    failures = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]  # every category equally often, the mutation itself random
        dst = folder / f"case{i:05d}.safetensors"
        desc = mutate(rng, category, rng.choice(bases), dst)
        case = f"#{i} {category}: {desc}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no content checksum" on cases that drop it
            verdicts = []
            for reader in ("inspect", "apply_to_clip", "load_patches"):
                try:
                    if reader == "inspect":
                        describe_patch(dst)
                    elif reader == "apply_to_clip":
                        apply_to_clip(copy.deepcopy(clip), dst)
                    else:
                        load_patches(pipe, dst, adapter_names=["fuzz"])
                    verdicts.append("accepted")
                except PatchError as err:
                    verdicts.append("refused")
                    if "\n" in str(err) or "not a valid patch (" in str(err):  # one line, and not the catch-all
                        failures.append(f"{case}: {reader} gave an unclear PatchError: {str(err)[:200]!r}")
                except Exception as err:  # noqa: BLE001 - exactly what the fuzz test counts
                    verdicts.append("crash")
                    counts["crashes"] += 1
                    failures.append(f"{case}: {reader} raised {type(err).__name__}: {str(err)[:200]}")
        verdict = verdicts[-1]
        per_category[category][verdict] += 1
        counts[verdict] += 1
        if verdict == "accepted":
            with torch.no_grad():
                got = pipe.text_encoder(IDS)[0]
            want = expected_output(base_te, dst)
            if not torch.isfinite(got).all():
                counts["non_finite"] += 1
                failures.append(f"{case}: accepted, but the conditioning is not finite")
            elif (got - want).abs().max() > 1e-4 * max(1.0, want.abs().max().item()):
                counts["silent_corruption"] += 1
                failures.append(f"{case}: accepted, but the effect differs from the file's B @ A by "
                                f"{(got - want).abs().max().item():.3g}")
            pipe.unload_lora_weights()
            if not unchanged(pipe, before):  # the next case needs the base pipeline
                failures.append(f"{case}: unload_lora_weights did not give the base back; rebuilt")
                pipe = sd_pipeline()
        elif verdict == "refused":
            with torch.no_grad():
                same_out = torch.equal(pipe.text_encoder(IDS)[0], base_out)
            if not unchanged(pipe, before) or not same_out:
                counts["changed_after_refusal"] += 1
                failures.append(f"{case}: refused, but the pipeline changed")
                pipe = sd_pipeline()
        if verdict == "accepted" and verdicts[0] != "accepted":  # what the loader takes, inspect must describe
            failures.append(f"{case}: loaded but inspect refused it")
        if dst.is_dir() and not dst.is_symlink():
            import shutil

            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
    pwned = Path("PWNED").exists() or (folder / "PWNED").exists()
    if pwned:
        failures.append("a pickle was executed")
    return {"cases": n, "seed": seed, "accepted": counts["accepted"], "refused": counts["refused"],
            "crashes": counts["crashes"], "changed_after_refusal": counts["changed_after_refusal"],
            "silent_corruption": counts["silent_corruption"] + counts["non_finite"],
            "per_category": {c: dict(v) for c, v in per_category.items()}, "failures": failures,
            "seconds": round(time.perf_counter() - start, 1)}


def test_fuzzed_patches_are_accepted_exactly_or_refused_cleanly(tmp_path):
    result = run_fuzz(1000, seed=0, folder=tmp_path)
    assert result["failures"] == [], "\n".join(result["failures"][:20])
    assert result["crashes"] == result["changed_after_refusal"] == result["silent_corruption"] == 0
    # the oracle was exercised both ways, in every category that has valid mutations (symlink to a valid patch,
    # dropped checksum or adapter metadata, dtype fp16, extra whole modules with consistent metadata are fine)
    assert result["accepted"] >= 20 and result["refused"] >= 800, result
    assert all(sum(v.values()) >= 50 for v in result["per_category"].values())
