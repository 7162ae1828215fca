"""``erase-diffusion``: the command line for everything that is not training (training: ``accelerate launch
train_erase.py``).

Every subcommand is here as a pair of functions, its arguments and its main; the work itself is one library call.
Errors a user can fix (bad input, missing models, unwritable outputs) are ``ValueError``s / ``OSError``s: printed as
one clear line, exit status 2. Each main refuses bad arguments and outputs before any expensive work, and an existing
output unless ``--overwrite``. The modules that load models (diffusers, the miniature world's builder) are imported
inside the mains that need them, so ``erase-diffusion inspect`` or ``--help`` answer without loading them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from . import nullspace
from .atomic import check_output
from .concepts import MINIWORLD_PROTECT_PROMPTS, ConceptSpec, miniworld_spec
from .kohya import export_kohya
from .patch_reader import describe_patch, load_patch
from .threads import configure_threads

# the most a --strength may be on the command line, as the demo's slider: beyond it a patch over-shoots its own edit
MAX_CLI_STRENGTH = 2.0


# --------------------------------------------------------------------------------------------------------- erase
def _erase_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("concepts", nargs="+", metavar="CONCEPT", help="concept(s) to erase")
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld",
                        help="pipeline / CLIP folder, Hub id, or 'miniworld' (default)")
    parser.add_argument("--protect", nargs="*", default=None, metavar="CONCEPT",
                        help="concepts kept softly: all their template prompts weigh in the least squares (default in "
                             "the miniature world: the other classes of the erased attribute; none elsewhere)")
    parser.add_argument("--protect_prompt", action="append", default=None, metavar="PROMPT",
                        help="a prompt whose text-encoder output must stay exactly the same (repeatable; each takes "
                             "~77 fc2-input dimensions, so only a few fit; default in the miniature world: "
                             + ", ".join(repr(p) for p in MINIWORLD_PROTECT_PROMPTS) + ")")
    parser.add_argument("--protect_weight", type=float, default=nullspace.PROTECT_WEIGHT,
                        help=f"λ_p: weight of a softly protected token relative to a concept token (default "
                             f"{nullspace.PROTECT_WEIGHT})")
    parser.add_argument("--synonym", action="append", default=[], metavar="CONCEPT=WORD[,WORD...]",
                        help="paraphrases of a concept (repeatable); the miniature world's are added by default")
    parser.add_argument("--strength", type=float, default=1.0, help="α in [0, 1] (default 1)")
    parser.add_argument("--rank", type=int, default=None, help="cap on the LoRA rank (default: numerical rank)")
    parser.add_argument("--anchor", default=None,
                        help="what the concept becomes (pipeline target; default in the miniature world: the class of "
                             "its attribute least like it, e.g. circle → star; the empty word otherwise)")
    parser.add_argument("--mode", choices=("anchor", "project"), default="anchor")
    parser.add_argument("--template", action="append", default=None, metavar="TEMPLATE",
                        help="prompt template with one '{}' slot (repeatable; default: generic templates)")
    parser.add_argument("--target", choices=("pipeline", "clip"), default="pipeline")
    parser.add_argument("--output", required=True, help="patch file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _parse_synonyms(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--synonym {item!r}: expected CONCEPT=WORD[,WORD...]")
        key, words = item.split("=", 1)
        out[key.strip()] = [w.strip() for w in words.split(",") if w.strip()]
    return out


def _check_cli_arguments(args: argparse.Namespace) -> None:
    """Refusals before any model loads (one line each, exit 2 through the CLI); nothing is written."""
    concepts = [c.strip().lower() for c in args.concepts]
    if not all(concepts):
        raise ValueError("a concept to erase is empty")
    if not (math.isfinite(args.strength) and 0.0 <= args.strength <= 1.0):
        raise ValueError(f"--strength must be between 0 and 1, got {args.strength}")
    if not (math.isfinite(args.protect_weight) and args.protect_weight >= 0):
        raise ValueError(f"--protect_weight must be a finite number >= 0, got {args.protect_weight}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be at least 1, got {args.rank}")
    if args.anchor is not None and args.anchor.strip().lower() in concepts:
        raise ValueError(f"--anchor {args.anchor!r} is the concept being erased: the edit would map it onto itself")
    check_output(args.output, overwrite=args.overwrite, option="--output")


def _erase_main(args: argparse.Namespace) -> int:
    _check_cli_arguments(args)
    t0 = time.perf_counter()
    spec = ConceptSpec(args.concepts, _parse_synonyms(args.synonym), args.protect or [], args.anchor,
                       args.protect_prompt)
    path = nullspace.erase(args.pretrained_model_name_or_path, spec, protect_weight=args.protect_weight,
                           strength=args.strength, rank=args.rank, target=args.target, output=args.output,
                           mode=args.mode, templates=args.template)
    print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


# -------------------------------------------------------------------------------------------- inspect, export-kohya
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patch", help="patch file (.safetensors)")


def _inspect_main(args: argparse.Namespace) -> int:
    print(json.dumps(describe_patch(args.patch), indent=2, sort_keys=True))
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patch", help="patch file (.safetensors)")
    parser.add_argument("output", help="where to write the kohya / A1111 file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _export_main(args: argparse.Namespace) -> int:
    src, dst = Path(args.patch), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"the output {dst} is the input patch: choose another file")
    check_output(dst, overwrite=args.overwrite)
    print(export_kohya(src, dst))
    return 0


# --------------------------------------------------------------------------------------------------- sample, bake
def check_strengths(strengths: list[float] | None, n: int) -> list[float]:
    """``--strength`` values for ``n`` patches (one value applies to all): finite and within [0, MAX_CLI_STRENGTH]."""
    strengths = list(strengths or [1.0])
    if len(strengths) == 1:
        strengths *= n
    if len(strengths) != n:
        raise ValueError(f"{len(strengths)} --strength values for {n} --patch files")
    for s in strengths:
        if not (math.isfinite(s) and 0.0 <= s <= MAX_CLI_STRENGTH):
            raise ValueError(f"--strength must be between 0 and {MAX_CLI_STRENGTH:g}, got {s}")
    return strengths


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts (default: the fixed evaluation prompt set)")
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld")
    parser.add_argument("--patch", action="append", default=[], help="patch file(s) to load (repeatable)")
    parser.add_argument("--strength", action="append", type=float, default=[], help="strength per patch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--output", default="outputs/samples.png", help="PNG grid to write")


def _sample_main(args: argparse.Namespace) -> int:
    from . import measure  # loads diffusers
    from .models import load_judge, load_pipeline
    from .pipelines.loading import load_patches

    # every refusal before the pipeline loads
    if args.steps < 1 or args.steps > 200:
        raise ValueError("--steps must be between 1 and 200")
    if not (math.isfinite(args.guidance) and 0.0 <= args.guidance <= 50.0):
        raise ValueError(f"--guidance must be between 0 and 50, got {args.guidance}")
    strengths = check_strengths(args.strength, len(args.patch)) if args.patch else []
    for p in args.patch:
        load_patch(p)
    check_output(args.output, overwrite=True, option="--output")  # a sample grid is meant to be redrawn
    pipe = load_pipeline(args.pretrained_model_name_or_path)
    if args.patch:
        load_patches(pipe, args.patch, strengths)
    cases = None if args.prompts else measure.eval_prompts(per_pair=1)
    prompts = args.prompts or [c.prompt for c in cases]
    images = measure.generate(pipe, prompts, seed=args.seed, steps=args.steps, guidance=args.guidance)
    print(f"wrote {measure.save_grid(images, args.output)}")
    if cases is not None and args.pretrained_model_name_or_path == "miniworld":
        print(json.dumps(measure.judge_generations(load_judge(), images, cases), indent=2))
    return 0


def _bake_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld",
                        help="bundled name, local folder or Hub id of the base pipeline (default: miniworld)")
    parser.add_argument("--patch", action="append", required=True, help="patch file; repeat to stack several")
    parser.add_argument("--strength", action="append", type=float, default=None,
                        help="strength per patch (repeat in the order of --patch; default 1.0 each)")
    parser.add_argument("--output_dir", required=True, help="new pipeline folder to write (must not exist yet)")
    parser.add_argument("--force", action="store_true", help="load patches even if the base fingerprint differs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")


def _bake_main(args: argparse.Namespace) -> int:
    from .pipelines.loading import bake  # loads diffusers

    strengths = check_strengths(args.strength, len(args.patch))
    print(bake(args.pretrained_model_name_or_path, args.patch, strengths, args.output_dir, force=args.force,
               overwrite=args.overwrite))
    return 0


# ------------------------------------------------------------------------------------------------------- evaluate
def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patch", default=None, help="patch to evaluate (omit: evaluate the unerased base model)")
    parser.add_argument("--pretrained_model_name_or_path", default="miniworld")
    parser.add_argument("--erase_concept", nargs="+", required=True, help="the erased concept(s)")
    parser.add_argument("--keep", nargs="*", default=[], help="concepts that must keep working")
    parser.add_argument("--prompt", action="append", default=None, help="own prompt naming the concept (repeatable)")
    parser.add_argument("--quick", action="store_true", help="few prompts and steps (CI / smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 quick / 20 full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="load the patch despite a fingerprint mismatch")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace metrics.json / report.html in --output_dir")


def _evaluate_main(args: argparse.Namespace) -> int:
    from .evaluate import evaluate  # loads diffusers and torchmetrics

    # every refusal before the minutes of generation: the outputs, the patch file, the settings
    for name in ("metrics.json", "report.html"):
        check_output(Path(args.output_dir) / name, overwrite=args.overwrite, option="--output_dir")
    if args.steps is not None and not 1 <= args.steps <= 200:
        raise ValueError(f"--steps must be between 1 and 200, got {args.steps}")
    if args.patch is not None:
        load_patch(args.patch)
    spec = miniworld_spec(args.erase_concept, args.keep)
    m = evaluate(args.pretrained_model_name_or_path, args.patch, spec, args.quick, output_dir=args.output_dir,
                 steps=args.steps, seed=args.seed, prompts=args.prompt, force=args.force)
    rob = m["robustness"]
    print(json.dumps({"found_named": m["forgetting"], "retained_shape": m["side_effects"].get("retained_shape_erased"),
                      "fid_judge": m["utility"]["erased"]["fid_judge"],
                      "asr": {k: v["asr"] for k, v in rob.items() if isinstance(v, dict)}}, indent=2))
    print(f"wrote {Path(args.output_dir) / 'metrics.json'} and {Path(args.output_dir) / 'report.html'}")
    return 0


# ------------------------------------------------------------------------------------------------- build-miniworld
def _build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="folder for the weights (default: the bundled one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain components that already exist")


def _build_main(args: argparse.Namespace) -> int:
    from .miniworld.build import DEFAULT_OUTPUT, build  # the builder trains models: loaded only for this command

    print(json.dumps(build(Path(args.output or DEFAULT_OUTPUT), seed=args.seed, force=args.force), indent=2))
    return 0


# name: (help, arguments, main)
SUBCOMMANDS = {
    "build-miniworld": ("train the bundled miniature world from scratch", _build_arguments, _build_main),
    "sample": ("generate images (optionally with patches) and judge them", _sample_arguments, _sample_main),
    "erase": ("closed-form nullspace erasure: concepts in, patch out, no data", _erase_arguments, _erase_main),
    "inspect": ("show a patch's concepts, method, base model, rank, size, fingerprint", _inspect_arguments,
                _inspect_main),
    "export-kohya": ("convert a patch to the kohya / A1111 key format", _export_arguments, _export_main),
    "bake": ("fuse patches into a pipeline and save it as a new folder", _bake_arguments, _bake_main),
    "evaluate": ("measure an erasure: forgetting, side effects, utility, robustness", _evaluate_arguments,
                 _evaluate_main),
}


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # CPU threads that do not oversubscribe; OMP_NUM_THREADS wins
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="erase-diffusion", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub_parser)
        sub_parser.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as err:  # bad input, missing or unwritable files: one line, never a traceback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"erase-diffusion {args.command}: error: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
