"""The encoder tables and their light checks: the families (``FAMILIES``: name form, library, input size, pooling,
weights kinds) and the DINOv2 names; what an encoder name means, whether its weights are there and
readable, and its embedding size, all without building it (JSON configs and safetensors headers; timm or
open_clip load only to check a name of theirs). Light to import: no torch (guidance/encoders.py loads)."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from guidance.checks import check_finite_safetensors, check_weights_readable


@dataclass(frozen=True)
class EncoderSpec:
    """One row of the encoder table: what a name means."""

    hub_tag: str  # timm's pretrained tag for the official DINOv2 weights
    embed_dim: int  # D, the embedding size of the architecture as timm builds it


ENCODERS: dict[str, EncoderSpec] = {
    "vit_small_patch14_dinov2": EncoderSpec("lvd142m", 384),
    "vit_small_patch14_reg4_dinov2": EncoderSpec("lvd142m", 384),
    "vit_base_patch14_dinov2": EncoderSpec("lvd142m", 768),
    "vit_base_patch14_reg4_dinov2": EncoderSpec("lvd142m", 768),
    "vit_large_patch14_dinov2": EncoderSpec("lvd142m", 1024),
    "vit_large_patch14_reg4_dinov2": EncoderSpec("lvd142m", 1024),
    "vit_giant_patch14_dinov2": EncoderSpec("lvd142m", 1536),
    "vit_giant_patch14_reg4_dinov2": EncoderSpec("lvd142m", 1536),
}
DEFAULT_INPUT_SIZE = 224  # docs/method.md, 'The encoder': images are resized to 224 x 224 before the encoder
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm's local-dir loader reads, in its order
TIMM_POOLS = {"cls": "token", "pool": "avg"}  # encoder output -> timm's global_pool
OPEN_CLIP_POOLS = {"cls": "tok", "pool": "avg"}  # encoder output -> open_clip's pool_type
OUTPUTS = tuple(TIMM_POOLS)  # the embeddings every family gives: the CLS token after the final norm, or the patch mean


@dataclass(frozen=True)
class EncoderFamily:
    """One family of world priors, described as timm's pretrained configs describe a model. Mean and std are, in
    every family, the built model's own (its library's data config), applied inside f (guidance/encoders.py)."""

    name: str
    prefix: str  # its names are "<prefix><architecture>"; "" for the DINOv2 table's own names
    library: str  # what builds it: "timm" or "open_clip" (guidance/encoders.py LOADERS)
    pools: dict[str, str]  # encoder output ("cls" | "pool") -> the library's pooling, the feature it returns
    input_size: int | None = None  # its input side unless asked: None for the model's own (a folder's, its config's)
    patch: int | None = None  # an asked input size must be a multiple of it (else checked once the model is built)
    build_args: dict[str, str] = field(default_factory=dict)  # timm arguments every model of the family is built with
    tagged: bool = False  # its architecture may carry timm's pretrained tag (<architecture>.<tag>)
    hub: bool = True  # "hub[:TAG]" weights fetch from timm's hub; else only local files ("random" aside)
    folders: bool = True  # weights may be a timm model folder (config.json + model.safetensors)


FAMILIES: dict[str, EncoderFamily] = {
    "dinov2": EncoderFamily("dinov2", "", "timm", TIMM_POOLS, input_size=DEFAULT_INPUT_SIZE, patch=14,
                            build_args={"global_pool": "token"}),
    "timm": EncoderFamily("timm", "timm:", "timm", TIMM_POOLS, tagged=True),  # any timm VisionTransformer
    "open_clip": EncoderFamily("open_clip", "open_clip:", "open_clip", OPEN_CLIP_POOLS,  # a ViT image tower
                               hub=False, folders=False),
}
NAME_FORMS = (f"a DINOv2 name ({', '.join(sorted(ENCODERS))}), '{FAMILIES['timm'].prefix}<ViT architecture>' "
              f"(e.g. timm:vit_base_patch16_224) or '{FAMILIES['open_clip'].prefix}<architecture or config .json>' "
              "(e.g. open_clip:ViT-B-32)")


def family_of(name: str) -> tuple[EncoderFamily, str]:
    """(family row, architecture) of an encoder name: a DINOv2 table name, or a family's prefix and an architecture."""
    if name in ENCODERS:
        return FAMILIES["dinov2"], name
    for family in FAMILIES.values():
        if family.prefix and name.startswith(family.prefix) and name[len(family.prefix):]:
            return family, name[len(family.prefix):]
    raise ValueError(f"unknown encoder {name!r}; give {NAME_FORMS}")


def is_hub(weights: str) -> bool:
    return weights == "hub" or weights.startswith("hub:")


def check_encoder(name: str, weights: str, output: str = "cls", input_size: int | None = None) -> None:
    """Refuse a bad encoder request in one line before anything loads (names, weights kind, output, size)."""
    family, architecture = family_of(name)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)} (CLS token after the final norm, or the "
                         f"mean of the patch tokens), got {output!r}")
    if family.patch and input_size is not None and (input_size <= 0 or input_size % family.patch):
        raise ValueError(f"input_size must be a positive multiple of the patch size {family.patch}, got {input_size}")
    if input_size is not None and (isinstance(input_size, bool) or input_size <= 0):
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    if family.prefix:
        ARCHITECTURE_CHECKS[family.library](name, architecture)
    if not family.hub and is_hub(weights):
        raise ValueError(f"encoder {name!r} loads from a local {family.library} checkpoint file: set its weights to "
                         "that file (nothing is downloaded), or 'random' for an untrained tower")


def _check_timm_architecture(name: str, architecture: str) -> None:
    """A timm VisionTransformer by timm's registry, the only list of its architectures."""
    import timm

    vits = timm.list_models(module="vision_transformer")
    base = timm.models.get_arch_name(architecture)
    if base not in vits:
        known = "" if timm.is_model(architecture) else " unknown to timm;"
        close = difflib.get_close_matches(base, vits, n=3)
        raise ValueError(f"encoder {name!r}:{known} not a timm VisionTransformer"
                         + (f" (close: {', '.join(close)})" if close else "")
                         + "; list them with timm.list_models(module='vision_transformer')")


def _check_open_clip_architecture(name: str, architecture: str) -> None:
    open_clip_name(architecture)


ARCHITECTURE_CHECKS = {"timm": _check_timm_architecture, "open_clip": _check_open_clip_architecture}


def check_encoder_weights(name: str, weights: str | os.PathLike) -> None:
    """What ``load_encoder`` will read exists and is readable, without building the model: a file's
    suffix and header, a timm folder's config.json (its architecture) and weights file, a safetensors
    file's tensors finite. Hub and random weights have nothing local to check."""
    family, architecture = family_of(name)
    weights = str(weights)
    if weights == "random" or is_hub(weights):
        return
    path = Path(weights).expanduser()
    if not path.exists() and not family.folders:
        raise FileNotFoundError(f"{family.library} weights not found: {path}. Pass the tower's local "
                                f"{family.library} checkpoint file (nothing is downloaded), or 'random' for an "
                                "untrained tower.")
    if not path.exists():
        raise FileNotFoundError(
            f"encoder weights not found: {path}. Pass a .safetensors / .pth file, a timm model folder "
            "(config.json + model.safetensors), 'hub' to download, or 'random' for an untrained encoder."
        )
    if path.is_dir():
        if not family.folders:
            raise ValueError(f"encoder {name!r} loads from an {family.library} checkpoint file, not a folder: {path}")
        found = folder_config(path).get("architecture")
        if family.tagged:
            import timm  # its name rules: an architecture with or without its pretrained tag

            architecture = timm.models.get_arch_name(architecture)
        if found != architecture:
            raise ValueError(f"encoder folder {path} holds a {found!r}, not the requested {architecture!r}")
        files = [path / file for file in FOLDER_WEIGHTS if (path / file).is_file()]
        if not files:
            raise FileNotFoundError(f"encoder folder {path} has no weights file ({' or '.join(FOLDER_WEIGHTS)})")
        path = files[0]
    elif path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ValueError(f"encoder weights {path} must end in one of {', '.join(WEIGHT_FILE_SUFFIXES)}")
    check_weights_readable(path, "encoder weights")
    if path.suffix == ".safetensors":  # torch files are checked once loaded (load_encoder)
        check_finite_safetensors(path, f"encoder weights {path}")


def folder_config(path: Path) -> dict:
    """A timm model folder's config.json."""
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"encoder folder {path} has no config.json (timm's layout: config.json + model.safetensors)")
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"encoder folder {path}: config.json is not a readable JSON object: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"encoder folder {path}: config.json is not a readable JSON object")
    return data


def encoder_dims(name: str, weights: str | os.PathLike, input_size: int | None = None) -> tuple[int | None, int | None]:
    """(D, input side) of an encoder without building it: a timm folder's config.json (``num_features``, its
    pretrained input size, the demo encoder's 56), else the DINOv2 table (224 px unless ``input_size``); None where only the built
    model knows (timm hub names, open_clip towers). Run ``check_encoder_weights`` first."""
    family, _ = family_of(name)
    path = Path(str(weights)).expanduser()
    if family.folders and path.is_dir():
        config = folder_config(path)
        side = (config.get("pretrained_cfg") or {}).get("input_size", [None])[-1]
        return config.get("num_features"), input_size or side or family.input_size
    if name in ENCODERS:
        return ENCODERS[name].embed_dim, input_size or family.input_size
    return None, input_size


def open_clip_name(architecture: str) -> str:
    """The open_clip model name of an architecture name or model config .json (registered here)."""
    import open_clip

    name = architecture
    if architecture.endswith(".json"):
        config = Path(architecture).expanduser()
        if not config.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {config}")
        open_clip.add_model_config(config)
        name = config.stem
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ValueError(f"unknown open_clip architecture {architecture!r}: give an open_clip model name "
                         f"(e.g. ViT-B-32{', close: ' + ', '.join(close) if close else ''}) or a model config .json file")
    return name
