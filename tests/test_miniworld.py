"""The miniature world: determinism, the tokenizer, loading through plain diffusers/transformers, the resolver."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import CLIPTokenizer

from erase_diffusion.miniworld import domain
from erase_diffusion.miniworld.tokenizer import domain_words, write_tokenizer
from erase_diffusion.models import MINIWORLD_DIR, ModelNotFoundError, resolve


def test_dataset_is_deterministic_and_covers_every_triple():
    a, b = domain.make_dataset(200, seed=3), domain.make_dataset(200, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, domain.make_dataset(200, seed=4).images)
    big = domain.make_dataset(len(domain.SHAPES) * len(domain.COLOURS) * len(domain.STYLES), seed=0)
    assert len(set(zip(big.shape.tolist(), big.colour.tolist(), big.style.tolist()))) == 192


def test_captions_name_the_shape_or_a_paraphrase():
    data = domain.make_dataset(400, seed=1)
    for cap, s in zip(data.captions, data.shape.tolist()):
        name = domain.SHAPES[s]
        assert any(w in cap for w in (name, *domain.SYNONYMS[name])), cap
    assert any(w in " ".join(data.captions) for w in domain.SYNONYMS["circle"])


def test_tokenizer_round_trip(tmp_path):
    write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 77
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|endoftext|>"
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2  # special tokens last
    for word in domain_words():
        assert len(tok(word).input_ids) == 3, word  # every domain word is one token
    ids = tok("A striped Ünïcode teapot!").input_ids  # any text tokenizes, byte-level fallback
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).startswith("a striped ünïcode teapot")
    assert len(tok("a red circle", padding="max_length").input_ids) == 77


def test_resolver():
    assert resolve("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    with pytest.raises(ModelNotFoundError, match="not an existing local path"):
        resolve("./no/such/folder")
    with pytest.raises(ModelNotFoundError, match="not a bundled name"):
        resolve("nonsense")


def test_unknown_model_on_the_command_line_exits_2():
    out = subprocess.run([sys.executable, "-m", "erase_diffusion.cli", "sample", "--pretrained_model_name_or_path",
                          "./missing"], capture_output=True, text=True)
    assert out.returncode == 2 and "not found" in out.stderr


PLAIN_LOAD = """
import json, torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPTokenizer
pipe = StableDiffusionPipeline.from_pretrained({pipe!r})
clip = CLIPModel.from_pretrained({clip!r})
tok = CLIPTokenizer.from_pretrained({clip!r})
ids = tok(["a red circle"], padding="max_length", return_tensors="pt").input_ids
same = torch.allclose(pipe.text_encoder(ids)[0], clip.text_model(ids).last_hidden_state, atol=1e-6)
print(json.dumps({{"same_text_tower": same, "vocab": len(tok), "eos": tok.eos_token_id,
                  "cross_attention_dim": pipe.unet.config.cross_attention_dim}}))
"""


def test_bundled_weights_load_with_plain_diffusers_and_transformers():
    pipe, clip = MINIWORLD_DIR / "pipeline", MINIWORLD_DIR / "clip"
    code = PLAIN_LOAD.format(pipe=str(pipe), clip=str(clip))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["same_text_tower"], "the pipeline's text encoder must be the CLIP's text tower"
    assert info["eos"] == info["vocab"] - 1


@pytest.mark.slow
def test_generations_show_the_prompted_shape():
    from erase_diffusion.measure import PromptCase, generate, judge_generations
    from erase_diffusion.models import load_judge, load_pipeline

    cases = [PromptCase(f"a solid {c} {s}", s, c, "solid", s) for s, c in
             [("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("star", "white"), ("cross", "green"),
              ("heart", "purple")]]
    images = generate(load_pipeline(), [c.prompt for c in cases], seed=0, steps=20)
    verdict = judge_generations(load_judge(), images, cases)
    assert verdict["shape"] >= 5 / 6 and verdict["colour"] >= 5 / 6, verdict
