"""Selection on Arrow tables, run inside Ray Data tasks: only pyarrow, numpy and the schema here, so workers start light."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from pipeline.pixels import PixelSpace
from pipeline.schema import OUTPUT_SCHEMA

VECTOR = "vector"  # a row's vector in the similarity space of dedup and diverse selection


def has_valid_score(batch: pa.Table, by: str = "jepa_score") -> pa.ChunkedArray:
    """True where a row's score (column ``by``) is present and finite, false elsewhere (never null)."""
    score = batch.column(by)
    return pc.and_kleene(pc.is_valid(score), pc.is_finite(score))


def valid_scores(batch: pa.Table, by: str = "jepa_score") -> pa.Table:
    """Rows whose score is present and finite: failed or broken rows are never chosen."""
    return batch.filter(has_valid_score(batch, by))


def rarest(table: pa.Table, count: int, max_score: float | None, by: str = "jepa_score") -> pa.Table:
    """The ``count`` lowest scores (column ``by``), ties broken by sample_id, none above ``max_score``."""
    chosen = table.sort_by([(by, "ascending"), ("sample_id", "ascending")]).slice(0, count)
    if max_score is not None:
        chosen = chosen.filter(pc.less_equal(chosen.column(by), max_score))
    return chosen


def passes(batch: pa.Table, by: str = "jepa_score") -> pa.ChunkedArray:
    """True where a row may be chosen: a valid score and, when the fidelity gate marked the rows (an ``inside``
    column, pipeline/curate/gate.py), inside the reference's k-NN balls."""
    valid = has_valid_score(batch, by)
    return pc.and_(valid, batch.column("inside")) if "inside" in batch.column_names else valid


def tally(batch: pa.Table, per: str | None, by: str = "jepa_score") -> pa.Table:
    """A block's rows, valid rows (present, finite score, through the gate if any) and rows the gate dropped (a
    finite score, outside every ball) by group and method: the quotas come from the valid rows, and the per-method
    counts tell the ``output.retry_unguided`` fallback's rows apart."""
    valid = passes(batch, by)
    counted = pa.table({"group": batch.column(per) if per else pa.nulls(batch.num_rows),
                        "method": batch.column("method"), "valid": valid.cast(pa.int64()),
                        "dropped": pc.xor(has_valid_score(batch, by), valid).cast(pa.int64())})
    by_key = counted.group_by(["group", "method"]).aggregate([("valid", "sum"), ("dropped", "sum"), ([], "count_all")])
    return pa.table({"group": by_key["group"], "method": by_key["method"], "valid": by_key["valid_sum"],
                     "dropped": by_key["dropped_sum"], "rows": by_key["count_all"]})


def rarest_by_group(batch: pa.Table, per: str | None, quotas: dict, max_score: float | None,
                    by: str = "jepa_score") -> pa.Table:
    """The rows a block, or the merge of several, can still contribute: its rarest ``quotas[group]`` by group,
    among the rows that pass (``passes``), without the gate's ``inside`` column.

    Sorted by (group, score, id), a row's rank in its group is its position minus the group's first.
    """
    batch = batch.filter(passes(batch, by))
    if "inside" in batch.column_names:
        batch = batch.drop_columns(["inside"])
    if max_score is not None:
        batch = batch.filter(pc.less_equal(batch.column(by), max_score))
    if per is None:
        return rarest(batch, quotas[None], None, by)
    batch = batch.sort_by([(per, "ascending"), (by, "ascending"), ("sample_id", "ascending")])
    keys = list(quotas)
    group = pc.index_in(batch.column(per), value_set=pa.array(keys, batch.schema.field(per).type)).to_numpy()
    position = np.arange(batch.num_rows)
    first = np.maximum.accumulate(np.where(np.diff(group, prepend=-1) != 0, position, 0))
    return batch.filter(position - first < np.array([quotas[key] for key in keys], np.int64)[group])


def with_vectors(batch: pa.Table, space: str, keep_image: bool) -> pa.Table:
    """A read task's rows with ``vector``: the stored ``embedding`` (space "embedding", the column renamed) or the
    image in a pixel space (an image that cannot be decoded is a zero vector, near no other), the image dropped
    unless ``keep_image`` (the gate decodes it next)."""
    if space == "embedding":
        return batch.rename_columns([VECTOR if name == "embedding" else name for name in batch.column_names])
    pixels = PixelSpace.parse(space)
    size = pixels.size * pixels.size * (1 if pixels.mode == "L" else 3)
    vectors = []
    for image in batch.column("image").to_pylist():
        try:
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                vectors.append(pixels.vector(opened))
        except (TypeError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
            vectors.append(np.zeros(size, np.float32))
    size = pixels.size * pixels.size * (1 if pixels.mode == "L" else 3)
    column = pa.FixedSizeListArray.from_arrays(np.concatenate([np.zeros(0, np.float32), *vectors]), size)
    return (batch if keep_image else batch.drop_columns(["image"])).append_column(
        VECTOR, column.cast(pa.list_(pa.float32())))


def rows_with_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """The rows with these ids, in every column of OUTPUT_SCHEMA: one an older run lacks comes as nulls."""
    chosen = batch.filter(pc.is_in(batch.column("sample_id"), value_set=ids))
    for field in OUTPUT_SCHEMA:
        if field.name not in chosen.column_names:
            chosen = chosen.append_column(field, pa.nulls(chosen.num_rows, field.type))
    return chosen


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
