"""Model presets in one table, loaded with diffusers ``from_pretrained`` from a hub id or a local folder.

Every source is a diffusers pipeline folder (``model_index.json`` and one subfolder per component,
as ``pipeline.save_pretrained`` writes and hub repos hold). A preset names the family and the
sampling defaults the paper's settings use. The table and its checks (``check_model``, ``class_count``) read
only JSON and safetensors headers and import no torch or diffusers; the loaders import them when called.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guidance.checks import check_weights_readable

if TYPE_CHECKING:
    import torch

    from guidance.models import DiffusionModel

FAMILIES = {  # family -> (the diffusers pipeline class that loads it, pipeline class names it accepts), by name
    "pixel-unet": ("DDPMPipeline", ("DDPMPipeline", "DDIMPipeline")),
    "dit": ("DiTPipeline", ("DiTPipeline",)),
    "sd": ("StableDiffusionPipeline", ("StableDiffusionPipeline",)),
    "sdxl": ("StableDiffusionXLPipeline", ("StableDiffusionXLPipeline",)),
}
# family -> (the component, the key of its config that counts the class labels): class_count reads it
CLASS_KEYS = {"pixel-unet": ("unet", "num_class_embeds"), "dit": ("transformer", "num_embeds_ada_norm")}


@dataclass(frozen=True)
class ModelPreset:
    """One row of the model table."""

    family: str  # a key of FAMILIES
    hub_id: str | None  # default source (needs the internet); None: the user passes a folder
    sampler: str  # default update rule ("ddim" or "ddpm")
    steps: int  # default sampling steps
    cfg_scale: float  # default classifier-free guidance scale
    timestep_spacing: str | None = None  # None keeps the scheduler config's spacing
    needs_unet_weights: bool = False  # the UNet comes from a separate weights file (SDXL-Lightning)


PRESETS: dict[str, ModelPreset] = {
    "pixel-unet": ModelPreset("pixel-unet", None, "ddim", 50, 1.0),
    "ddpm-celebahq-256": ModelPreset("pixel-unet", "google/ddpm-celebahq-256", "ddim", 50, 1.0),
    "dit": ModelPreset("dit", None, "ddim", 50, 4.0),
    "dit-xl-2-256": ModelPreset("dit", "facebook/DiT-XL-2-256", "ddim", 50, 4.0),
    "sd": ModelPreset("sd", None, "ddim", 50, 7.5),
    "sd-1.5": ModelPreset("sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "ddim", 50, 7.5),
    "sd-2.1-base": ModelPreset("sd", "stabilityai/stable-diffusion-2-1-base", "ddim", 50, 7.5),
    "sdxl-base": ModelPreset("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "ddim", 50, 5.0),
    "sdxl-lightning-4step": ModelPreset(
        "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "ddim", 4, 1.0, "trailing", needs_unet_weights=True
    ),
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_model(
    preset: str,
    source: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    unet_weights: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    compile_network: bool = False,
    guidance_decoder: str | os.PathLike | None = None,
) -> DiffusionModel:
    """Load a preset's model, frozen and in eval mode.

    source: a local pipeline folder or a hub id (default: the preset's hub id).
    variant: diffusers weight variant, e.g. "fp16".
    unet_weights: a .safetensors / .pth file that replaces the UNet's weights (SDXL-Lightning).
    dtype: the denoiser's and VAE's dtype (None: fp32; bf16 / fp16 on GPU).
    compile_network: compile the denoising network in place with ``torch.compile``. Its first calls
      compile (tens of seconds for each batch shape and for grad mode on and off), later calls run
      faster: it pays on long runs (docs/results.md, Performance).
    guidance_decoder: an ``AutoencoderTiny`` folder or hub id (TAESD for SD 1.x / 2.x and DiT, TAESDXL for
      SDXL) that decodes the Tweedie estimate inside guidance only; latent models only.
    """
    import diffusers
    import torch
    from diffusers.utils import is_accelerate_available

    from guidance.models import DiT, PixelUNet, StableDiffusion

    check_model(preset, source, unet_weights=unet_weights)
    dtype = torch.float32 if dtype is None else dtype
    spec = PRESETS[preset]
    source = str(source) if source is not None else spec.hub_id
    pipeline_class = getattr(diffusers, FAMILIES[spec.family][0])
    # diffusers' own default, said explicitly so it skips its notice to install accelerate: measured on the demo
    # and tiny test models, loading with accelerate was slower (its import), so the project does not add it.
    options: dict[str, Any] = {"dtype": dtype, "variant": variant, "low_cpu_mem_usage": is_accelerate_available()}
    if spec.family == "sd":
        options |= {"safety_checker": None, "requires_safety_checker": False}
    pipeline = _from_pretrained(pipeline_class, source, options)
    if unet_weights is not None:
        _load_unet_weights(pipeline.unet, Path(unet_weights))
    vae = getattr(pipeline, "vae", None)
    if vae is not None and vae.config.get("force_upcast", False) and dtype == torch.float16:
        vae.to(torch.float32)  # the SDXL VAE overflows in fp16
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(device).eval().requires_grad_(False)
    if spec.family == "pixel-unet":
        model = PixelUNet(pipeline.unet, dict(pipeline.scheduler.config))
    elif spec.family == "dit":
        model = DiT(pipeline.transformer, pipeline.vae, dict(pipeline.scheduler.config))
    else:
        model = StableDiffusion(pipeline, xl=spec.family == "sdxl")
    if compile_network:
        model.network.compile()
    if guidance_decoder is not None:
        model.guidance_vae = load_guidance_decoder(guidance_decoder, model, dtype=dtype, device=device)
    return model


def load_guidance_decoder(source: str | os.PathLike, model: DiffusionModel, *, dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu") -> torch.nn.Module:
    """An ``AutoencoderTiny`` (TAESD) from a local folder or, when named so, a hub id, frozen, for ``model``'s latents."""
    import torch
    from diffusers import AutoencoderTiny

    vae = getattr(model, "vae", None)
    if vae is None:
        raise ValueError("model.guidance_decoder: this model samples pixels, so there is no decoder to replace")
    folder, source = Path(source).expanduser(), str(source)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ValueError(f"model.guidance_decoder: {folder} is not a diffusers model folder (no config.json); "
                             "save one with AutoencoderTiny.save_pretrained(folder)")
        found = json.loads((folder / "config.json").read_text()).get("_class_name")
        if found != "AutoencoderTiny":
            raise ValueError(f"model.guidance_decoder: {folder} holds a {found}, not an AutoencoderTiny (TAESD)")
    elif not HUB_ID.match(source):
        raise FileNotFoundError(f"model.guidance_decoder: folder not found: {folder} (and it is not a hub id like 'org/name')")
    try:
        tiny = AutoencoderTiny.from_pretrained(source, dtype=dtype or torch.float32)
    except Exception as error:
        raise RuntimeError(f"model.guidance_decoder: could not load {source} ({error})") from error
    latents = model.sample_shape[0]
    if tiny.config.latent_channels != latents:
        raise ValueError(f"model.guidance_decoder: {source} decodes {tiny.config.latent_channels}-channel latents, but "
                         f"this model's have {latents}: use TAESD for SD 1.x / 2.x and DiT, TAESDXL for SDXL")
    return tiny.to(device).eval().requires_grad_(False)


def check_model(preset: str, source: str | os.PathLike | None = None, *,
                unet_weights: str | os.PathLike | None = None) -> None:
    """What ``load_model`` will read exists and is readable, without loading it: a local pipeline folder's
    ``model_index.json`` (the pipeline class this preset loads), each component's config and the headers
    of its ``.safetensors`` files, and the UNet weights file. A hub id has nothing local to check."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    source = str(source) if source is not None else spec.hub_id
    if source is None:
        raise ValueError(f"preset {preset!r} has no default weights: pass the model's pipeline folder as source")
    if spec.needs_unet_weights and unet_weights is None:
        raise ValueError(f"preset {preset!r} needs unet_weights: the path of its distilled UNet weights file")
    if unet_weights is not None:
        check_weights_readable(Path(unet_weights).expanduser(), "UNet weights file")
    folder = Path(source).expanduser()
    if not folder.exists():
        if not HUB_ID.match(source):
            raise FileNotFoundError(f"model folder not found: {folder} (and it is not a hub id like 'org/name')")
        return
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                         "save one with pipeline.save_pretrained(folder)")
    components = _read_json(index)
    accepted = FAMILIES[spec.family][1]
    if components.get("_class_name") not in accepted:
        raise ValueError(f"{folder} holds a {components.get('_class_name')}, but this preset loads a "
                         f"{' or '.join(accepted)}")
    for name, entry in components.items():
        part = folder / name
        if name.startswith("_") or not isinstance(entry, list) or None in entry or not part.is_dir():
            continue
        for config in sorted(part.glob("*config.json")):
            _read_json(config)
        for weights in sorted(part.glob("*.safetensors")):
            check_weights_readable(weights, f"{name} weights")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"could not read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"could not read {path}: it holds a {type(data).__name__}, not a JSON object")
    return data


def class_count(preset: str, source: str | os.PathLike | None = None) -> int | None:
    """How many class labels the preset's model takes (0..n-1); None when it takes none.

    Reads only the model's config, so work can be checked against it before anything loads.
    """
    spec = PRESETS[preset]
    if spec.family not in CLASS_KEYS:
        return None
    component, key = CLASS_KEYS[spec.family]
    location = str(source) if source is not None else spec.hub_id
    folder = Path(location).expanduser()
    if folder.exists():
        return _read_json(folder / component / "config.json").get(key)
    if not HUB_ID.match(location):
        raise FileNotFoundError(f"model folder not found: {folder} (and it is not a hub id like 'org/name')")
    from huggingface_hub import hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(location, "config.json", subfolder=component))).get(key)
    except Exception as error:  # offline, unknown repo or file: the hub has no config to read
        raise OSError(f"could not fetch {location}'s {component} config from the hub ({error})") from error


def _from_pretrained(pipeline_class, source: str, options: dict[str, Any]):
    """A checked local folder (check_model), else a hub id."""
    folder = Path(source).expanduser()
    if folder.exists():
        return pipeline_class.from_pretrained(folder, **options)
    try:
        return pipeline_class.from_pretrained(source, **options)
    except Exception as error:  # offline or unknown repo: either way there are no weights
        raise RuntimeError(f"could not fetch {source} from the hub ({error}). Without the internet, download "
                           "the pipeline elsewhere and pass its folder as the model source.") from error


def _load_unet_weights(unet: torch.nn.Module, path: Path) -> None:
    """Replace every UNet weight from a safetensors or weights-only torch file (strict)."""
    import safetensors.torch
    import torch

    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"could not read UNet weights {path} (truncated, corrupted, or not weights-only): {error}") from error
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"UNet weights {path} do not fit this UNet: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
