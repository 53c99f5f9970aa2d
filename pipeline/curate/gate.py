"""The fidelity gate of a curation: a sample passes when its pixels lie inside at least one real sample's k-NN ball.

Each reference sample ``x_i`` has a ball of radius ``r_k(x_i)``, the distance to its ``k``-th nearest other
reference sample; a sample passes when ``|x - x_i| < r_k(x_i)`` for some ``i`` (docs/method.md, 'Measuring
rarity': the balls of the Rarity Score, the test of improved precision). Measured in a pixel space named as the
evaluation names it (``pixels-N`` or ``pixels-N-grey``), with numpy and Pillow only: no model, so the read tasks
that apply the gate stay light. The reference's features and radii are small and travel to every read task.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline.images import IMAGE_SUFFIXES, find_images
from pipeline.pixels import PIXEL_SIZES, PixelSpace
from pipeline.schema import DATA_DIR
from pipeline.settings import UserError
from pipeline.storage import StorageConfig, exists, list_files, resolve

DEFAULT_SPACE = "pixels-16-grey"
CHUNK = 256  # rows of a distance matrix computed at once


def pixel_space(name: str) -> PixelSpace:
    """The gate's space by name: a pixel space, any other name refused."""
    space = PixelSpace.parse(name)
    if space is None:
        raise UserError(f"the gate measures in pixel spaces only, got {name!r}: choose pixels-N or pixels-N-grey "
                         f"(N in {PIXEL_SIZES.start}..{PIXEL_SIZES.stop - 1}, e.g. {DEFAULT_SPACE})")
    return space


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)) in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)


@dataclass(frozen=True)
class Gate:
    """The reference's features in a pixel space and each one's squared k-NN radius."""

    space: PixelSpace
    reference: np.ndarray  # (R, D) float32
    radii: np.ndarray  # (R,) squared distance to the k-th nearest other reference sample

    @classmethod
    def build(cls, space: PixelSpace, reference: np.ndarray, k: int) -> Gate:
        """Radii with each sample leaving itself out: the (k+1)-th smallest distance, its own 0 the first."""
        radii = np.concatenate([np.partition(_squared_distances(reference[i:i + CHUNK], reference), k, axis=1)[:, k]
                                for i in range(0, len(reference), CHUNK)])
        return cls(space, reference, radii)

    def inside(self, features: np.ndarray) -> np.ndarray:
        """True where a sample lies strictly inside at least one reference ball."""
        if not len(features):
            return np.zeros(0, bool)
        return np.concatenate([(_squared_distances(features[i:i + CHUNK], self.reference) < self.radii).any(1)
                               for i in range(0, len(features), CHUNK)])


def mark_inside(batch: pa.Table, gate: Gate) -> pa.Table:
    """A read task's rows with ``inside`` (bool) in place of ``image``: an image that cannot be decoded is outside."""
    inside = np.zeros(batch.num_rows, bool)
    decoded, vectors = [], []
    for i, image in enumerate(batch.column("image").to_pylist()):
        try:
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                vectors.append(gate.space.vector(opened))
            decoded.append(i)
        except (TypeError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
            continue  # a missing or broken image lies in no ball
    if decoded:
        inside[decoded] = gate.inside(np.stack(vectors))
    return batch.drop_columns(["image"]).append_column("inside", pa.array(inside))


def _parquet_files(uri: str, storage: StorageConfig) -> tuple[list[str], object]:
    """A generated-schema reference's data files (one .parquet file, <uri>/data/*.parquet or <uri>/*.parquet)."""
    location = resolve(uri, storage)
    if location.path.endswith(".parquet") and exists(location):
        return [location.path], location.filesystem
    files = list_files(location.child(DATA_DIR), ".parquet") or list_files(location, ".parquet")
    return [file.path for file in files], location.filesystem


def _parquet_vectors(uri: str, files: list[str], filesystem, space: PixelSpace) -> list[np.ndarray]:
    vectors = []
    for path in files:
        try:
            parquet = pq.ParquetFile(filesystem.open_input_file(path))
            if "image" not in parquet.schema_arrow.names:
                raise UserError(f"gate reference {uri}: {path} has no image column; give generated-schema Parquet or "
                                 "a folder of images")
            for batch in parquet.iter_batches(columns=["image"], batch_size=256):
                for image in batch.column(0).to_pylist():
                    if image is not None:
                        with Image.open(io.BytesIO(image["bytes"])) as opened:
                            vectors.append(space.vector(opened))
        except (pa.ArrowException, UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise UserError(f"gate reference {uri}: cannot read {path} ({error}); fix or remove it") from error
    return vectors


def _image_vectors(uri: str, folder: Path, space: PixelSpace) -> list[np.ndarray]:
    try:
        files = find_images([folder])
    except ValueError as error:
        raise UserError(f"gate reference {uri} holds no Parquet files and no {'/'.join(IMAGE_SUFFIXES)} images: "
                         "give a folder of real images or a generated run") from error
    vectors = []
    for file in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # past PIL's limit: refused, not warned
                with Image.open(file) as opened:
                    vectors.append(space.vector(opened))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise UserError(f"gate reference image {file} cannot be decoded ({error}): fix or remove it") from error
    return vectors


def load_gate(uri: str, space_name: str, k: int, storage: StorageConfig) -> Gate:
    """The gate of a reference: a local folder of images, or Parquet in the generated schema (local or on S3).
    A missing, empty or unreadable reference, or one of k samples or fewer, is refused in one line."""
    space = pixel_space(space_name)
    location = resolve(uri, storage)
    if location.is_local and not Path(location.path).exists():
        raise UserError(f"gate reference {uri} not found: give a folder of real images or a generated run")
    files, filesystem = _parquet_files(uri, storage)
    if files:
        vectors = _parquet_vectors(uri, files, filesystem, space)
    elif location.is_local and Path(location.path).is_dir():
        vectors = _image_vectors(uri, Path(location.path), space)
    else:
        raise UserError(f"gate reference {uri} holds no Parquet ({DATA_DIR}/*.parquet, *.parquet or a .parquet file) "
                         "and is not a local folder of images")
    if len(vectors) <= k:
        raise UserError(f"gate reference {uri} holds {len(vectors)} images: k-NN balls with --gate-k {k} need more "
                         f"than {k}; add real images or lower --gate-k")
    return Gate.build(space, np.stack(vectors), k)
