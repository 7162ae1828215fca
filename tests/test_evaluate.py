"""erase_diffusion.evaluate / attacks: pure pieces, bad input, the soft-prompt attack, the report (tiny pipelines)."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
from test_pipelines_loading import make_patch
from tiny_models import sd2_pipeline, sd_pipeline, sdxl_pipeline

from erase_diffusion import attacks, measure
from erase_diffusion import evaluate as ev
from erase_diffusion.concepts import ConceptSpec, miniworld_spec
from erase_diffusion.patch_format import PatchError


def test_retrieval_recall_constructed_case():
    # texts are the axes; images 0, 1 are their texts; text 2's image ranks 2nd, text 3's 4th (negative cosine)
    T = torch.eye(4)
    I = torch.stack([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0, 0.5, 1.0]),
                     torch.tensor([0, 0, 1.0, -0.1])])
    r = measure.retrieval_recall(T, I, ks=(1, 2, 10))
    assert r["t2i_R@1"] == pytest.approx(0.5) and r["t2i_R@2"] == pytest.approx(0.75) and r["t2i_R@10"] == 1.0
    assert r["i2t_R@1"] == pytest.approx(0.5) and r["i2t_R@2"] == pytest.approx(0.75)
    sub = measure.retrieval_recall(T, I, queries=[0, 1])
    assert sub["t2i_R@1"] == 1.0 and sub["i2t_R@1"] == 1.0 and sub["t2i_R@10"] == 1.0
    with pytest.raises(ValueError):
        measure.retrieval_recall(T, I[:3])
    with pytest.raises(ValueError):
        measure.retrieval_recall(T, I, queries=[])


def test_retrieval_recall_rank_k():
    T = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    I = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0]])
    r = measure.retrieval_recall(T, I, ks=(1, 2))
    # text→image: every text ranks its own image first (text 1 is closer in angle to image 1 than to image 0);
    # image→text: image 1 ranks text 0 first (cos 0.99875 vs 0.99817), images 0 and 2 their own texts
    assert r["t2i_R@1"] == 1.0
    assert r["i2t_R@1"] == pytest.approx(2 / 3)
    assert r["t2i_R@2"] == 1.0 and r["i2t_R@2"] == 1.0


def test_misspellings():
    typos = attacks.misspellings("circle", n=8, seed=0)
    assert len(typos) == 8 and len(set(typos)) == 8 and "circle" not in typos
    assert all(abs(len(t) - len("circle")) <= 1 and " " not in t for t in typos)
    assert typos == attacks.misspellings("circle", n=8, seed=0)
    assert typos != attacks.misspellings("circle", n=8, seed=1)
    with pytest.raises(ValueError):
        attacks.misspellings("  ")
    assert attacks.replace_word("a red circle, circled", "circle", "disc") == "a red disc, circled"


def test_prompt_sets_and_bad_concepts():
    sets = ev.build_prompt_sets(miniworld_spec(["circle"]), quick=True)
    assert sets["named"] and all("circle" in c.prompt for c in sets["named"])
    assert sets["paraphrase"] and all("circle" not in c.prompt for c in sets["paraphrase"])
    assert sets["retained"] and all("circle" not in c.prompt and c.shape != "circle" for c in sets["retained"])
    assert all("circle" not in p for _, p in sets["misspelled"])
    # powered sets (issue 11): quick has 64 per set; held-out phrasings are their own set, none a fitting template
    assert len(sets["named"]) == len(sets["paraphrase"]) == len(sets["heldout"]) == ev.SIZES[True]["named"] >= 64
    held = {c.prompt for c in sets["heldout"]}
    assert "circle" in held and any(p.isupper() for p in held) and any(p.startswith("the circle is") for p in held)
    assert not held & {c.prompt for c in sets["named"]}
    with pytest.raises(ValueError, match="judge cannot label"):
        ev.build_prompt_sets(ConceptSpec(["van gogh"]), quick=True)
    with pytest.raises(ValueError, match="empty"):
        ev.build_prompt_sets(miniworld_spec(["circle"]), quick=True, prompts=[" ", ""])


def test_bad_input_before_generation(tmp_path, monkeypatch):
    base, erased = sd_pipeline(), sd_pipeline()
    calls = []
    monkeypatch.setattr(ev, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError):
        ev.evaluate_pipelines(base, erased, ConceptSpec(["dog"]), quick=True)
    with pytest.raises(ValueError):
        ev.evaluate_pipelines(base, erased, miniworld_spec(["circle"]), quick=True, prompts=[])
    with pytest.raises(ValueError):
        ev.evaluate(str(tmp_path), None, ConceptSpec(["dog"]), quick=True)
    # a patch made for another text encoder: refused by check_patch before anything is generated
    other = sd2_pipeline()
    patch = tmp_path / "sd2.safetensors"
    make_patch(other, patch)
    sd_dir = tmp_path / "sd"
    base.save_pretrained(sd_dir)
    with pytest.raises(PatchError):
        ev.evaluate(str(sd_dir), patch, miniworld_spec(["circle"]), quick=True)
    assert not calls


def test_soft_prompt_attack_reduces_its_objective():
    base, erased = sd_pipeline(), sd_pipeline()
    with torch.no_grad():
        erased.text_encoder.encoder.layers[-1].mlp.fc2.weight.mul_(0.3)
    prompts = ["a red circle", "a solid blue circle", "a picture of a striped green circle"]
    res = attacks.soft_prompt_attack(base, erased, prompts, "circle", steps=30, lr=5e-2, progress=False)
    assert res.objective == "encoder"
    assert res.loss_after < 0.9 * res.loss_before
    # the learned token reaches the encoder through the hook, and only inside the block
    ids = attacks.tokenize(erased.tokenizer, ["a red ~"])
    with torch.no_grad():
        plain = erased.text_encoder(ids)[0]
        with attacks.learned_token(erased.text_encoder, res.token_id, res.vector):
            hooked = erased.text_encoder(ids)[0]
        again = erased.text_encoder(ids)[0]
    assert not torch.allclose(plain, hooked) and torch.equal(plain, again)
    # identical encoders (a UNet-side erasure) → the noise-prediction objective
    res_u = attacks.soft_prompt_attack(base, sd_pipeline(), prompts, "circle", steps=2, progress=False)
    assert res_u.objective == "unet"


def test_soft_prompt_attack_with_several_tokens_placements_and_restarts():
    base, erased = sd_pipeline(), sd_pipeline()
    with torch.no_grad():
        erased.text_encoder.encoder.layers[-1].mlp.fc2.weight.mul_(0.3)
    prompts = ["a red circle", "a solid blue circle"]
    assert attacks.attacked_prompt("a red circle", "circle", 2) == "a red ~ ~"
    assert attacks.attacked_prompt("a red circle", "circle", 1, "prefix") == "~ a red circle"
    assert attacks.attacked_prompt("a red circle", "circle", 2, "suffix") == "a red circle ~ ~"
    one = attacks.soft_prompt_attack(base, erased, prompts, "circle", steps=3, restarts=1, progress=False)
    res = attacks.soft_prompt_attack(base, erased, prompts, "circle", steps=3, n_tokens=3, placement="suffix",
                                     restarts=3, progress=False)
    assert res.vector.shape == (3, one.vector.shape[-1]) and res.prompts(["a red circle"], "circle") == \
        ["a red circle ~ ~ ~"]
    # the i-th occurrence of the placeholder takes row i: three rows give three different states
    ids = attacks.tokenize(erased.tokenizer, ["~ ~ ~"])
    vectors = torch.randn(3, one.vector.shape[-1])
    with torch.no_grad(), attacks.learned_token(erased.text_encoder.get_input_embeddings(), res.token_id, vectors):
        embedded = erased.text_encoder.get_input_embeddings()(ids)[0, 1:4]
    torch.testing.assert_close(embedded, vectors)
    with pytest.raises(ValueError, match="placement"):
        attacks.soft_prompt_attack(base, erased, prompts, "circle", steps=2, placement="middle", progress=False)
    for budget in ({"n_tokens": 0}, {"restarts": 0}, {"restarts": 10**4}):
        with pytest.raises(ValueError, match="attack budget"):
            attacks.soft_prompt_attack(base, erased, prompts, "circle", steps=2, progress=False, **budget)


def test_adversarial_search_never_worsens():
    base, erased = sd_pipeline(), sd_pipeline()
    with torch.no_grad():
        erased.text_encoder.encoder.layers[-1].mlp.fc2.weight.mul_(0.3)
    res = attacks.adversarial_search(base, erased, ["a red circle"], "circle", n_candidates=8, positions=2,
                                     progress=False)
    (r,) = res
    assert r.loss_after <= r.loss_before and r.evaluated == 1 + 8 * 2
    assert r.ids[0] == erased.tokenizer.bos_token_id and r.ids[-1] == erased.tokenizer.eos_token_id


def test_quick_evaluation_writes_self_contained_report(tmp_path):
    base, erased = sd_pipeline(), sd_pipeline()
    with torch.no_grad():
        erased.text_encoder.encoder.layers[-1].mlp.fc2.weight.mul_(0.5)
    m = ev.evaluate_pipelines(base, erased, miniworld_spec(["circle"], keep=["square"]), quick=True, steps=1,
                              output_dir=tmp_path, progress=False)
    for key in ("forgetting", "side_effects", "utility", "robustness"):
        assert key in m
    assert 0 <= m["forgetting"]["found_named_erased"] <= 1
    assert {"paraphrase", "misspelled", "adversarial", "soft_prompt"} <= set(m["robustness"])
    assert m["utility"]["erased"]["fid_judge"] >= 0
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == "erased"
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    srcs = re.findall(r"src=[\"']([^\"']+)[\"']", page)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    base64.b64decode(srcs[0].split(",", 1)[1], validate=True)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files


def test_evaluate_patch_end_to_end(tmp_path):
    base = sd_pipeline()
    base.save_pretrained(tmp_path / "sd")
    patch = tmp_path / "p.safetensors"
    make_patch(base, patch)
    m = ev.evaluate(str(tmp_path / "sd"), patch, miniworld_spec(["circle"]), quick=True, steps=1,
                    output_dir=tmp_path / "out", progress=False)
    assert m["patch_bytes"] == patch.stat().st_size and m["method"] == "test"
    suite = m["robustness"]["soft_prompt"]["suite"]
    assert suite["encoder"]["objective"] == "encoder" and suite["end_to_end"]["objective"] == "unet"
    assert m["robustness"]["soft_prompt"]["asr"] == suite["strongest"]["rate"] >= suite["encoder"]["rate"]
    assert (tmp_path / "out" / "report.html").is_file()


def test_cli_refuses_unknown_concept(tmp_path, capsys):
    from erase_diffusion.cli import main

    assert main(["evaluate", "--erase_concept", "van_gogh", "--output_dir", str(tmp_path / "o")]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_attacks_refuse_bad_budgets_words_and_sdxl():
    """Issue 12's bad input: each refusal comes before any encoder or UNet pass (a clear ValueError)."""
    base = sd_pipeline()
    for budget in ({"n_candidates": 0}, {"positions": -1}, {"n_candidates": 10**9}, {"probes": 2.5},
                   {"positions": True}):
        with pytest.raises(ValueError, match="attack budget"):
            attacks.adversarial_search(base, base, ["a red circle"], "circle", progress=False, **budget)
    for steps in (0, -5, 10**7):
        with pytest.raises(ValueError, match="attack budget steps"):
            attacks.soft_prompt_attack(base, base, ["a red circle"], "circle", steps=steps, progress=False)
    with pytest.raises(ValueError, match="learning rate"):
        attacks.soft_prompt_attack(base, base, ["a red circle"], "circle", steps=2, lr=float("nan"), progress=False)
    with pytest.raises(ValueError, match="must contain the word 'circle'"):
        attacks.adversarial_search(base, base, ["a red circle", "a blue square"], "circle", progress=False)
    with pytest.raises(ValueError, match="at least one prompt"):
        attacks.soft_prompt_attack(base, base, [], "circle", progress=False)
    xl = sdxl_pipeline()
    with pytest.raises(ValueError, match="SDXL"):
        attacks.soft_prompt_attack(xl, xl, ["a red circle"], "circle", steps=2, progress=False)


def test_percent_prints_a_rate_with_its_wilson_interval():
    from erase_diffusion.stats import percent, rate

    assert percent(rate([True] + [False] * 15)) == "6.2 % [1–28]"
    assert percent({"rate": 0.5}) == "50.0 %" and percent(None) == "–"


def test_pooled_seeds_are_one_rate_over_all_their_prompts():
    from erase_diffusion.stats import pooled, rate

    r = pooled([rate([True] * 9 + [False] * 55), rate([True] * 3 + [False] * 61), rate([True] * 5 + [False] * 59)])
    assert (r["k"], r["n"]) == (17, 192) and r == rate([True] * 17 + [False] * 175)


def test_scorecard_gives_each_paraphrase_its_own_found_rate():
    # the eraser may be told "disc" and not "round shape": the paraphrase set's rate must split by word
    from erase_diffusion.scorecard import Scorecard, summary

    spec = miniworld_spec(["circle"])
    card = Scorecard.__new__(Scorecard)  # no pipeline: the labels below stand in for the judge's
    card.spec, card.sets = spec, measure.concept_cases(spec, n=8, n_retained=8)
    circle = measure.classes("shape").index("circle")
    labels = {}
    for key, cases in card._all_cases():
        shape = torch.tensor([circle if c.shape_word == "disc" else (circle + 1) % 8 for c in cases])
        labels[key] = {"shape": shape, "colour": torch.zeros(len(cases), dtype=torch.long),
                       "style": torch.zeros(len(cases), dtype=torch.long)}
    by_word = summary({"base": card._figures(labels), "patched": card._figures(labels)}, spec)["circle"][
        "found_paraphrase_by_word"]
    assert {w: (r["k"], r["n"]) for w, r in by_word.items()} == {"disc": (4, 4), "round shape": (0, 4)}


def test_scorecard_says_what_the_erased_prompts_are_drawn_as():
    from erase_diffusion.scorecard import Scorecard, summary

    spec = miniworld_spec(["circle"])
    card = Scorecard.__new__(Scorecard)
    card.spec, card.sets = spec, measure.concept_cases(spec, n=8, n_retained=8)
    shapes = measure.classes("shape")
    labels = {key: {"shape": torch.tensor([shapes.index("star")] * 6 + [shapes.index("circle")] * (len(cases) - 6)),
                    "colour": torch.zeros(len(cases), dtype=torch.long),
                    "style": torch.zeros(len(cases), dtype=torch.long)}
              for key, cases in card._all_cases()}
    row = summary({"base": card._figures(labels), "patched": card._figures(labels)}, spec)["circle"]
    assert row["drawn_as"] == {"star": 6, "circle": 2} == row["drawn_as_base"]
    assert row["found_named"]["k"] == 2
