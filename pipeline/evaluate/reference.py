"""Where a reference's rows are: Parquet in the generated schema, or a local folder of checked images."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.images import IMAGE_SUFFIXES, find_images
from pipeline.schema import DATA_DIR
from pipeline.settings import UserError
from pipeline.storage import StorageConfig, exists, list_files, resolve


def find_reference(uri: str, storage: StorageConfig) -> tuple[list[str], list[Path]]:
    """(Parquet files, image files) of the reference: exactly one of the two is non-empty."""
    location = resolve(uri, storage)
    if location.is_local and not Path(location.path).exists():
        raise UserError(f"reference {uri} not found: give a folder of real images or Parquet in the "
                                "generated schema")
    if location.path.endswith(".parquet") and exists(location):
        return [location.path], []
    files = list_files(location.child(DATA_DIR), ".parquet") or list_files(location, ".parquet")
    if files:
        return [f.path for f in files], []
    if not location.is_local or not Path(location.path).is_dir():
        raise UserError(f"reference {uri} holds no Parquet ({DATA_DIR}/*.parquet, *.parquet or a .parquet "
                         "file) and is not a local folder of images")
    try:
        images = find_images([location.path])
    except ValueError as error:
        raise UserError(f"reference {uri} holds no Parquet files and no {'/'.join(IMAGE_SUFFIXES)} "
                         "images: an empty reference cannot be compared against") from error
    for file in images:  # here, so that a broken file is named plainly instead of inside a Ray worker's trace
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # past PIL's limit: refused, not warned
                with Image.open(file) as image:
                    image.verify()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise UserError(f"reference image {file} is too large to decode safely ({error}): shrink it below "
                             f"{Image.MAX_IMAGE_PIXELS} pixels or remove it") from error
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise UserError(f"reference image {file} cannot be decoded ({error}): fix or remove it") from error
    return [], images
