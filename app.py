"""Gradio demo: original vs erased images from the same seed and latents, with erase patches picked at run time.

    python app.py                                                  # the bundled miniature world on 127.0.0.1:7860
    python app.py --pretrained_model_name_or_path ./my-sd15 --patch_dir outputs/patches --port 7861

One pipeline is loaded once. Every ``.safetensors`` patch in ``--patch_dir`` is listed; a selected patch is loaded once
as a diffusers adapter (cached by file name) and switched per request with ``set_adapters`` (per-patch strengths) and
``disable_lora()`` / ``enable_lora()`` for the original. Uploads are validated with ``erase_diffusion.patch_reader.load_patch``
(never unpickled) before they are copied into the folder; "Erase now" runs the closed-form ``nullspace.erase`` on the
loaded pipeline and the new patch joins the picker.

``build_demo(pipe_factory, ...)`` builds the UI around any pipeline factory (tests inject a tiny random pipeline);
``EraseApp`` holds the state and the handlers, and ``generate_pair`` is the pure generation function. All of them are
usable without a server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import threading
from pathlib import Path

import erase_diffusion  # noqa: F401  first: its thread guard sets OMP_WAIT_POLICY before torch loads
import gradio as gr
import torch

from erase_diffusion import nullspace
from erase_diffusion.atomic import write_atomic
from erase_diffusion.concepts import ConceptSpec
from erase_diffusion.models import load_pipeline
from erase_diffusion.patch_format import PatchError
from erase_diffusion.patch_reader import describe_patch, load_patch
from erase_diffusion.pipelines import loading
from erase_diffusion.threads import configure_threads

DEFAULT_PATCH_DIR = "outputs/patches"
PATCH_SUFFIX = ".safetensors"
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_BATCH = 4
MAX_SIZE = 1024
MAX_SEED = 2**32 - 1
MAX_ACTIVE_PATCHES = 4  # strength sliders shown; more selected patches are refused
MAX_STRENGTH = 2.0
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_CONCEPTS = 8
MAX_QUEUE = 64
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# ----------------------------------------------------------------------------------------------- pure generation
def native_size(pipe) -> int:
    """The pipeline's default image side (UNet sample size × VAE scale factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def size_step(pipe) -> int:
    """Image sides must be multiples of this: 8 (diffusers' check) and the VAE × UNet downsampling."""
    unet_down = 2 ** max(0, len(pipe.unet.config.block_out_channels) - 1)
    return math.lcm(8, int(pipe.vae_scale_factor) * unet_down)


def size_bounds(pipe) -> tuple[int, int]:
    step, native = size_step(pipe), native_size(pipe)
    low = max(step, (native // 2) // step * step)
    high = max(native, min(2 * native, MAX_SIZE) // step * step)
    return low, high


def initial_latents(pipe, seed: int, batch: int, size: int) -> torch.Tensor:
    """Image i starts from ``randn`` seeded with ``seed + i`` (what ``pipe(generator=Generator().manual_seed(seed))``
    draws for a single image), so both panes see identical latents whatever the batch."""
    shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    lat = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)]
    return torch.cat(lat).to(pipe.unet.dtype)


def _has_adapters(pipe) -> bool:
    try:
        return any(pipe.get_list_adapters().values())
    except (ValueError, AttributeError):
        return False


@torch.no_grad()
def generate_pair(pipe, prompt: str, *, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                  guidance: float = 7.5, size: int | None = None, batch: int = 1,
                  adapters: list[tuple[str, float]] = ()) -> tuple[list, list]:
    """(originals, erased) PIL images from the same seeds and latents.

    ``adapters``: (adapter name, strength) pairs already loaded into ``pipe``. The original is made with every LoRA
    disabled; the erased one with exactly these adapters at these strengths. Without adapters the erased images are the
    originals. The caller serialises access to ``pipe`` (adapter state is global to the pipeline).
    """
    size = size or native_size(pipe)
    latents = initial_latents(pipe, seed, batch, size)
    kwargs = dict(prompt=[prompt] * batch, negative_prompt=[negative_prompt] * batch if negative_prompt else None,
                  num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="pil")
    if _has_adapters(pipe):
        pipe.disable_lora()
    originals = pipe(latents=latents.clone(), **kwargs).images
    if not adapters:
        return originals, list(originals)
    names, weights = [a for a, _ in adapters], [float(w) for _, w in adapters]
    pipe.set_adapters(names, adapter_weights=weights)
    pipe.enable_lora()  # set_adapters does not undo disable_lora()
    try:
        erased = pipe(latents=latents.clone(), **kwargs).images
    finally:
        pipe.disable_lora()
    return originals, erased


# ------------------------------------------------------------------------------------------------ checks
def _int_in(value, low: int, high: int, what: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise gr.Error(f"{what} must be a whole number, got {value!r}")
    if not low <= int(f) <= high:
        raise gr.Error(f"{what} must lie between {low} and {high}, got {int(f)}")
    return int(f)


def _float_in(value, low: float, high: float, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(f) or not low <= f <= high:
        raise gr.Error(f"{what} must lie between {low} and {high}, got {value!r}")
    return f


def _text(value, what: str, *, required: bool) -> str:
    text = "" if value is None else str(value)
    text = text.strip()
    if required and not text:
        raise gr.Error(f"{what} is empty: type something")
    if len(text) > MAX_PROMPT_CHARS:
        raise gr.Error(f"{what} is too long ({len(text)} characters; at most {MAX_PROMPT_CHARS})")
    if "\x00" in text:
        raise gr.Error(f"{what} contains a NUL character")
    return text


def _split_concepts(text, what: str) -> list[str]:
    items = [c.strip() for c in re.split(r"[,\n]", _text(text, what, required=False)) if c.strip()]
    if len(items) > MAX_CONCEPTS:
        raise gr.Error(f"at most {MAX_CONCEPTS} {what} at a time, got {len(items)}")
    return items


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------------------------- the app
class EraseApp:
    """State (pipeline, patch folder, adapter cache) and the handlers behind the UI; no server needed."""

    def __init__(self, pipe, patch_dir=DEFAULT_PATCH_DIR, model: str = "miniworld"):
        self.pipe = pipe
        self.model = str(model)
        self.patch_dir = Path(patch_dir)
        self.patch_dir.mkdir(parents=True, exist_ok=True)
        self.root = self.patch_dir.resolve()
        self.adapters: dict[str, tuple[str, tuple[int, int]]] = {}  # file name -> (adapter name, (size, mtime_ns))
        self.descriptions: dict[str, tuple[dict, tuple[int, int]]] = {}
        self.picker = None  # the UI's CheckboxGroup, once built
        self.lock = threading.RLock()  # adapter state is global to the pipeline: one user of it at a time
        self.size_low, self.size_high = size_bounds(pipe)
        self.size_step = size_step(pipe)
        self.native_size = native_size(pipe)

    # ---- the patch folder
    def list_patches(self) -> list[str]:
        names = []
        for p in sorted(self.patch_dir.iterdir()):
            if p.name.endswith(PATCH_SUFFIX) and not p.name.startswith("."):
                try:
                    self.resolve_patch(p.name)
                except gr.Error:
                    continue  # symlinks out of the folder, directories, odd names
                names.append(p.name)
        if self.picker is not None:  # API clients are checked against the component's own choices
            self.picker.choices = [(n, n) for n in names]
        return names

    def resolve_patch(self, name) -> Path:
        """The file ``name`` names inside the patch folder; anything else (paths, '..', links out) is refused."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise gr.Error(f"invalid patch name {name!r}")
        if "\x00" in name or "/" in name or "\\" in name or name in (".", "..") or Path(name).is_absolute():
            raise gr.Error(f"invalid patch name {name!r}: give a file name from the patch folder, not a path")
        if not name.endswith(PATCH_SUFFIX):
            raise gr.Error(f"invalid patch name {name!r}: patches are {PATCH_SUFFIX} files")
        path = (self.patch_dir / name).resolve()
        if not path.is_relative_to(self.root) or path.parent != self.root:
            raise gr.Error(f"patch {name!r} points outside the patch folder")
        if not path.is_file():
            raise gr.Error(f"patch {name!r} not found in {self.patch_dir}")
        return path

    # ---- adapters
    def adapter_for(self, name: str) -> str:
        """The adapter name of patch file ``name``, loading it (validated) the first time or when the file changed."""
        path = self.resolve_patch(name)
        st = path.stat()
        signature = (st.st_size, st.st_mtime_ns)
        with self.lock:
            cached = self.adapters.get(name)
            if cached is not None and cached[1] == signature:
                return cached[0]
            if cached is not None:  # the file was replaced: drop the stale adapter
                self.pipe.delete_adapters(cached[0])
                del self.adapters[name]
            stem = _SAFE_NAME.sub("_", Path(name).stem).replace(".", "_")[:40]
            adapter = f"patch_{stem}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
            try:
                loading.load_patches(self.pipe, [path], strengths=1.0, adapter_names=[adapter])
            except (ValueError, OSError) as err:  # PatchError is a ValueError
                raise gr.Error(f"patch {name!r} cannot be used with this model: {err}") from None
            finally:
                if _has_adapters(self.pipe):
                    self.pipe.disable_lora()
            self.adapters[name] = (adapter, signature)
            return adapter

    def describe(self, name: str) -> dict:
        """The patch's metadata (``describe_patch``), cached per file version."""
        path = self.resolve_patch(name)
        st = path.stat()
        signature = (st.st_size, st.st_mtime_ns)
        cached = self.descriptions.get(name)
        if cached is not None and cached[1] == signature:
            return dict(cached[0])
        try:
            info = describe_patch(path)
        except ValueError as err:
            return {"name": name, "error": str(err)}
        info.pop("path", None)  # a server-side path: not the client's business
        info = {"name": name, **_json_safe(info)}
        self.descriptions[name] = (info, signature)
        return dict(info)

    # ---- handlers
    def check_request(self, prompt, negative_prompt, seed, steps, guidance, size, batch, patches, strengths):
        prompt = _text(prompt, "prompt", required=True)
        negative_prompt = _text(negative_prompt, "negative prompt", required=False)
        seed = _int_in(seed, 0, MAX_SEED, "seed")
        steps = _int_in(steps, 1, MAX_STEPS, "steps")
        guidance = _float_in(guidance, 0.0, MAX_GUIDANCE, "guidance")
        size = _int_in(self.native_size if size is None else size, self.size_low, self.size_high, "image size")
        if size % self.size_step:
            raise gr.Error(f"image size must be a multiple of {self.size_step}, got {size}")
        batch = _int_in(batch, 1, MAX_BATCH, "batch size")
        patches = [] if patches is None else patches
        if isinstance(patches, str) or not isinstance(patches, (list, tuple)):
            raise gr.Error("patches must be a list of patch file names")
        if len(set(patches)) != len(patches):
            raise gr.Error("a patch is selected twice")
        if len(patches) > MAX_ACTIVE_PATCHES:
            raise gr.Error(f"select at most {MAX_ACTIVE_PATCHES} patches at a time (got {len(patches)})")
        strengths = list(strengths)
        if len(strengths) < len(patches):
            strengths += [1.0] * (len(patches) - len(strengths))
        strengths = [_float_in(1.0 if s is None else s, 0.0, MAX_STRENGTH, f"strength of {p!r}")
                     for p, s in zip(patches, strengths)]
        for p in patches:
            self.resolve_patch(p)
        return dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance,
                    size=size, batch=batch), list(zip(patches, strengths))

    def generate(self, prompt, negative_prompt="", seed=0, steps=20, guidance=7.5, size=None, batch=1, patches=(),
                 *strengths):
        """Handler: ((original, erased) of the first image, gallery of all pairs, metadata). Raises gr.Error."""
        settings, selected = self.check_request(prompt, negative_prompt, seed, steps, guidance, size, batch,
                                                patches, strengths)
        with self.lock:
            adapters = [(self.adapter_for(name), s) for name, s in selected]
            originals, erased = generate_pair(self.pipe, adapters=adapters, **settings)
        gallery = []
        for i, (a, b) in enumerate(zip(originals, erased)):
            gallery += [(a, f"original · seed {settings['seed'] + i}"), (b, f"erased · seed {settings['seed'] + i}")]
        meta = {"settings": {k: v for k, v in settings.items()},
                "patches": [{**self.describe(name), "strength": s} for name, s in selected]}
        return (originals[0], erased[0]), gallery, meta

    def upload(self, file, selected=None):
        """Handler: validate an uploaded file, copy it into the patch folder; returns (picker update, message)."""
        if file is None:
            raise gr.Error("no file uploaded")
        src = Path(file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", file))
        if not src.name.lower().endswith(PATCH_SUFFIX):
            raise gr.Error(f"{src.name!r} is not a patch: upload a {PATCH_SUFFIX} file")
        if not src.is_file():
            raise gr.Error("the uploaded file is missing")
        if src.stat().st_size > MAX_UPLOAD_BYTES:
            raise gr.Error(f"{src.name!r} is too large for a patch (over {MAX_UPLOAD_BYTES // 2**20} MiB)")
        try:
            load_patch(src)  # parses the header by hand and reads tensors with safetensors: nothing is unpickled
        except PatchError as err:
            raise gr.Error(f"{src.name!r} is not a valid erase patch: {err}") from None
        stem = _SAFE_NAME.sub("_", src.name[: -len(PATCH_SUFFIX)]).strip("._-")[:80] or "patch"
        data = src.read_bytes()
        name, k = f"{stem}{PATCH_SUFFIX}", 2
        with self.lock:
            while (self.patch_dir / name).exists():
                existing = self.patch_dir / name
                if existing.is_file() and not existing.is_symlink() and existing.read_bytes() == data:
                    break  # the same patch again: reuse it
                name, k = f"{stem}-{k}{PATCH_SUFFIX}", k + 1
            dest = self.patch_dir / name
            if not dest.exists():
                write_atomic(dest, data)
                try:
                    self.adapter_for(name)  # it must also fit this model (shapes, fingerprint)
                except BaseException:  # whatever failed, a file that cannot be used must not stay listed
                    dest.unlink(missing_ok=True)
                    raise
        return self._picker(selected, add=name), f"added patch `{name}`"

    def erase_now(self, concepts, protect="", strength=1.0, selected=None):
        """Handler: closed-form erasure on the loaded pipeline; the new patch is written into the folder and selected."""
        concepts = _split_concepts(concepts, "concepts")
        protect = _split_concepts(protect, "protected concepts")
        if not concepts:
            raise gr.Error("type at least one concept to erase")
        strength = _float_in(strength, 0.0, 1.0, "erase strength")
        slug = _SAFE_NAME.sub("_", "-".join(concepts)).strip("._-")[:60] or "concept"
        name, k = f"erase-{slug}{PATCH_SUFFIX}", 2
        with self.lock:
            while (self.patch_dir / name).exists():
                name, k = f"erase-{slug}-{k}{PATCH_SUFFIX}", k + 1
            if _has_adapters(self.pipe):
                self.pipe.disable_lora()  # erase from the base text encoder, not a patched one
            try:
                nullspace.erase(self.model, ConceptSpec(concepts, keep=protect), strength=strength,
                                output=self.patch_dir / name, pipe=self.pipe)
            except ValueError as err:
                raise gr.Error(f"erasure failed: {err}") from None
            self.adapter_for(name)
        message = f"erased {', '.join(concepts)}" + (f" (protecting {', '.join(protect)})" if protect else "")
        return self._picker(selected, add=name), f"{message}: new patch `{name}`"

    def refresh(self, selected=None):
        return self._picker(selected)

    def _picker(self, selected=None, add: str | None = None):
        choices = self.list_patches()
        value = [s for s in (selected or []) if s in choices]
        if add is not None and add not in value:
            value = (value + [add])[-MAX_ACTIVE_PATCHES:]
        return gr.CheckboxGroup(choices=choices, value=value)


def strength_sliders_for(selected) -> list:
    selected = list(selected or [])
    return [gr.Slider(visible=i < len(selected), label=f"strength: {selected[i]}" if i < len(selected) else "strength")
            for i in range(MAX_ACTIVE_PATCHES)]


# ------------------------------------------------------------------------------------------------------------ UI
def build_demo(pipe_factory, *, patch_dir=DEFAULT_PATCH_DIR, model: str = "miniworld", max_queue: int = MAX_QUEUE,
               title: str = "erase-diffusion") -> gr.Blocks:
    """The Gradio app around ``pipe_factory()`` (called once), queued with one generation at a time."""
    app = EraseApp(pipe_factory(), patch_dir=patch_dir, model=model)
    with gr.Blocks(title=title) as demo:
        demo.erase_app = app  # for tests and callers
        gr.Markdown(f"# {title}\nOriginal vs erased, from the same seed and latents. Model: `{model}`; "
                    f"patches from `{patch_dir}`.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", max_length=MAX_PROMPT_CHARS, elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED)
                    batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Images")
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                guidance = gr.Slider(0.0, MAX_GUIDANCE, value=7.5, step=0.5, label="Guidance")
                size = gr.Slider(app.size_low, app.size_high, value=app.native_size, step=app.size_step,
                                 label="Image size")
                patches = gr.CheckboxGroup(choices=app.list_patches(), value=[], elem_id="patches",
                                           label=f"Patches (at most {MAX_ACTIVE_PATCHES})")
                app.picker = patches
                sliders = [gr.Slider(0.0, MAX_STRENGTH, value=1.0, step=0.05, label="strength", visible=False)
                           for _ in range(MAX_ACTIVE_PATCHES)]
                with gr.Row():
                    upload = gr.File(label=f"Add a patch ({PATCH_SUFFIX})", file_types=[PATCH_SUFFIX],
                                     type="filepath", file_count="single")
                    refresh = gr.Button("Rescan folder", size="sm")
                upload_status = gr.Markdown()
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                pair = gr.ImageSlider(label="original | erased", type="pil", format="png", slider_position=50, max_height=500,
                                      buttons=["download", "fullscreen"], elem_id="pair")
                gallery = gr.Gallery(label="all images", columns=2, height="auto", format="png")
                meta = gr.JSON(label="selected patches")
        with gr.Accordion("Erase now", open=False):
            with gr.Row():
                concepts = gr.Textbox(label="Concepts to erase (comma separated)", max_length=MAX_PROMPT_CHARS)
                protect = gr.Textbox(label="Concepts to protect (comma separated)", max_length=MAX_PROMPT_CHARS)
                erase_strength = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Erase strength")
            erase_btn = gr.Button("Erase now")
            erase_status = gr.Markdown()

        inputs = [prompt, negative, seed, steps, guidance, size, batch, patches, *sliders]
        run.click(app.generate, inputs, [pair, gallery, meta], api_name="generate")
        prompt.submit(app.generate, inputs, [pair, gallery, meta], api_name=False)
        patches.change(strength_sliders_for, patches, sliders, api_name=False, queue=False)
        upload.upload(app.upload, [upload, patches], [patches, upload_status], api_name="upload_patch",
                      concurrency_id="pipeline")
        refresh.click(app.refresh, patches, patches, api_name="list_patches")
        erase_btn.click(app.erase_now, [concepts, protect, erase_strength, patches], [patches, erase_status],
                        api_name="erase", concurrency_id="pipeline")
        demo.load(app.refresh, patches, patches, api_name=False, queue=False)
    return demo.queue(default_concurrency_limit=1, max_size=max_queue)


def _pipeline_factory(name_or_path: str):
    def factory():
        pipe = load_pipeline(name_or_path)
        return pipe.to("cuda") if torch.cuda.is_available() else pipe

    return factory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld",
                        help="bundled name, local folder or Hub id (default: the bundled miniature world)")
    parser.add_argument("--patch_dir", default=DEFAULT_PATCH_DIR, help="folder whose .safetensors patches are listed")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: local only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860+)")
    parser.add_argument("--max_queue", type=int, default=MAX_QUEUE, help="requests waiting before new ones are refused")
    args = parser.parse_args(argv)
    configure_threads()  # CPU threads that do not oversubscribe; OMP_NUM_THREADS wins
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not 1 <= args.max_queue <= 10_000:
        parser.error("--max_queue must lie between 1 and 10000")
    try:
        demo = build_demo(_pipeline_factory(args.pretrained_model_name_or_path), patch_dir=args.patch_dir,
                          model=args.pretrained_model_name_or_path, max_queue=args.max_queue)
    except (ValueError, OSError) as err:  # a missing model or an unusable patch folder: one clear line
        print(f"app.py: error: {err}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_BYTES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
