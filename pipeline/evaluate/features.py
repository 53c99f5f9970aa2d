"""Image features for the evaluation, from local weights files only: the Ray Data actor and its models.

- JEPA encoder (reference images only; generated rows already store theirs): the CLS embedding and
  the exact JEPA-SCORE, computed as the sampler stage does (guidance/generate.py).
- Inception-v3 (torch-fidelity's port of the TensorFlow FID network): pool3 features (2048) for FID,
  and for sFID (Nash et al. 2021) the first 7 channels of ``mixed_6/conv`` (Mixed_6d's 1x1 branch,
  17 x 17) flattened to 2023, as guided-diffusion's evaluator takes them. torch-fidelity has no sFID;
  this hook is our glue. Images reach it resized as Clean-FID's "clean" mode does (docs/method.md,
  'Quality metrics').
- CLIP (open_clip): CLIP score = 100 * max(cos(image, prompt), 0) (Hessel et al. 2021, scaled as
  torchmetrics does), and the unit-norm image features.
- PickScore (transformers ``CLIPModel``, a local PickScore_v1 folder): the model's logit scale times
  the cosine of image and prompt embeddings (docs/method.md, 'Quality metrics').
- Raw pixels resized to a stated size, for small images when no weights file is at hand.

A ``FeatureSpace`` names where rarity is measured (pipeline/evaluate/rarity.py) and which column
carries its features.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError

from guidance import jepa_score, jepa_scores, load_encoder
from guidance.encoders import load_open_clip
from pipeline.pixels import PIXEL_SIZES, PixelSpace
from pipeline.settings import UserError

SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of mixed_6/conv
INCEPTION_SIZE = 299  # the Inception network's input side
INCEPTION_SUFFIXES = (".pth", ".pt")
CLIP_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
DEFAULT_PIXELS = "pixels-32"


@dataclass(frozen=True)
class FeatureSpace:
    """A feature space to measure rarity in, by name: ``inception``, ``clip``, ``pixels-N[-grey]`` or ``encoder``.

    ``encoder`` is the generated runs' own embedding: the space the guidance shaped, so NOT
    independent of the JEPA-SCORE. The others do not see the guidance encoder.
    """

    name: str
    column: str  # the column its features travel in
    independent: bool  # False only for the guidance encoder's own embedding
    size: int | None = None  # pixels: resized to size x size
    mode: str = "RGB"  # pixels: "RGB" or "L" (greyscale)

    @classmethod
    def parse(cls, name: str) -> FeatureSpace:
        if name == "inception":
            return cls(name, "pool", True)
        if name == "clip":
            return cls(name, "clip_image", True)
        if name == "encoder":
            return cls(name, "embedding", False)
        pixels = PixelSpace.parse(name)
        if pixels is not None:
            return cls(name, "pixels", True, pixels.size, pixels.mode)
        raise UserError(f"unknown feature space {name!r}: choose inception, clip, encoder or pixels-N[-grey] "
                         f"(N in {PIXEL_SIZES.start}..{PIXEL_SIZES.stop - 1}, e.g. {DEFAULT_PIXELS} or pixels-8-grey)")

    @classmethod
    def choose(cls, name: str | None, inception_weights: str | None, clip_weights: str | None) -> FeatureSpace:
        """The named space (checked against the weights given), else the most independent one available."""
        if name is None:
            name = "inception" if inception_weights else "clip" if clip_weights else DEFAULT_PIXELS
        space = cls.parse(name)
        if space.name == "inception" and not inception_weights:
            raise UserError(f"feature space inception needs --inception-weights. {INCEPTION_HINT}")
        if space.name == "clip" and not clip_weights:
            raise UserError(f"feature space clip needs --clip-weights and --clip-arch. {CLIP_HINT}")
        return space

    @property
    def description(self) -> str:
        what = {"pool": "Inception-v3 pool3 features (2048)", "clip_image": "CLIP image features (unit norm)",
                "embedding": "the guidance encoder's own embedding: NOT independent of the JEPA-SCORE"}
        if self.column == "pixels":
            return f"raw pixels resized to {self.size} x {self.size} {'greyscale' if self.mode == 'L' else 'RGB'}, in [0, 1]"
        return what[self.column]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """An image as this space's flat pixel vector in [0, 1] (Pillow's bilinear filter, antialiased when shrinking)."""
        return PixelSpace(self.name, self.size, self.mode).vector(image)


@dataclass(frozen=True)
class FeatureSpec:
    """Which features the actor computes; every model comes from a local file."""

    encoder: dict | None = None  # {name, weights, input_size} of the generated runs' encoder (reference images)
    inception_weights: str | None = None  # torch-fidelity's pt_inception-2015-12-05 state dict (.pth)
    clip_weights: str | None = None  # an open_clip checkpoint
    clip_arch: str | None = None  # an open_clip architecture name, or a model config .json
    clip_features: bool = False  # also the CLIP image features (rarity in the clip space)
    pixels: str | None = None  # a pixels-N feature space name: its pixel vectors
    pickscore_weights: str | None = None  # a transformers CLIPModel folder (PickScore_v1)
    pickscore_processor: str | None = None  # its CLIPProcessor folder (None: the weights folder)
    topk: int | None = None  # with an encoder: also the exact top-k log-volume at this k (``topk_score``)


def check_weights_file(path: str, what: str, suffixes: tuple[str, ...], hint: str) -> Path:
    """A readable local weights file, or an error saying what is missing and where to get it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{what} weights not found: {file}. {hint}")
    if file.suffix not in suffixes:
        raise UserError(f"{what} weights {file} must end in one of {', '.join(suffixes)}")
    return file


INCEPTION_HINT = ("FID / sFID need torch-fidelity's Inception file weights-inception-2015-12-05-6726825d.pth "
                  "(fetch it where there is internet) passed as --inception-weights; nothing is downloaded here.")
CLIP_HINT = "CLIP score needs an open_clip checkpoint file passed as --clip-weights with its --clip-arch."
PICKSCORE_HINT = ("PickScore needs a local copy of yuvalkirstain/PickScore_v1 (config.json, model.safetensors) passed as "
                  "--pickscore-weights, and the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                  "(preprocessor_config.json and the tokenizer files) in it or passed as --pickscore-processor; "
                  "nothing is downloaded here.")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the hub's, transformers 5's save_pretrained


def check_pickscore_folders(weights: str, processor: str | None) -> tuple[Path, Path]:
    """The PickScore model folder and its processor folder hold what transformers loads, or one line says what is
    missing and where to get it."""
    model, preprocessing = Path(weights).expanduser(), Path(processor or weights).expanduser()
    if not model.is_dir():
        raise UserError(f"PickScore weights not found: {model} is not a folder. {PICKSCORE_HINT}")
    missing = [name for name in ("config.json",) if not (model / name).is_file()]
    missing += [] if any((model / name).is_file() for name in MODEL_FILES) else [" or ".join(MODEL_FILES)]
    if not any((preprocessing / name).is_file() for name in PROCESSOR_FILES):
        missing.append(" or ".join(str(preprocessing / name) for name in PROCESSOR_FILES))
    if missing:
        raise UserError(f"PickScore weights incomplete in {model}: no {', '.join(missing)}. {PICKSCORE_HINT}")
    return model, preprocessing


def clean_resize(image: Image.Image, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """An RGB image as Clean-FID's "clean" mode resizes it: each channel as a float image, Pillow's bicubic filter,
    clipped to [0, 255]; then rounded to uint8, the Inception port's input type (docs/method.md, 'Quality metrics')."""
    channels = [np.asarray(Image.fromarray(np.asarray(image, np.float32)[..., c], mode="F")
                           .resize((size, size), Image.BICUBIC)) for c in range(3)]
    return torch.from_numpy(np.rint(np.clip(np.stack(channels), 0, 255)).astype(np.uint8))


class InceptionFeatures:
    """RGB images -> pool3 (B, 2048) and spatial (B, 2023) float32 features, each image clean-resized first."""

    def __init__(self, weights: str, device: str):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = check_weights_file(weights, "Inception", INCEPTION_SUFFIXES, INCEPTION_HINT)
        try:  # torch-fidelity unpickles the file: prove it holds plain tensors first
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"{path} is not a weights-only torch state dict; refusing to unpickle it ({error})") from error
        try:
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(path)).to(device)
        except RuntimeError as error:
            detail = " ".join(str(error).split())  # torch lists every mismatch on its own line: keep the refusal one line
            raise UserError(f"{path} does not hold Inception-v3 weights in torch-fidelity's layout: {detail}") from error
        self.device = device
        self._spatial: torch.Tensor | None = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].flatten(1)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        (pool,) = self.model(torch.stack([clean_resize(image) for image in images]).to(self.device))
        return pool.float().cpu().numpy(), self._spatial.float().cpu().numpy()


class ClipScorer:
    """(images, prompts) -> CLIP score per pair, 100 * max(cosine, 0)."""

    def __init__(self, arch: str, weights: str, device: str):
        import open_clip

        path = check_weights_file(weights, "CLIP", CLIP_SUFFIXES, CLIP_HINT)
        self.model, self.preprocess, name = load_open_clip(arch, str(path), device)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-norm image features (B, embed_dim), float32."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def score(self, image: torch.Tensor, prompts: list[str]) -> np.ndarray:
        """CLIP score of each (image features, prompt) pair."""
        text = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        return (100 * (image * text).sum(-1).clamp_min(0)).cpu().numpy().astype(np.float64)


class PickScorer:
    """(images, prompts) -> PickScore per pair: the model's logit scale times the cosine of the projected image and
    prompt embeddings, as PickScore's reference code scores (docs/method.md, 'Quality metrics')."""

    def __init__(self, weights: str, processor: str | None, device: str):
        from transformers import AutoProcessor, CLIPModel

        model, preprocessing = check_pickscore_folders(weights, processor)
        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=True).eval().to(device)
            self.processor = AutoProcessor.from_pretrained(preprocessing, local_files_only=True)
        except (OSError, ValueError) as error:
            detail = " ".join(str(error).split())
            raise UserError(f"PickScore: cannot load a CLIPModel and its processor from {model} / {preprocessing}: "
                             f"{detail}") from error
        self.device = device

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt").to(self.device)
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        # transformers 5: get_*_features return the tower's output, its pooler_output projected
        image = self.model.get_image_features(**pixels).pooler_output.float()
        prompt = self.model.get_text_features(**text.to(self.device)).pooler_output.float()
        cosine = torch.nn.functional.cosine_similarity(image, prompt, dim=-1)
        return (self.model.logit_scale.exp().float() * cosine).cpu().numpy().astype(np.float64)


def decode(row: dict) -> Image.Image:
    """A row's image as RGB: PNG bytes of a generated row, or a file of a reference folder."""
    source = row["path"] if row.get("image") is None else io.BytesIO(row["image"]["bytes"])
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot decode image of {row.get('sample_id') or row.get('path')}: {error}") from error


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _list_column(rows: np.ndarray) -> pa.Array:
    return pa.array(list(rows.astype(np.float32)), pa.list_(pa.float32()))


def check_device(device: str | None) -> None:
    """``device`` is a torch device this machine has (None: cuda when available, else cpu); checked before any
    model loads."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"device {device!r} is not a torch device: give cpu, cuda or cuda:N, or leave --device out "
                         "(cuda when available, else cpu)") from error
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s): give cpu, or "
                         "leave --device out (cuda when available, else cpu)")


class EvalFeatures:
    """Ray Data actor: rows with ``image`` (PNG struct) or ``path`` -> the same rows with feature columns.

    Adds ``jepa_score`` and ``embedding`` (when given an encoder; ``topk_score`` too when asked), ``pool`` and ``spatial`` (Inception),
    ``clip_score`` and ``pickscore`` (CLIP, PickScore: for batches with a ``prompt`` column; null for rows without
    one), ``clip_image`` (CLIP image features, when asked) and ``pixels`` (a pixels-N space). Drops the image so bytes
    travel no further.
    """

    def __init__(self, spec: FeatureSpec, threads: int = 1, device: str | None = None):
        torch.set_num_threads(max(1, threads))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = None
        if spec.encoder:
            self.encoder = load_encoder(spec.encoder["name"], spec.encoder["weights"], input_size=spec.encoder["input_size"],
                                        output=spec.encoder.get("output", "cls")).to(self.device)
        self.inception = InceptionFeatures(spec.inception_weights, self.device) if spec.inception_weights else None
        self.clip = ClipScorer(spec.clip_arch, spec.clip_weights, self.device) if spec.clip_weights else None
        self.clip_features = spec.clip_features
        self.pickscore = (PickScorer(spec.pickscore_weights, spec.pickscore_processor, self.device)
                          if spec.pickscore_weights else None)
        self.pixels = FeatureSpace.parse(spec.pixels) if spec.pixels else None
        self.topk = spec.topk

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images = [decode(row) for row in rows]
        out = batch.drop_columns([c for c in ("image", "path") if c in batch.column_names])
        if self.encoder is not None:
            embeddings, scores, topk = self._encode(images)
            out = out.append_column("jepa_score", pa.array(scores, pa.float64()))
            if topk is not None:
                out = out.append_column("topk_score", pa.array(topk, pa.float64()))
            out = out.append_column("embedding", _list_column(embeddings))
        if self.inception is not None:
            pool, spatial = self.inception(images)
            out = out.append_column("pool", _list_column(pool)).append_column("spatial", _list_column(spatial))
        if self.clip is not None:
            features = self.clip.image_features(images)
            if "prompt" in batch.column_names:
                out = out.append_column("clip_score", pa.array(self._clip(rows, features), pa.float64()))
            if self.clip_features:
                out = out.append_column("clip_image", _list_column(features.cpu().numpy()))
        if self.pickscore is not None and "prompt" in batch.column_names:
            out = out.append_column("pickscore", pa.array(
                _prompted(rows, lambda index: self.pickscore.score([images[i] for i in index],
                                                                   [rows[i]["prompt"] for i in index])), pa.float64()))
        if self.pixels is not None:
            out = out.append_column("pixels", _list_column(np.stack([self.pixels.pixels(image) for image in images])))
        return out

    def _encode(self, images: list[Image.Image]) -> tuple[np.ndarray, list[float], list[float] | None]:
        """Embeddings, exact JEPA-SCOREs and (when asked) exact top-k log-volumes, from one SVD per image."""
        with torch.no_grad():
            pixels = torch.stack([self.encoder.resize(_uint8(image)[None].float().to(self.device) / 255)[0]
                                  for image in images])
            embeddings = self.encoder(pixels).cpu().numpy()
        if self.topk is None:
            return embeddings, jepa_score(self.encoder, pixels).tolist(), None
        exact, topk = jepa_scores(self.encoder, pixels, self.topk)
        return embeddings, exact.tolist(), topk.tolist()

    def _clip(self, rows: list[dict], features: torch.Tensor) -> list[float | None]:
        return _prompted(rows, lambda index: self.clip.score(features[index], [rows[i]["prompt"] for i in index]))


def _prompted(rows: list[dict], score) -> list[float | None]:
    """``score(index)`` of the prompted rows at ``index``, in row order; None for rows without a prompt."""
    scores: list[float | None] = [None] * len(rows)
    index = [i for i, row in enumerate(rows) if row.get("prompt")]
    if index:
        for i, value in zip(index, score(index)):
            scores[i] = float(value)
    return scores
