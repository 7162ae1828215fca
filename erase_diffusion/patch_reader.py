"""Reading a patch file back, with validation: ``load_patch`` (and ``describe_patch``, what ``inspect`` prints).

``load_patch`` is the one validation every reader goes through (``erase_diffusion.pipelines.loading.load_patches``,
inspect / ``describe_patch``, ``erase_diffusion.kohya.export_kohya``, ``erase_diffusion.patch.apply_to_clip``,
evaluate, bake, the app's upload). It never unpickles, touches no model, and every failure is a ``PatchError`` with a
one-line reason. The format itself is described in ``erase_diffusion.patch_format``.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .patch_format import (
    COMPONENTS,
    FORMAT_VERSION,
    META_PREFIX,
    TEXT_ENCODERS,
    LoraFactors,
    Patch,
    PatchError,
    check_module_name,
    content_sha256,
    has_attention,
    peft_name,
)

_MAX_HEADER = 100 * 1024 * 1024
_KEY = re.compile(r"^(text_encoder|text_encoder_2|clip)\.([A-Za-z0-9_.]+?)\.(lora_A\.weight|lora_B\.weight)$")

# ΔW of a real edit is of the order of the weights it changes (|W| ≲ 10 in CLIP); a factor or ΔW entry beyond this is
# a corrupted or hostile file (1e30-sized factors gave NaN conditioning).
MAX_ABS = 1e3
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_JSON_FIELDS = {"settings": dict, "erased": list, "protected": list, "fingerprints": dict, "ranks": dict,
                "figures": dict}
# the LoraConfig fields write_patch writes (checked one by one in _check_adapter_metadata) ...
_LORA_FIELDS = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "lora_dropout", "bias",
                "use_dora", "lora_bias", "use_rslora"}
# ... and other LoraConfig fields a tool may add, accepted at these values (anything else must be off: None / False /
# empty), because diffusers passes every field to LoraConfig and some (init_lora_weights="pissa", layer_replication)
# change the base weights or the architecture.
_LORA_HARMLESS = {"peft_type": ("LORA",), "init_lora_weights": (True, False), "inference_mode": (True, False),
                  "megatron_core": ("megatron.core",), "qalora_group_size": (16,)}
_LORA_FREE_TEXT = {"peft_version", "base_model_name_or_path", "revision"}


def _read_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header by hand (clear errors; nothing is unpickled, ever)."""
    try:
        if not path.exists():
            raise PatchError(f"patch {path} does not exist")
        if not path.is_file():  # directories, FIFOs, devices (a symlink counts as what it points to)
            raise PatchError(f"patch {path} is not a regular file")
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise PatchError(f"{path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise PatchError(f"{path} is not a safetensors file, or it is truncated (header length {n}, size {size})")
            raw = fh.read(n)
    except (OSError, ValueError) as err:  # ValueError: a NUL in the name; PatchError passes through unchanged
        if isinstance(err, PatchError):
            raise
        raise PatchError(f"patch {path} cannot be read: {err}") from None
    if raw[:1] != b"{":  # pickles (torch.save's zip or protocol-2 bytes) and other formats end here
        raise PatchError(f"{path} is not a safetensors file (pickled checkpoints are never loaded)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PatchError(f"{path} has a corrupted safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise PatchError(f"{path} has a corrupted safetensors header")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, IndexError, ValueError):
            raise PatchError(f"{path} has a corrupted safetensors header (entry {key!r})") from None
        if not 0 <= begin <= stop:
            raise PatchError(f"{path} has a corrupted safetensors header (entry {key!r}: offsets {begin}, {stop})")
        end = max(end, stop)
    if 8 + n + end != size:
        raise PatchError(f"{path} is truncated or has trailing data: header promises {8 + n + end} bytes, file has {size}")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or
                             not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise PatchError(f"{path} has a corrupted safetensors header (__metadata__ must map strings to strings)")
    return header



def _parse_metadata(raw: dict[str, str], path: Path) -> dict:
    version_text = raw.get(f"{META_PREFIX}format_version")
    if version_text is None:
        raise PatchError(f"{path} is a safetensors file but not an erase-diffusion patch (no erase_diffusion metadata)")
    if not re.fullmatch(r"[0-9]{1,6}", version_text) or int(version_text) < 1:
        raise PatchError(f"{path}: metadata {META_PREFIX}format_version {version_text!r} is not a format number")
    version = int(version_text)
    if version > FORMAT_VERSION:
        raise PatchError(f"{path} has patch format {version}; this erase-diffusion reads up to {FORMAT_VERSION}")
    out: dict = {}
    for key, value in raw.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key.removeprefix(META_PREFIX)
        if name in _JSON_FIELDS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise PatchError(f"{path}: metadata {key} is not valid JSON") from None
            if not isinstance(value, _JSON_FIELDS[name]):
                raise PatchError(f"{path}: metadata {key} must be a JSON {_JSON_FIELDS[name].__name__}")
        out[name] = value
    out["format_version"] = version
    for name in ("erased", "protected"):
        if not all(isinstance(v, str) for v in out.get(name, [])):
            raise PatchError(f"{path}: metadata {META_PREFIX}{name} must be a list of strings")
    fps = out.get("fingerprints", {})
    if not all(k in COMPONENTS and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v) for k, v in fps.items()):
        raise PatchError(f"{path}: metadata {META_PREFIX}fingerprints must map components to 16 hex digits")
    if out.get("kind", "lora") != "lora":  # a patch holds LoRA factors only: there is no dense "full" mode
        raise PatchError(f"{path}: metadata {META_PREFIX}kind must be 'lora' (dense full-mode patches are not "
                         f"supported), got {out['kind']!r}")
    if out.get("lora_alpha", "rank") != "rank":  # every module is written with alpha == r (scale 1)
        raise PatchError(f"{path}: metadata {META_PREFIX}lora_alpha must be 'rank', got {out['lora_alpha']!r}")
    if "sha256" in out and not re.fullmatch(r"[0-9a-f]{64}", out["sha256"]):
        raise PatchError(f"{path}: metadata {META_PREFIX}sha256 is not a sha256 digest")
    if "lora_adapter_metadata" in raw:
        try:
            adapter = json.loads(raw["lora_adapter_metadata"])
        except json.JSONDecodeError:
            raise PatchError(f"{path}: lora_adapter_metadata is not valid JSON") from None
        if not isinstance(adapter, dict):
            raise PatchError(f"{path}: lora_adapter_metadata must be a JSON object")
        out["lora_adapter_metadata"] = adapter
    return out



def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_adapter_metadata(adapter: dict, layers: dict[str, dict[str, LoraFactors]], path: Path) -> None:
    """diffusers builds each text encoder's LoraConfig from these fields: they must give exactly ΔW = B @ A on exactly
    the modules in the file (alpha == r, no DoRA / rsLoRA, targets == tensors, ranks as stored)."""
    by_component: dict[str, dict] = {}
    for key, value in adapter.items():
        component, _, field = key.partition(".")
        if component not in TEXT_ENCODERS or not field:
            raise PatchError(f"{path}: lora_adapter_metadata key {key!r} is not '<text encoder>.<LoraConfig field>'")
        by_component.setdefault(component, {})[field] = value
    have = {c for c in layers if c in TEXT_ENCODERS}
    if set(by_component) != have:
        raise PatchError(f"{path}: lora_adapter_metadata describes {sorted(by_component) or 'no component'} but the "
                         f"file holds LoRA for {sorted(have) or 'no text encoder'}")
    for component, cfg in by_component.items():
        where = f"{path}: lora_adapter_metadata {component}"
        for field, value in cfg.items():
            if field in _LORA_FIELDS or field in _LORA_FREE_TEXT and (value is None or isinstance(value, str)):
                continue
            if field in _LORA_HARMLESS and value in _LORA_HARMLESS[field] and not isinstance(value, (dict, list)):
                continue
            if value is None or value is False or value == {} or value == []:  # a feature switched off
                continue
            raise PatchError(f"{where}.{field} = {value!r} is not supported (it would change what diffusers loads)")
        for flag in ("use_dora", "use_rslora", "lora_bias"):
            if cfg.get(flag, False) is not False:
                raise PatchError(f"{where}.{flag} must be false: a patch is plain LoRA with ΔW = B @ A")
        if cfg.get("bias", "none") != "none":
            raise PatchError(f"{where}.bias must be 'none'")
        dropout = cfg.get("lora_dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or dropout != 0:
            raise PatchError(f"{where}.lora_dropout must be 0")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not (_is_int(r) and r >= 1):
            raise PatchError(f"{where}.r must be a positive integer, got {r!r}")
        if alpha != r or not _is_int(alpha):
            raise PatchError(f"{where}.lora_alpha is {alpha!r} but must equal r = {r} (scale 1: ΔW = B @ A)")
        ranks = {peft_name(component, m): f.rank for m, f in layers[component].items()}
        targets = cfg.get("target_modules")
        if not isinstance(targets, list) or sorted(map(str, targets)) != sorted(ranks) or len(targets) != len(ranks):
            raise PatchError(f"{where}.target_modules does not list exactly the {len(ranks)} modules in the file")
        patterns = {}
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = cfg.get(name, {})
            if not isinstance(pattern, dict) or not set(pattern) <= set(ranks) or \
                    not all(_is_int(v) and v >= 1 for v in pattern.values()):
                raise PatchError(f"{where}.{name} must map modules of the file to positive integers")
            patterns[name] = pattern
        for module, rank in ranks.items():
            declared = patterns["rank_pattern"].get(module, r)
            declared_alpha = patterns["alpha_pattern"].get(module, alpha)
            if declared != rank or declared_alpha != rank:
                raise PatchError(f"{where}: {module} has rank {rank} in the file but r {declared}, alpha "
                                 f"{declared_alpha} in the metadata")



def _check_tensor(key: str, t: Tensor, path: Path) -> None:
    if t.dtype not in _DTYPES or t.ndim != 2 or min(t.shape) < 1:
        raise PatchError(f"{path}: {key} must be a non-empty float32/float16/bfloat16 matrix, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise PatchError(f"{path}: {key} contains NaN or Inf")
    biggest = float(t.abs().max())
    if biggest > MAX_ABS:
        raise PatchError(f"{path}: {key} has an entry of magnitude {biggest:.3g} (> {MAX_ABS:g}): not a plausible edit")



def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the file, through safetensors (after ``_read_header`` has vetted the header by hand)."""
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PatchError(f"{path} could not be read as safetensors: {reason}") from None
    return tensors


def _split_keys(tensors: dict[str, Tensor], path: Path) -> dict[tuple[str, str], dict[str, Tensor]]:
    """(component, module) → {"lora_A": …, "lora_B": …}, each key and tensor checked on the way."""
    pieces: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if key.endswith(".delta"):
                raise PatchError(f"{path}: key {key!r} is a dense ΔW ('full' mode), which is not supported: "
                                 "a patch holds LoRA factors only")
            raise PatchError(f"{path}: key {key!r} does not belong in a patch")
        component, module, what = m.groups()
        check_module_name(component, module)
        _check_tensor(key, t, path)
        pieces.setdefault((component, module), {})[what.split(".")[0]] = t
    return pieces


def _pair_factors(pieces: dict[tuple[str, str], dict[str, Tensor]], path: Path) -> dict[str, dict[str, LoraFactors]]:
    """component → module → factors: both halves present, ranks matching, ΔW of plausible magnitude."""
    layers: dict[str, dict[str, LoraFactors]] = {}
    for (component, module), ab in pieces.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise PatchError(f"{path}: {component}.{module} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.shape[0] != B.shape[1]:
            raise PatchError(f"{path}: {component}.{module} rank mismatch: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")
        f = LoraFactors(A=A, B=B)
        biggest = float(f.delta().abs().max())
        if not biggest <= MAX_ABS:  # also catches a product that overflows to Inf
            raise PatchError(f"{path}: {component}.{module} has a ΔW entry of magnitude {biggest:.3g} (> {MAX_ABS:g})")
        layers.setdefault(component, {})[module] = f
    if not layers:
        raise PatchError(f"{path} holds no modules")
    return layers


def _check_declared(layers: dict[str, dict[str, LoraFactors]], metadata: dict, path: Path) -> None:
    """The modules are loadable by diffusers and exactly those (with those ranks) the metadata declares."""
    for component, mods in layers.items():
        if component in TEXT_ENCODERS and not has_attention(mods):
            raise PatchError(f"{path}: {component} LoRA is MLP-only, which diffusers cannot load")
    ranks = metadata.get("ranks")
    if ranks is None:
        raise PatchError(f"{path}: metadata {META_PREFIX}ranks is missing")
    declared = {f"{c}.{m}": k for c, mods in ranks.items() if isinstance(mods, dict) for m, k in mods.items()}
    actual = {f"{c}.{m}": f.rank for c, mods in layers.items() for m, f in mods.items()}
    if declared != actual or not all(isinstance(mods, dict) for mods in ranks.values()):
        wrong = sorted(k for k in declared.keys() | actual.keys() if declared.get(k) != actual.get(k))
        detail = f" ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})" if wrong else ""
        raise PatchError(f"{path}: metadata {META_PREFIX}ranks does not match the modules and ranks in the file{detail}")
    if "lora_adapter_metadata" in metadata:
        _check_adapter_metadata(metadata["lora_adapter_metadata"], layers, path)


def _check_checksum(tensors: dict[str, Tensor], metadata: dict, path: Path) -> None:
    """The content checksum (a warning, attributed to ``load_patch``'s caller, for older patches without one)."""
    want = metadata.get("sha256")
    if want is None:
        warnings.warn(f"{path.name} has no content checksum (written by erase-diffusion "
                      f"{metadata.get('version', '< 0.1')}): its tensors cannot be verified", stacklevel=4)
    elif content_sha256(tensors) != want:
        raise PatchError(f"{path}: the tensors do not match the checksum in the metadata (the file is corrupted)")


def _read_and_check(path) -> Patch:
    """``load_patch`` without its last-resort wrapper."""
    try:
        path = Path(path)
    except TypeError:
        raise PatchError(f"a patch is a file path, got {type(path).__name__}") from None
    header = _read_header(path)
    metadata = _parse_metadata(header.get("__metadata__") or {}, path)
    tensors = _read_tensors(path)
    layers = _pair_factors(_split_keys(tensors, path), path)
    _check_declared(layers, metadata, path)
    # last, so that a structural problem gets its own reason; what is left is silent corruption of the values
    _check_checksum(tensors, metadata, path)
    return Patch(layers=layers, metadata=metadata, path=path)


def load_patch(path) -> Patch:
    """Read and validate a patch before anything touches a model. Raises ``PatchError`` (a ``ValueError``).

    Checked: a regular safetensors file (never unpickled), a well-formed header with erase-diffusion metadata, the
    content checksum (a warning for older patches without one), only LoRA keys of known components, finite float
    matrices of plausible magnitude, A and B of each module present with matching ranks, the recorded ranks and
    diffusers' ``lora_adapter_metadata`` (alpha == r, no DoRA / rsLoRA, targets == the tensors present). Whether the
    patch fits a model is checked by the loaders (``check_patch``, ``apply_to_clip``).
    """
    try:
        return _read_and_check(path)
    except PatchError:
        raise
    except Exception as err:  # the contract is one PatchError per bad file; the fuzz test keeps this branch unused
        raise PatchError(f"{path}: not a valid patch ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def describe_patch(path) -> dict:
    """What ``erase-diffusion inspect`` prints."""
    patch = load_patch(path)
    md = patch.metadata
    ranks = sorted({f.rank for mods in patch.layers.values() for f in mods.values()})
    params = sum(f.A.numel() + f.B.numel() for mods in patch.layers.values() for f in mods.values())
    modules = {c: sorted(patch.layers[c]) for c in patch.components}
    return {
        "path": str(patch.path),
        "size_bytes": patch.path.stat().st_size,
        "kind": patch.kind,
        "method": md.get("method"),
        "erased": md.get("erased", []),
        "protected": md.get("protected", []),
        "base_model": md.get("base_model"),
        "fingerprints": md.get("fingerprints", {}),
        "components": {c: len(m) for c, m in modules.items()},
        "modules": modules,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "lora_alpha": md.get("lora_alpha", "rank"),
        "parameters": params,
        "settings": md.get("settings", {}),
        "figures": md.get("figures", {}),
        "format_version": md.get("format_version"),
        "erase_diffusion_version": md.get("version"),
    }
