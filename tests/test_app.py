"""app.py on a tiny random SD pipeline (CPU, offline): the pure handlers, then end to end through gradio_client."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import sd_pipeline

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app.py lives at the repo root, outside the package

import gradio as gr  # noqa: E402

import app as app_module  # noqa: E402
from app import EraseApp, build_demo, generate_pair  # noqa: E402
from erase_diffusion import patch as patch_module  # noqa: E402
from erase_diffusion.patch import fingerprint  # noqa: E402
from erase_diffusion.patch_format import LoraFactors  # noqa: E402

PROMPT = "a photo of a red circle"
FAST = dict(negative_prompt="", seed=3, steps=2, guidance=7.5, size=64, batch=1)
NO_SLIDERS = [1.0] * app_module.MAX_ACTIVE_PATCHES


def write_patch(pipe, path, seed=0, scale=0.5):
    """A valid erase patch with random rank-2 factors on every layer's out_proj (changes any prompt's images)."""
    g = torch.Generator().manual_seed(seed)
    te = pipe.text_encoder
    core = getattr(te, "text_model", te)
    layers = {}
    for i, layer in enumerate(core.encoder.layers):
        lin = layer.self_attn.out_proj
        layers[f"text_model.encoder.layers.{i}.self_attn.out_proj"] = LoraFactors(
            A=torch.randn(2, lin.in_features, generator=g) * scale, B=torch.randn(lin.out_features, 2, generator=g) * scale
        )
    patch_module.write_patch(path, {"text_encoder": layers}, method="test", settings={"seed": seed},
                             erased=["circle"], protected=["square"], base_model="tiny",
                             fingerprints={"text_encoder": fingerprint(te)})
    return Path(path)


def pixels(img) -> np.ndarray:
    from PIL import Image

    if isinstance(img, (str, os.PathLike)):
        img = Image.open(img)
    return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def base_pipe():
    return sd_pipeline()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patches")
    pipe = sd_pipeline()
    write_patch(pipe, folder / "erase-circle.safetensors", seed=0)
    write_patch(pipe, folder / "other.safetensors", seed=1)
    return EraseApp(pipe, patch_dir=folder, model="tiny")


def run(app, prompt=PROMPT, patches=(), strengths=(), **kw):
    settings = {**FAST, **kw}
    return app.generate(prompt, settings["negative_prompt"], settings["seed"], settings["steps"], settings["guidance"],
                        settings["size"], settings["batch"], list(patches), *strengths)


# ------------------------------------------------------------------------------------------------ pure functions
def test_original_is_the_base_pipeline_output(app, base_pipe):
    (original, erased), gallery, meta = run(app, patches=["erase-circle.safetensors"], strengths=[1.0])
    ref = base_pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                    output_type="pil").images[0]
    assert np.array_equal(pixels(original), pixels(ref))
    assert len(gallery) == 2
    assert meta["patches"][0]["name"] == "erase-circle.safetensors" and meta["patches"][0]["erased"] == ["circle"]
    assert meta["patches"][0]["strength"] == 1.0 and "path" not in meta["patches"][0]


def test_patch_changes_the_erased_image_only(app):
    (original, erased), _, _ = run(app, patches=["erase-circle.safetensors"], strengths=[1.0])
    assert np.abs(pixels(original) - pixels(erased)).mean() > 1.0
    # and the original does not depend on which patches are selected
    (original2, _), _, _ = run(app, patches=["other.safetensors", "erase-circle.safetensors"], strengths=[1.0, 0.5])
    assert np.array_equal(pixels(original), pixels(original2))


def test_strength_zero_and_no_patch_give_identical_images(app):
    (original, erased), _, meta = run(app, patches=["erase-circle.safetensors"], strengths=[0.0])
    assert np.array_equal(pixels(original), pixels(erased))
    assert meta["patches"][0]["strength"] == 0.0
    (original, erased), _, meta = run(app)
    assert np.array_equal(pixels(original), pixels(erased)) and meta["patches"] == []


def test_batch_uses_consecutive_seeds(app, base_pipe):
    (first, _), gallery, _ = run(app, batch=2, seed=5)
    assert len(gallery) == 4
    ref = base_pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(6),
                    output_type="pil").images[0]
    # equal up to batching round-off: with 2+ CPU threads a batch of 2 and a batch of 1 reduce in different orders
    diff = np.abs(pixels(gallery[2][0]) - pixels(ref))
    assert diff.max() <= 1 and diff.mean() <= 0.01, (diff.max(), diff.mean())  # measured 1 / 0.0002


def test_patches_are_loaded_once_and_cached(app, monkeypatch):
    import erase_diffusion.pipelines.loading as loading

    run(app, patches=["erase-circle.safetensors"], strengths=[1.0])
    calls = []
    real = loading.load_patches
    monkeypatch.setattr(loading, "load_patches", lambda *a, **k: calls.append(a) or real(*a, **k))
    before = app.pipe.get_list_adapters()
    for s in (1.0, 0.3, 0.0):
        run(app, patches=["erase-circle.safetensors"], strengths=[s])
    assert calls == [] and app.pipe.get_list_adapters() == before


def test_generate_pair_without_adapters_is_plain_generation(base_pipe):
    originals, erased = generate_pair(base_pipe, PROMPT, steps=2, seed=3)
    assert originals == erased and len(originals) == 1


def test_path_traversal_and_links_out_are_refused(app, tmp_path):
    outside = write_patch(app.pipe, tmp_path / "outside.safetensors", seed=2)
    link = app.patch_dir / "link-out.safetensors"
    link.symlink_to(outside)
    try:
        bad = ["../outside.safetensors", str(outside), "/etc/passwd", "..", "sub/x.safetensors", "..\\x.safetensors",
               "link-out.safetensors", "missing.safetensors", "erase-circle.pt", "", None, 3]
        for name in bad:
            with pytest.raises(gr.Error):
                app.resolve_patch(name)
            with pytest.raises(gr.Error):
                run(app, patches=[name], strengths=[1.0])
        assert "link-out.safetensors" not in app.list_patches()
        assert set(app.list_patches()) >= {"erase-circle.safetensors", "other.safetensors"}
    finally:
        link.unlink()


def test_bad_requests_are_refused(app):
    cases = [dict(prompt=""), dict(prompt="   "), dict(prompt="x" * 5000), dict(steps=0), dict(steps=10_000),
             dict(steps=2.5), dict(guidance=-1), dict(guidance=float("nan")), dict(size=63), dict(size=4096),
             dict(batch=0), dict(batch=100), dict(seed=-1), dict(seed="abc")]
    for case in cases:
        prompt = case.pop("prompt", PROMPT)
        with pytest.raises(gr.Error):
            run(app, prompt=prompt, **case)
    with pytest.raises(gr.Error, match="strength"):
        run(app, patches=["erase-circle.safetensors"], strengths=[5.0])
    with pytest.raises(gr.Error, match="at most"):
        run(app, patches=[f"p{i}.safetensors" for i in range(app_module.MAX_ACTIVE_PATCHES + 1)])
    with pytest.raises(gr.Error, match="twice"):
        run(app, patches=["other.safetensors", "other.safetensors"])


def _split(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())


def test_upload_that_fails_to_load_is_not_kept(app, tmp_path, monkeypatch):
    """An error of any type while loading the upload (not only PatchError) removes the copied file again."""
    import erase_diffusion.pipelines.loading as loading

    before = sorted(p.name for p in app.patch_dir.iterdir())

    def boom(*a, **k):
        raise RuntimeError("simulated failure inside diffusers")

    monkeypatch.setattr(loading, "load_patches", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        app.upload(str(write_patch(app.pipe, tmp_path / "fresh.safetensors", seed=9)), [])
    assert sorted(p.name for p in app.patch_dir.iterdir()) == before


def test_bad_uploads_are_refused(app, tmp_path):
    before = sorted(p.name for p in app.patch_dir.iterdir())
    pickled = tmp_path / "evil.safetensors"
    torch.save({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, pickled)  # a pickle (zip) under a patch name
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    plain_lora = tmp_path / "plain.safetensors"  # valid safetensors, but not an erase patch
    from safetensors.torch import save_file

    save_file({"text_encoder.a.lora_A.weight": torch.zeros(2, 2)}, plain_lora)
    wrong_suffix = tmp_path / "patch.bin"
    wrong_suffix.write_bytes(b"\x80\x04K\x01.")
    alpha_zero = tmp_path / "alpha0.safetensors"  # a one-field header edit that would switch the erasure off
    tensors, meta = _split(write_patch(app.pipe, tmp_path / "ok.safetensors", seed=5))
    adapter = json.loads(meta["lora_adapter_metadata"])
    adapter["text_encoder.lora_alpha"] = 0
    save_file(tensors, alpha_zero, metadata={**meta, "lora_adapter_metadata": json.dumps(adapter)})
    for f in (pickled, garbage, plain_lora, wrong_suffix, alpha_zero, None):
        with pytest.raises(gr.Error):
            app.upload(None if f is None else str(f), [])
    # a valid patch for another architecture is refused too, after validation, and not left in the folder
    wide = sd_pipeline(hidden=48, layers=3)
    with pytest.raises(gr.Error, match="cannot be used"):
        app.upload(str(write_patch(wide, tmp_path / "sd2.safetensors")), [])
    assert sorted(p.name for p in app.patch_dir.iterdir()) == before


def test_valid_upload_joins_the_picker(app, tmp_path):
    src = write_patch(app.pipe, tmp_path / "my new patch.safetensors", seed=4)
    picker, message = app.upload(str(src), ["other.safetensors"])
    assert ("my_new_patch.safetensors", "my_new_patch.safetensors") in picker.choices  # gradio 6: (label, value)
    assert picker.value == ["other.safetensors", "my_new_patch.safetensors"]
    assert (app.patch_dir / "my_new_patch.safetensors").read_bytes() == src.read_bytes()
    picker2, _ = app.upload(str(src), [])  # the same file again is reused, not duplicated
    assert picker2.value == ["my_new_patch.safetensors"]
    assert not (app.patch_dir / "my_new_patch-2.safetensors").exists()
    (original, erased), _, _ = run(app, patches=["my_new_patch.safetensors"], strengths=[1.0])
    assert not np.array_equal(pixels(original), pixels(erased))


def test_erase_now_adds_a_patch(app, monkeypatch):
    # the wiring, with a stand-in that records its arguments and writes a valid patch
    from erase_diffusion import nullspace

    seen = {}

    def fake_erase(model, spec, *, strength=1.0, output, pipe=None, **kw):
        lora_disabled = [m.disable_adapters for m in pipe.text_encoder.modules() if hasattr(m, "lora_A")]
        seen.update(model=model, concepts=spec.erase, protect=spec.keep, strength=strength, pipe=pipe,
                    lora_disabled=lora_disabled)
        return write_patch(pipe, output, seed=7)

    monkeypatch.setattr(nullspace, "erase", fake_erase)
    run(app, patches=["erase-circle.safetensors"], strengths=[1.0])  # leaves adapters loaded
    picker, message = app.erase_now("circle, star", "square", 0.5, ["other.safetensors"])
    name = picker.value[-1]
    assert name == "erase-circle-star.safetensors" and (app.patch_dir / name).is_file() and name in message
    assert picker.value == ["other.safetensors", name]
    assert seen["concepts"] == ["circle", "star"] and seen["protect"] == ["square"] and seen["strength"] == 0.5
    assert seen["model"] == "tiny" and seen["pipe"] is app.pipe
    assert seen["lora_disabled"] and all(seen["lora_disabled"])  # erased from the base encoder, not a patched one
    assert name in app.adapters  # loaded into the pipeline right away
    picker, _ = app.erase_now("circle, star", "", 1.0, [])
    assert picker.value == ["erase-circle-star-2.safetensors"]  # never overwrites
    (original, erased), _, _ = run(app, patches=[name], strengths=[1.0])
    assert not np.array_equal(pixels(original), pixels(erased))
    for concepts, protect, strength in [("", "", 1.0), ("   ,  ", "", 1.0), ("circle", "", 1.5),
                                        (",".join(["x"] * 20), "", 1.0)]:
        with pytest.raises(gr.Error):
            app.erase_now(concepts, protect, strength, [])


def test_erase_now_runs_the_real_closed_form_erasure(app):
    picker, message = app.erase_now("circle", "", 1.0, [])
    name = picker.value[-1]
    info = app.describe(name)
    assert info["erased"] == ["circle"] and info["method"] == "nullspace" and info["base_model"] == "tiny"
    (original, erased), _, _ = run(app, prompt="a photo of a circle", patches=[name], strengths=[1.0])
    assert not np.array_equal(pixels(original), pixels(erased))
    with pytest.raises(gr.Error, match="erasure failed"):
        app.erase_now("circle", "circle", 1.0, [])  # nullspace.erase's own ValueError, passed on as a message


@pytest.mark.slow
def test_erase_now_on_the_miniature_world(tmp_path):
    from erase_diffusion.models import MINIWORLD_DIR, load_pipeline

    if not (MINIWORLD_DIR / "pipeline" / "model_index.json").is_file():
        pytest.skip("the miniature world is not built yet (erase-diffusion build-miniworld)")
    mini = EraseApp(load_pipeline("miniworld"), patch_dir=tmp_path, model="miniworld")
    picker, _ = mini.erase_now("circle", "square", 1.0, [])
    name = picker.value[-1]
    assert mini.describe(name)["erased"] == ["circle"]
    (original, erased), _, _ = mini.generate("a red circle", "", 0, 10, 7.5, None, 1, [name], 1.0)
    assert not np.array_equal(pixels(original), pixels(erased))


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gradio_client import Client

    from erase_diffusion import nullspace

    folder = tmp_path_factory.mktemp("served-patches")
    pipe = sd_pipeline()
    nullspace.erase("tiny", ["circle"], output=folder / "erase-circle.safetensors", pipe=pipe)  # the real erasure
    demo = build_demo(lambda: pipe, patch_dir=folder, model="tiny", max_queue=64)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield Client(url, verbose=False), folder
    finally:
        demo.close()


def api_args(prompt=PROMPT, patches=("erase-circle.safetensors",), strength=1.0, seed=3):
    return (prompt, "", seed, 2, 7.5, 64, 1, list(patches), strength, *NO_SLIDERS[1:])


def test_served_generate_differs_and_matches_at_strength_zero(served):
    client, _ = served
    pair, gallery, meta = client.predict(*api_args(strength=1.0), api_name="/generate")  # the prompt names "circle"
    assert len(pair) == 2 and len(gallery) == 2
    assert not np.array_equal(pixels(pair[0]), pixels(pair[1]))
    assert meta["patches"][0]["erased"] == ["circle"]
    pair0, _, _ = client.predict(*api_args(strength=0.0), api_name="/generate")
    assert np.array_equal(pixels(pair0[0]), pixels(pair0[1]))
    assert np.array_equal(pixels(pair0[0]), pixels(pair[0]))


def test_served_errors_reach_the_client(served, tmp_path):
    from gradio_client import handle_file

    client, folder = served
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict(*api_args(prompt="  "), api_name="/generate")
    with pytest.raises(Exception, match="not in the list of choices|outside|invalid"):
        client.predict(*api_args(patches=["../../etc/passwd"]), api_name="/generate")
    evil = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, evil)
    with pytest.raises(Exception, match="not a valid erase patch"):
        client.predict(handle_file(str(evil)), [], api_name="/upload_patch")
    assert not (folder / "evil.safetensors").exists()


def test_twenty_concurrent_requests_all_answered(served):
    client, _ = served

    def one(i):
        job = client.submit(*api_args(seed=i, strength=[0.0, 1.0][i % 2]), api_name="/generate")
        return job.result(timeout=300)

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert len(results) == 20
    for i, (pair, gallery, meta) in enumerate(results):
        assert len(pair) == 2 and meta["settings"]["seed"] == i
        same = np.array_equal(pixels(pair[0]), pixels(pair[1]))
        assert same == (i % 2 == 0)
