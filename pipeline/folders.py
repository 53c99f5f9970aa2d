"""The folders a job writes into (a generation run, a curation, a refresh root, the demo's): apart from their input,
holding no other run, and nothing they did not write. Checks only: they read listings and never write.

Readers pointed at a folder read every data file below it (tests/test_readers.py), so a curated set inside its
input, or an input inside it, would be counted twice; and a folder holding another job's files is never taken
over, since a curation deletes only what its own marker (CURATION_FILE) claims.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from pipeline.schema import MANIFEST_FILE, RUN_FILE
from pipeline.storage import Location, StorageError, clear_errors, exists


def inside(inner: Location, outer: Location) -> bool:
    """``inner`` is ``outer`` or a folder below it, on the same kind of store."""
    if inner.is_local != outer.is_local:
        return False
    a, b = inner.path.rstrip("/"), outer.path.rstrip("/")
    return a == b or a.startswith(b + "/")


def check_apart(source: Location, target: Location, elsewhere: str) -> None:
    """Refuse an output that is its input, lies inside it, or holds it."""
    if inside(target, source) and inside(source, target):
        raise StorageError("output must differ from input: the curated set is a new dataset")
    for inner, outer, role in ((target, source, "output"), (source, target, "input")):
        if inside(inner, outer):
            raise StorageError(f"{role} {inner.uri} lies inside {outer.uri}: readers of the outer folder would read "
                               f"its rows too and count them twice; {elsewhere}")


def entries(folder: Location) -> dict[str, pafs.FileType]:
    """The folder's own entries by name (none when it does not exist), hidden ``.`` names left out."""
    selector = pafs.FileSelector(folder.path, allow_not_found=True)
    with clear_errors("list", folder):
        infos = folder.filesystem.get_file_info(selector)
    return {info.base_name: info.type for info in infos if not info.base_name.startswith(".")}


def check_holds_no_run(folder: Location, elsewhere: str) -> None:
    """Refuse a folder that holds a generation run (its manifest or completion marker)."""
    found = [name for name in (RUN_FILE, MANIFEST_FILE) if exists(folder.child(name))]
    if found:
        raise StorageError(f"{folder.uri} holds a generation run ({', '.join(found)}), which is never written into; "
                           f"{elsewhere}")


def check_only(folder: Location, allowed: set[str], writer: str, elsewhere: str) -> None:
    """Refuse a folder holding entries other than ``allowed`` (hidden names aside): files ``writer`` did not write."""
    foreign = sorted(set(entries(folder)) - allowed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise StorageError(f"{folder.uri} holds files {writer} did not write ({shown}), which it would mix with or "
                           f"delete; {elsewhere}")
