"""CLIPErase: the loss modules as separate pieces, the training script through `accelerate launch`, resume, the
refusals that must come before any model loads, SDXL's two encoders, DDP across two processes, the data sources, and
that the exported patch is exactly what was trained."""

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from erase_diffusion import cliperase
from erase_diffusion.cliperase import TextTower, encode_read
from erase_diffusion.patch import fingerprint
from erase_diffusion.patch_reader import load_patch
from erase_diffusion.training import main, make_trainable, patch_layers
from erase_diffusion.validation import merged

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "tests"))
import tiny_models  # noqa: E402

FAST = ["--max_train_steps", "3", "--train_batch_size", "8", "--validation_steps", "0", "--eval_generations", "0",
        "--report_to", "none"]


def test_forgetting_dot_is_mean_cosine_and_bounded():
    img = torch.randn(5, 16)
    assert torch.isclose(cliperase.forgetting_dot(img, img), torch.tensor(1.0))
    assert torch.isclose(cliperase.forgetting_dot(img, -img), torch.tensor(-1.0))


def test_forgetting_neg_contrastive_is_minus_contrastive():
    img, txt, s = torch.randn(6, 8), torch.randn(6, 8), torch.tensor(10.0)
    assert torch.isclose(cliperase.forgetting_neg_contrastive(img, txt, s), -cliperase.contrastive(img, txt, s))


def test_retention_prefers_matched_pairs():
    img = F.normalize(torch.randn(8, 32), dim=-1)
    s = torch.tensor(20.0)
    assert cliperase.retention(img, img, s) < cliperase.retention(img, img.roll(1, 0), s)


def test_consistency_zero_iff_same_model():
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    s = torch.tensor(10.0)
    assert cliperase.consistency(img, txt, img, txt, s).abs() < 1e-6
    assert cliperase.consistency(img, txt + torch.randn(6, 8), img, txt, s) > 1e-3


def test_token_terms():
    a = torch.randn(2, 77, 16)
    assert cliperase.token_consistency(a, a) == 0
    assert cliperase.token_forgetting(a, a + 1).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--erase_concept", ""], "no concept to erase"),
        (["--erase_concept", "circle", "--keep_concepts", "circle"], "both to erase and to keep"),
        (["--erase_concept", "teapot"], "not in the miniature world's vocabulary"),
        (["--erase_concept", "circle", "--generate_data"], "and concepts to keep"),
        (["--erase_concept", "circle", "--train_vision_tower"], "use it with --target clip"),
        (["--erase_concept", "circle", "--adversarial_weight", "-1"], "adversarial_weight must be 0"),
        (["--erase_concept", "circle", "--adversarial_weight", "1", "--adversarial_steps", "0"],
         "adversarial_steps must be at least 1"),
    ],
)
def test_bad_input_refused_before_loading(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        main([*argv, "--output_dir", str(tmp_path / "out"), *FAST])


def test_output_dir_of_another_run_refused(tmp_path):
    (tmp_path / "erase_patch.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds another run"):
        main(["--erase_concept", "circle", "--output_dir", str(tmp_path), *FAST])


def test_clip_target_writes_a_patch_for_the_clip_model(tmp_path):
    metrics = main(["--erase_concept", "circle", "--target", "clip", "--output_dir", str(tmp_path), *FAST])
    patch = load_patch(tmp_path / "erase_patch.safetensors")
    assert patch.metadata["method"] == "cliperase" and patch.metadata["erased"] == ["circle"]
    assert any("self_attn.q_proj" in m for m in patch.layers["text_encoder"])
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3 == metrics["steps"]


@pytest.mark.slow
def test_accelerate_launch_and_resume(tmp_path):
    from accelerate.utils import write_basic_config

    cfg = tmp_path / "accelerate.yaml"
    write_basic_config(save_location=str(cfg))
    out = tmp_path / "run"
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), str(ROOT / "train_erase.py"),
            "--erase_concept", "circle", "--output_dir", str(out), "--train_batch_size", "8",
            "--checkpointing_steps", "2", "--validation_steps", "2", "--eval_generations", "0"]
    first = subprocess.run([*base, "--max_train_steps", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "erase_patch.safetensors").exists() and (out / "checkpoint-2").is_dir()
    assert list((out / "validation").glob("*.png")) and list((out / "logs").rglob("events.out.tfevents*"))
    # a second run into the same folder is refused unless it resumes (train_erase.py exits 2; `accelerate launch`
    # reports any failure of its child as 1)
    again = subprocess.run([*base, "--max_train_steps", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode != 0 and "already holds another run" in again.stderr
    resumed = subprocess.run([*base, "--max_train_steps", "5", "--resume_from_checkpoint", "latest"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and json.loads((out / "metrics.json").read_text())["steps"] == 5


LORA = argparse.Namespace(rank=4, lora_alpha=None, full_finetune=False, train_vision_tower=False,
                          gradient_checkpointing=False)


def _randomised_students(pipe, args):
    """Per text encoder: its CLIP with LoRA injected and random (non-zero) LoRA weights."""
    students, towers = {}, []
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is None:
            continue
        clip, _ = tiny_models.clip_for(getattr(pipe, component))
        teacher = copy.deepcopy(clip)  # the full fine-tune case below turns these students dense
        tower_fingerprint = fingerprint(clip.text_model)
        make_trainable(clip, args)
        torch.manual_seed(len(students))
        with torch.no_grad():
            for name, p in clip.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.2)
        students[component] = clip
        towers.append(TextTower(component, "tiny", None, tower_fingerprint, teacher))
    return students, towers


def _encode_like_the_pipeline(students, pipe, prompt):
    """(prompt_embeds, pooled) as the pipeline would compute them with the students' text towers (encode_read)."""
    sdxl = len(students) == 2
    states, pooled = [], None
    for name, student in students.items():
        tok = pipe.tokenizer_2 if name == "text_encoder_2" else pipe.tokenizer
        s, p = encode_read(student, tok, [prompt], "cpu", layer=-2 if sdxl else -1, pooled=name == "text_encoder_2")
        states.append(s)
        pooled = p if p is not None else pooled
    return torch.cat(states, -1), pooled


@pytest.mark.parametrize("make", [tiny_models.sd_pipeline, tiny_models.sdxl_pipeline], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_exported_patch_is_what_was_trained(tmp_path, make, full_finetune):
    """What the objective trains (encode_read of the students: last or penultimate layer, SDXL's pooled embedding)
    == what plain diffusers computes after ``load_lora_weights`` of the exported patch, and == the merged weights
    the validation grids use."""
    from erase_diffusion.patch import write_patch

    lora = LORA
    pipe = make()
    students, towers = _randomised_students(pipe, lora)
    if full_finetune:  # a dense change of every encoder weight, exported by SVD at full rank
        for student in students.values():
            for name, m in list(student.named_modules()):  # merge and drop the LoRA wrappers: a plain dense model
                if hasattr(m, "base_layer"):
                    m.merge()
                    parent, child = name.rsplit(".", 1)
                    setattr(student.get_submodule(parent), child, m.base_layer)
    args = argparse.Namespace(**{**vars(lora), "full_finetune": full_finetune, "rank": None if full_finetune else 4})
    layers = {}
    for tower in towers:
        layers.update(patch_layers(students[tower.name], tower, args)[0])
    path = write_patch(tmp_path / "p.safetensors", layers, method="cliperase", settings={}, erased=["circle"],
                       protected=[], base_model="tiny", fingerprints={t.name: t.fingerprint for t in towers})
    with torch.no_grad():
        want = _encode_like_the_pipeline(students, pipe, "a red circle")
        base = pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        with merged(pipe, layers):
            in_grid = pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
        patched = make()
        patched.load_lora_weights(str(path))
        got = patched.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    for w, g, v, b in zip(want, got[::2], in_grid[::2], base[::2]):  # (prompt_embeds, pooled)
        if w is None:
            continue
        change = (w - b).abs().max()
        assert change > 1e-3  # the towers really differ from the original ...
        # ... the patch reproduces them in diffusers, up to its float16 storage (two thousandths of the change) ...
        assert (g - w).abs().max() < 2e-3 * change
        torch.testing.assert_close(v, g, atol=5e-5, rtol=1e-4)  # ... and the validation grids read the same patch


def test_merged_restores_the_pipeline_on_error():
    pipe = tiny_models.sdxl_pipeline()
    before = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    students, towers = _randomised_students(pipe, LORA)
    layers = {c: m for t in towers for c, m in patch_layers(students[t.name], t, LORA)[0].items()}
    with pytest.raises(RuntimeError, match="boom"), merged(pipe, layers):
        assert any(not torch.equal(v, before[k]) for k, v in pipe.text_encoder_2.state_dict().items())
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder_2.state_dict().items())


@pytest.mark.slow
def test_sdxl_two_encoders_with_generated_data(tmp_path):
    """SDXL end to end: data generated by the pipeline itself, both text encoders trained (adversarially), one patch
    that plain diffusers loads into both."""
    pipe = tiny_models.sdxl_pipeline()
    clips = tiny_models.save_pipeline_with_clips(pipe, tmp_path)
    common = ["--pretrained_model_name_or_path", str(tmp_path / "pipeline"), "--erase_concept", "circle",
              "--keep_concepts", "square", "--generate_data", *FAST]
    with pytest.raises(ValueError, match="pass one --clip_model_name_or_path per encoder"):
        main([*common, "--clip_model_name_or_path", clips[0], "--output_dir", str(tmp_path / "x")])
    out = tmp_path / "run"
    metrics = main([*common, "--clip_model_name_or_path", *clips, "--output_dir", str(out),
                    "--validation_steps", "2", "--adversarial_weight", "1", "--adversarial_steps", "1"])
    # adversarial CLIPErase attacks each encoder with its own tokenizer's placeholder
    assert {"text_encoder/forget", "text_encoder_2/token_forget", "text_encoder/adversarial",
            "text_encoder_2/adversarial"} <= set(metrics["terms"])
    patch = load_patch(out / "erase_patch.safetensors")
    assert patch.components == ["text_encoder", "text_encoder_2"]
    assert set(patch.metadata["fingerprints"]) == {"text_encoder", "text_encoder_2"}
    assert (out / "validation" / "step-000003.png").exists()
    fresh = tiny_models.sdxl_pipeline()
    base = fresh.encode_prompt("a circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    fresh.load_lora_weights(str(out / "erase_patch.safetensors"))
    after = fresh.encode_prompt("a circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert not torch.equal(after[0], base[0]) and not torch.equal(after[2], base[2])


def _write_pairs(folder: Path, layout: str) -> None:
    from PIL import Image

    folder.mkdir()
    rows = []
    for i, caption in enumerate(["a photo of a circle", "a circle on grass", "a square", "a red square", "a triangle"]):
        Image.new("RGB", (40, 40), (40 * i, 100, 200 - 30 * i)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption})
        if layout == "txt":
            (folder / f"{i}.txt").write_text(caption)
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize("layout", ["jsonl", "txt"])
def test_folder_of_pairs_trains_an_sd1_pipeline(tmp_path, layout):
    pipe = tiny_models.sd_pipeline()
    clips = tiny_models.save_pipeline_with_clips(pipe, tmp_path)
    _write_pairs(tmp_path / "pairs", layout)
    out = tmp_path / "run"
    main(["--pretrained_model_name_or_path", str(tmp_path / "pipeline"), "--clip_model_name_or_path",
          *clips, "--erase_concept", "circle", "--train_data_dir", str(tmp_path / "pairs"),
          "--output_dir", str(out), *FAST])
    assert load_patch(out / "erase_patch.safetensors").components == ["text_encoder"]


def test_folder_errors(tmp_path):
    from erase_diffusion.concepts import ConceptSpec
    from erase_diffusion.data import from_folder

    spec = ConceptSpec(["circle"])
    with pytest.raises(ValueError, match="does not exist"):
        from_folder(tmp_path / "nope", spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image–caption pairs"):
        from_folder(tmp_path / "empty", spec)
    _write_pairs(tmp_path / "pairs", "jsonl")
    forget, retain = from_folder(tmp_path / "pairs", spec).split()
    assert forget.captions == ["a photo of a circle", "a circle on grass"] and len(retain.images) == 3
    with pytest.raises(ValueError, match="the forget set is empty"):
        from_folder(tmp_path / "pairs", ConceptSpec(["hexagon"])).split()
    (tmp_path / "pairs" / "3.png").unlink()
    with pytest.raises(ValueError, match="do not exist"):
        from_folder(tmp_path / "pairs", spec)


def test_vision_tower_trains_only_when_asked(tmp_path):
    main(["--erase_concept", "circle", "--target", "clip", "--train_vision_tower",
          "--output_dir", str(tmp_path / "b"), *FAST])
    patch = load_patch(tmp_path / "b" / "erase_patch.safetensors")
    assert patch.components == ["clip", "text_encoder"]
    assert all(m.startswith("vision_model.encoder.layers.") for m in patch.layers["clip"])


@pytest.mark.slow
def test_ddp_replicas_stay_in_sync(tmp_path):
    """Two processes through torchrun on CPU (gloo): Accelerate's DDP must all-reduce the gradients, which it only
    does when the loss comes out of the wrapped model's forward. train() checks the replicas agree at the end."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train_erase.py"), "--erase_concept", "circle", "--output_dir", str(out), *FAST],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3


def test_several_concepts_in_one_run(tmp_path):
    main(["--erase_concept", "circle", "square", "--target", "clip", "--output_dir", str(tmp_path), *FAST])
    assert load_patch(tmp_path / "erase_patch.safetensors").metadata["erased"] == ["circle", "square"]


def test_adversarial_training_attacks_the_student_and_resumes_its_attacks(tmp_path):
    """Adversarial CLIPErase: the attack embeddings move during training (the inner loop runs against the student),
    they are checkpointed with the LoRA, and the result is one LoRA patch in the usual format."""
    from safetensors.torch import load_file

    from erase_diffusion.models import load_clip

    adv = ["--adversarial_weight", "1", "--adversarial_steps", "2", "--checkpointing_steps", "2"]
    metrics = main(["--erase_concept", "circle", "--output_dir", str(tmp_path), *FAST, *adv])
    assert metrics["terms"]["adversarial"] > 0
    state = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
    attacks_now = state["attacks_text_encoder"]
    clip, _ = load_clip("miniworld")
    start = cliperase.initial_attacks(clip.text_model.embeddings.token_embedding.weight, 0)
    assert attacks_now.shape == start.shape and not torch.allclose(attacks_now, start)
    patch = load_patch(tmp_path / "erase_patch.safetensors")
    assert patch.metadata["method"] == "cliperase" and set(patch.layers) == {"text_encoder"}


def test_resume_with_another_rank_is_refused(tmp_path):
    """A checkpoint whose trainable tensors have other shapes (another --rank; another attack pool) is refused with
    the resume error, not torch's size mismatch."""
    main(["--erase_concept", "circle", "--output_dir", str(tmp_path), *FAST, "--checkpointing_steps", "2"])
    with pytest.raises(ValueError, match="resume with the same settings"):
        main(["--erase_concept", "circle", "--output_dir", str(tmp_path), *FAST, "--max_train_steps", "4",
              "--resume_from_checkpoint", "latest", "--rank", "2"])


def test_nan_loss_stops_the_run_without_a_patch(tmp_path):
    with pytest.raises(FloatingPointError, match="lower --learning_rate"):
        main(["--erase_concept", "circle", "--target", "clip", "--learning_rate", "1e30",
              "--output_dir", str(tmp_path), *FAST])
    assert not (tmp_path / "erase_patch.safetensors").exists()


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    for name, extra in (("plain", []), ("ckpt", ["--gradient_checkpointing"])):
        main(["--erase_concept", "circle", "--output_dir", str(tmp_path / name), *FAST, *extra])
    plain, ckpt = (load_file(tmp_path / n / "erase_patch.safetensors") for n in ("plain", "ckpt"))
    assert plain.keys() == ckpt.keys() and any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)
    for key in plain:
        torch.testing.assert_close(ckpt[key].float(), plain[key].float(), atol=1e-5, rtol=1e-3)  # a float16 step
    clip, _ = tiny_models.clip_for(tiny_models.sd_pipeline().text_encoder)
    make_trainable(clip, argparse.Namespace(**{**vars(LORA), "gradient_checkpointing": True}))
    layers = clip.text_model.encoder.layers
    assert clip.training and all(layer.gradient_checkpointing for layer in layers)


def test_clip_rounded_to_fp16_is_adopted_and_another_clip_refused(tmp_path):
    """Hub pipelines often ship their text encoder rounded to fp16 while the CLIP keeps fp32: training adopts the
    pipeline's exact weights (the patch is fingerprinted as the pipeline's encoder); a different model is refused."""
    from transformers import CLIPModel

    pipe = tiny_models.sd_pipeline()
    clip_dir = Path(tiny_models.save_pipeline_with_clips(pipe, tmp_path)[0])
    _write_pairs(tmp_path / "pairs", "jsonl")
    clip = CLIPModel.from_pretrained(clip_dir)
    common = ["--pretrained_model_name_or_path", str(tmp_path / "pipeline"), "--erase_concept", "circle",
              "--train_data_dir", str(tmp_path / "pairs"), *FAST]
    with torch.no_grad():
        for p in clip.text_model.parameters():
            p.copy_(p.half().float())
    clip.save_pretrained(clip_dir)
    metrics = main([*common, "--clip_model_name_or_path", str(clip_dir), "--output_dir", str(tmp_path / "a")])
    assert 0 < metrics["clip_text_tower_difference"]["text_encoder"] < 1e-3
    patch = load_patch(tmp_path / "a" / "erase_patch.safetensors")
    assert patch.metadata["fingerprints"]["text_encoder"] == fingerprint(pipe.text_encoder)
    with torch.no_grad():
        for p in clip.text_model.parameters():
            p.add_(torch.randn_like(p) * p.std().clamp_min(1e-3))
    clip.save_pretrained(clip_dir)
    with pytest.raises(ValueError, match="so this CLIP is another model"):
        main([*common, "--clip_model_name_or_path", str(clip_dir), "--output_dir", str(tmp_path / "b")])


def test_generic_anchor_prompts_stay_paired_with_their_forget_prompts():
    """A paraphrase that contains another erase word ("apple pie" ⊃ "apple") must still give one anchor per prompt."""
    from erase_diffusion.concepts import ConceptSpec
    from erase_diffusion.data import prompt_sets

    sets = prompt_sets(ConceptSpec(["apple"], {"apple": ["apple pie"]}, ["pear"], "fruit"), miniworld=False)
    assert len(sets["anchor"]) == len(sets["forget"])
    for f, a in zip(sets["forget"], sets["anchor"]):
        assert "fruit" in a and "apple" not in a
        assert a == " ".join(f.replace("apple pie" if "apple pie" in f else "apple", "fruit").split())


def test_forgetting_anchored_pushes_only_down_to_the_floor():
    img = torch.randn(4, 16)
    txt = img.clone().requires_grad_(True)
    floor = torch.tensor([2.0, 2.0, 0.0, 0.0])  # pairs 0-1 already below their floor: no loss, no gradient
    loss = cliperase.forgetting_anchored(img, txt, floor)
    assert torch.isclose(loss, torch.tensor(0.5))  # (0 + 0 + 1 + 1) / 4
    loss.backward()
    assert txt.grad[:2].abs().max() == 0 and txt.grad[2:].abs().max() < 1e-6  # cos = 1 is a maximum
    tilted = (img + 0.5 * torch.randn(4, 16)).requires_grad_(True)
    cliperase.forgetting_anchored(img, tilted, floor).backward()
    assert tilted.grad[:2].abs().max() == 0 and tilted.grad[2:].abs().max() > 0


def test_anchored_captions_replace_every_erased_word_and_fix_articles():
    from erase_diffusion.anchors import with_default_anchor
    from erase_diffusion.concepts import ConceptSpec
    from erase_diffusion.data import anchored

    spec = ConceptSpec(["orange", "circle"], {"circle": ["round shape"]}, anchor={"orange": "cyan", "circle": ""})
    assert anchored("an orange circle", spec) == "a cyan"
    assert anchored("a picture of an Orange round shape", spec) == "a picture of a cyan"
    assert anchored("a striped orange square", spec) == "a striped cyan square"
    assert anchored("a red square", ConceptSpec(["red"], anchor="orange")) == "an orange square"
    # the anchor a spec leaves open: the empty word off the miniature world; one that is given is kept
    assert with_default_anchor(ConceptSpec(["cat"]), None, None, miniworld=False).anchor == ""
    assert with_default_anchor(ConceptSpec(["cat"], anchor="dog"), None, None, miniworld=True).anchor == "dog"
