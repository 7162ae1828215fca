"""Resolve model names to loadable locations, and load pipelines, CLIP models and the judge.

``miniworld`` is the bundled miniature world; any other value is a local folder or a Hub id and goes through the very
same ``from_pretrained`` call a user would write.
"""

from __future__ import annotations

import re
from pathlib import Path

MINIWORLD_DIR = Path(__file__).parent / "miniworld" / "weights"
DEFAULT_MODEL = "miniworld"
# what each bundled name means for each kind of model
BUNDLED = {"miniworld": {"pipeline": "pipeline", "clip": "clip", "judge": "judge"}}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_miniworld(model: str | Path) -> bool:
    """The bundled name, or a path inside the bundled folder: the one test for "is this the miniature world?"."""
    if str(model) in BUNDLED:
        return True
    try:
        return Path(model).expanduser().resolve().is_relative_to(MINIWORLD_DIR.resolve())
    except OSError:
        return False


class ModelNotFoundError(ValueError):
    pass


def resolve(name_or_path: str | Path, kind: str = "pipeline") -> str:
    """Bundled name → its folder; existing local path → itself; ``owner/name`` → unchanged (a Hub id).

    Raises ModelNotFoundError naming everything that was looked for.
    """
    name = str(name_or_path)
    if name in BUNDLED:
        folder = MINIWORLD_DIR / BUNDLED[name][kind]
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"bundled model {name!r} ({kind}) is missing at {folder}; rebuild it with `erase-diffusion build-miniworld`"
            )
        return str(folder)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ModelNotFoundError(
        f"model {name!r} not found: it is not a bundled name ({', '.join(BUNDLED)}), not an existing local path "
        f"({Path(name).expanduser().resolve()}), and not a Hub id of the form 'owner/name'"
    )


def load_pipeline(name_or_path: str = DEFAULT_MODEL, **kwargs):
    """A diffusers text-to-image pipeline (SD 1.x / 2.x / XL), exactly as ``DiffusionPipeline.from_pretrained``."""
    from diffusers import DiffusionPipeline  # heavy: loaded by the commands that generate, not by `import erase_diffusion`

    location = resolve(name_or_path, "pipeline")
    try:
        pipe = DiffusionPipeline.from_pretrained(location, **kwargs)
    except OSError as err:  # offline, gated or misspelled Hub id
        raise ModelNotFoundError(f"could not load pipeline {name_or_path!r} from {location}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_clip(name_or_path: str = DEFAULT_MODEL):
    """(CLIPModel, CLIPTokenizer) for zero-shot use, exactly as ``CLIPModel.from_pretrained``."""
    from transformers import CLIPModel, CLIPTokenizer  # heavy, as diffusers above

    location = resolve(name_or_path, "clip")
    try:
        return CLIPModel.from_pretrained(location).eval(), CLIPTokenizer.from_pretrained(location)
    except OSError as err:
        raise ModelNotFoundError(f"could not load CLIP model {name_or_path!r} from {location}: {err}") from err


def load_judge(name_or_path: str = DEFAULT_MODEL):
    from .miniworld.judge import Judge  # the miniature world's own model: only the evaluation needs it

    return Judge.from_pretrained(resolve(name_or_path, "judge")).eval()
