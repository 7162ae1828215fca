"""``erase-diffusion``: the command line for everything that is not training (training: ``accelerate launch
train_erase.py``).

Each subcommand lives in the module that does the work, which defines ``add_cli_arguments(parser)`` and
``cli_main(args) -> int``; this file only lists them. Errors a user can fix (bad input, missing models, unwritable
outputs) are ``ValueError``s / ``OSError``s: printed as one clear line, exit status 2. Each ``cli_main`` refuses bad
arguments and outputs before any expensive work, and an existing output unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "build-miniworld": ("erase_diffusion.miniworld.build", "train the bundled miniature world from scratch"),
    "sample": ("erase_diffusion.measure", "generate images (optionally with patches) and judge them"),
    "erase": ("erase_diffusion.nullspace", "closed-form nullspace erasure: concepts in, patch out, no data"),
    "inspect": ("erase_diffusion.patch", "show a patch's concepts, method, base model, rank, size, fingerprint"),
    "export-kohya": ("erase_diffusion.patch", "convert a patch to the kohya / A1111 key format"),
    "bake": ("erase_diffusion.pipelines.loading", "fuse patches into a pipeline and save it as a new folder"),
    "evaluate": ("erase_diffusion.evaluate", "measure an erasure: forgetting, side effects, utility, robustness"),
}


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
