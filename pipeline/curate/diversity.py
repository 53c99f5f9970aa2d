"""From each group's candidates (its rarest rows, a multiple of its quota) to the rows kept, on the driver:
near-duplicates removed (pipeline/curate/dedup.py), then the quota taken by the rule ``select`` names: ``rarest``
(the lowest scores) or ``diverse-rarest``, greedy k-center over the candidates (docs/method.md, 'Curating a rare
set')."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curate.dedup import near_duplicates, unit_rows
from pipeline.curate.selection import VECTOR
from pipeline.settings import UserError

SELECTIONS = ("rarest", "diverse-rarest")


def k_center(vectors: np.ndarray, count: int) -> np.ndarray:
    """Greedy k-center (Gonzalez, 1985), the farthest-point rule, in cosine distance: rows in rarity order, the
    rarest first, then again and again the row farthest from every row taken (ties to the rarer). Returns the
    indices taken, ``min(count, len(vectors))`` of them."""
    count = min(count, len(vectors))
    if count == 0:
        return np.zeros(0, np.int64)
    unit = unit_rows(vectors)
    taken = [0]
    distance = 1 - unit @ unit[0]
    for _ in range(count - 1):
        taken.append(int(np.argmax(distance)))
        distance = np.minimum(distance, 1 - unit @ unit[taken[-1]])
    return np.array(taken, np.int64)


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    """A list column as an (n, D) float32 matrix; a missing vector or two lengths refused."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or len(set(lengths.tolist())) > 1:
        raise UserError(f"{column.null_count} candidates have no vector and the others {sorted(set(lengths.tolist()))} "
                        "values: curate rows of one encoder, or measure similarity in a pixel space "
                        "(--similarity-space pixels-16-grey)")
    return pc.list_flatten(column).to_numpy().astype(np.float32).reshape(len(column), -1)


def narrow(candidates: pa.Table, per: str | None, quotas: dict, by: str, select: str,
           dedup: dict | None) -> tuple[pa.Table, dict]:
    """Each group's kept rows among its candidates, without the vector column, and the near-duplicates removed per
    group. ``dedup`` is the rule's ``{"threshold", "search"}``, or None to keep them."""
    kept, removed = [], {}
    for key, quota in quotas.items():
        group = candidates if per is None else candidates.filter(pc.equal(candidates.column(per), key))
        group = group.sort_by([(by, "ascending"), ("sample_id", "ascending")])
        vectors = _vectors(group.column(VECTOR))
        if dedup is not None:
            duplicate = near_duplicates(vectors, dedup["threshold"], dedup["search"])
            removed[key] = int(duplicate.sum())
            group, vectors = group.filter(pa.array(~duplicate)), vectors[~duplicate]
        chosen = k_center(vectors, quota) if select == "diverse-rarest" else np.arange(min(quota, group.num_rows))
        kept.append(group.take(pa.array(np.sort(chosen))).drop_columns([VECTOR]))
    return (pa.concat_tables(kept) if kept else candidates.drop_columns([VECTOR])), removed
