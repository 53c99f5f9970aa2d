"""A run's own progress on the console: samples committed / planned, samples/s, ETA and failures.

Read from storage, the run's one record of what is done, so it shows only what is committed: each poll
lists the bucket folders still being written, their data files (reading each new file's Parquet footer
once, for its row count) and their failure records written since the run began. A bar on a terminal
(tqdm); elsewhere one status line every ``every`` seconds, and a last one when the work ends.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from pyarrow.fs import FileType

from pipeline.folders import entries
from pipeline.rows import read_footer
from pipeline.schema import DATA_DIR, FAILURES_DIR
from pipeline.storage import Location, StorageError, list_files

log = logging.getLogger(__name__)
BAR_REFRESH = 2.0  # seconds between polls behind a terminal's bar


class CommitWatch:
    """Counts the rows committed and the failures recorded in an output folder since it was made.

    ``waiting`` is how many samples this run is to commit or record as failed in each bucket folder
    (``rows.by_bucket``). A poll lists DATA_DIR's and FAILURES_DIR's bucket folders, then the files of only
    those this run writes that still wait: a bucket whose samples are all in is never listed again, so a
    poll touches what changes, not the whole run.
    """

    def __init__(self, output: Location, waiting: dict[str, int]):
        self.output = output
        self.since = datetime.now(timezone.utc)
        self.waiting = dict(waiting)
        self.counted = {name: {item.path for item in files} for name, files in self._listed(DATA_DIR).items()}
        self.recorded: dict[str, set[str]] = {}  # this run's failure records, by bucket
        self.committed = 0
        self.failed = 0

    def _listed(self, folder: str, modified_since: datetime | None = None) -> dict[str, list[Location]]:
        """The files under ``folder`` (DATA_DIR or FAILURES_DIR) of each bucket there that still waits."""
        top = self.output.child(folder)
        there = entries(top)
        suffix = ".parquet" if folder == DATA_DIR else ".json"
        return {name: list_files(top.child(name), suffix, modified_since) for name in self.waiting
                if there.get(name) == FileType.Directory}

    def poll(self) -> None:
        for name, files in self._listed(DATA_DIR).items():
            counted = self.counted.setdefault(name, set())
            for item in files:
                if item.path not in counted:  # a file is whole once listed (atomic commit), and named by its ids
                    rows = read_footer(item).num_rows
                    self.committed += rows
                    self.waiting[name] -= rows
                    counted.add(item.path)
        for name, records in self._listed(FAILURES_DIR, modified_since=self.since).items():
            recorded = self.recorded.setdefault(name, set())
            new = {item.path for item in records} - recorded
            self.failed += len(new)
            self.waiting[name] -= len(new)
            recorded |= new
        for name in [name for name, left in self.waiting.items() if left <= 0]:  # all in: no listing can change
            del self.waiting[name]
            self.counted.pop(name, None)


def status_line(done: int, planned: int, failed: int, rate: float) -> str:
    left = planned - done - failed
    eta = f"ETA {_duration(left / rate)}" if rate > 0 else "ETA unknown"
    return (f"{done}/{planned} samples committed ({100 * done / planned:.0f}%), {rate:.2f} samples/s, "
            f"{eta}, {failed} failed")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@contextmanager
def show_progress(output: Location, waiting: dict[str, int], planned: int, already: int, every: float,
                  stream=None) -> Iterator[CommitWatch]:
    """Watch ``output`` while the body runs: a bar when ``stream`` (stderr) is a terminal, else a status
    line every ``every`` seconds and a last one at the end; ``already`` of the ``planned`` samples were
    committed before, and this run commits ``waiting`` samples into each bucket folder (``CommitWatch``). A
    body that raises gets no last line: its error is the last thing said."""
    stream = stream or sys.stderr
    watch, start, stop, failed = CommitWatch(output, waiting), time.monotonic(), threading.Event(), threading.Event()
    bar = None
    if stream.isatty():
        from tqdm import tqdm

        bar = tqdm(total=planned, initial=already, unit="sample", desc="generate", file=stream, dynamic_ncols=True)

    def report() -> None:
        try:
            watch.poll()
        except StorageError as error:  # a transient listing error skips one report, never the run
            log.debug("progress poll failed: %s", error)
            return
        if failed.is_set():  # the run's error is the last line
            return
        if bar is not None:
            bar.update(already + watch.committed - bar.n)
            bar.set_postfix(failed=watch.failed, refresh=True)
        else:
            rate = watch.committed / max(time.monotonic() - start, 1e-9)
            log.info("%s", status_line(already + watch.committed, planned, watch.failed, rate))

    def loop() -> None:
        while not stop.wait(BAR_REFRESH if bar is not None else every):
            report()

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()
    try:
        yield watch
    except BaseException:
        failed.set()  # no last poll and no wait for this one: storage may be why the work failed
        raise
    else:
        stop.set()
        thread.join()
        report()
    finally:
        stop.set()
        if bar is not None:
            bar.close()
