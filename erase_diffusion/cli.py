"""``erase-diffusion``: the command line for everything that is not training (training: ``accelerate launch
train_erase.py``).

Each subcommand is an ``add_cli_arguments(parser, command)`` / ``cli_main(args) -> int`` pair: ``erase`` is defined
here, the others still in the module that does the work (to be moved here one by one). Errors a user can fix (bad input, missing models, unwritable
outputs) are ``ValueError``s / ``OSError``s: printed as one clear line, exit status 2. Each ``cli_main`` refuses bad
arguments and outputs before any expensive work, and an existing output unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time

from . import nullspace
from .atomic import check_output
from .concepts import MINIWORLD_PROTECT_PROMPTS, ConceptSpec

SUBCOMMANDS = {
    "build-miniworld": ("erase_diffusion.miniworld.build", "train the bundled miniature world from scratch"),
    "sample": ("erase_diffusion.measure", "generate images (optionally with patches) and judge them"),
    "erase": ("erase_diffusion.cli", "closed-form nullspace erasure: concepts in, patch out, no data"),
    "inspect": ("erase_diffusion.patch", "show a patch's concepts, method, base model, rank, size, fingerprint"),
    "export-kohya": ("erase_diffusion.patch", "convert a patch to the kohya / A1111 key format"),
    "bake": ("erase_diffusion.pipelines.loading", "fuse patches into a pipeline and save it as a new folder"),
    "evaluate": ("erase_diffusion.evaluate", "measure an erasure: forgetting, side effects, utility, robustness"),
}


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


_COMMANDS = {"erase": (_erase_arguments, _erase_main)}


def add_cli_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    _COMMANDS[command][0](parser)


def cli_main(args: argparse.Namespace) -> int:
    return _COMMANDS[args.command][1](args)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from .threads import configure_threads

    configure_threads()  # CPU threads that do not oversubscribe; OMP_NUM_THREADS wins
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="erase-diffusion", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub_parser = argparse.ArgumentParser(prog=f"erase-diffusion {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_cli_arguments(sub_parser, argv[0])
    args = sub_parser.parse_args(argv[1:])
    args.command = argv[0]
    try:
        return module.cli_main(args) or 0
    except (ValueError, OSError) as err:  # bad input, missing or unwritable files: one line, never a traceback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"erase-diffusion {argv[0]}: error: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
