"""Selection on Arrow tables, run inside Ray Data tasks: only pyarrow here, so workers start light."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def valid_scores(batch: pa.Table) -> pa.Table:
    """Rows whose score is present and finite: failed or broken rows are never chosen."""
    score = batch.column("jepa_score")
    return batch.filter(pc.and_(pc.is_valid(score), pc.is_finite(score)))


def rarest(table: pa.Table, count: int, max_score: float | None) -> pa.Table:
    """The ``count`` lowest scores, ties broken by sample_id, none above ``max_score``."""
    chosen = table.sort_by([("jepa_score", "ascending"), ("sample_id", "ascending")]).slice(0, count)
    if max_score is not None:
        chosen = chosen.filter(pc.less_equal(chosen.column("jepa_score"), max_score))
    return chosen


def rarest_of_group(table: pa.Table, per: str, quotas: dict, max_score: float | None) -> pa.Table:
    return rarest(table, quotas[table.column(per)[0].as_py()], max_score)


def rows_with_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("sample_id"), value_set=ids))


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
