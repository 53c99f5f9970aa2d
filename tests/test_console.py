"""What a person sees and what a local run exposes: real ``generate`` runs in fresh processes without a
terminal, their console counted and their process tree's listening sockets watched; progress counted
from storage; Ray that cannot start, said in one line."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate.job import common_error, failed_ids
from pipeline.progress import CommitWatch, show_progress, status_line
from pipeline.rows import Committed
from pipeline.schema import DATA_DIR, FAILURES_DIR
from pipeline.storage import StorageConfig, resolve, write_bytes, write_table
from tests.tiny_diffusion import misfit_copy

ROOT = Path(__file__).parent.parent
STATUS = "INFO pipeline.progress: "  # how a status line is told apart from the rest
OUR_ENV = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_TMPDIR")  # what the fixtures set


def fresh_env(**extra: str) -> dict:
    """A user's environment: none of the Ray settings the test session's fixtures put in os.environ."""
    env = {key: value for key, value in os.environ.items() if key not in OUR_ENV}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def run_watched(args: list[str], log: Path, env: dict) -> tuple[int, list[str], set, list[str]]:
    """Run the command without a terminal; returns its exit code, console lines, the (process, address,
    port) of every socket its process tree listened on, and the command lines of dashboard processes."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    listening, dashboards = set(), []
    root = psutil.Process(process.pid)
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in tree:
            try:
                listening |= {(member.name(), c.laddr.ip, c.laddr.port) for c in member.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN}
                dashboards += [" ".join(member.cmdline())] if "dashboard/dashboard.py" in " ".join(member.cmdline()) else []
            except psutil.Error:  # a process that ended between the listing and the look
                pass
        time.sleep(0.5)
    code = process.wait(timeout=60)
    return code, log.read_text().splitlines(), listening, dashboards


@pytest.mark.slow
def test_a_demo_sized_run_on_an_elastic_pool_shows_its_own_progress_and_listens_only_on_loopback(
        write_config, tmp_path):
    path = write_config(work={"class_labels": [0, 1, 2, 3, 4], "samples_per_label": 4},
                        ray={"actors": [1, 2], "cpus_per_actor": 0.5, "batch_size": 2})
    code, lines, listening, dashboards = run_watched(["generate", path, "--status-every", "5"],
                                                     tmp_path / "console.log", fresh_env())
    text = "\n".join(lines)
    assert code == 0, text
    status = [line for line in lines if STATUS in line]
    others = [line for line in lines if STATUS not in line]
    assert status and "20/20 samples committed" in status[-1] and "0 failed" in status[-1]
    assert len(others) <= 15, text
    assert "Traceback" not in text and "Total Progress" not in text and "pid=" not in text, text
    assert "status:    complete" in lines and lines[-1].startswith("browse:    mlflow ui ")
    assert "/#/experiments/" in lines[-1]  # the runs page, not the GenAI overview
    assert any(name == "gcs_server" for name, _, _ in listening), listening  # the watch saw the cluster
    assert not [s for s in listening if not is_loopback(s[1])], listening
    # No dashboard for a batch run unless asked: what Ray still starts then is its API server with no frontend
    # and only its usage-stats module.
    assert dashboards and all("--disable-frontend" in line for line in dashboards), dashboards


@pytest.mark.slow
def test_a_worker_side_error_is_the_last_line_and_no_worker_log_reaches_the_console(
        write_config, class_unet, tmp_path):
    broken = misfit_copy(class_unet, tmp_path / "misfit_unet")  # passes the preflight, fails in the sampler
    path = write_config(model={"source": str(broken)}, work={"class_labels": [0], "samples_per_label": 2},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2})
    code, lines, _, _ = run_watched(["generate", path], tmp_path / "console.log", fresh_env())
    text = "\n".join(lines)
    assert code == 2, text
    assert lines[-1].startswith("jepa-minority generate: the sampler could not load its models"), text
    assert "Traceback" not in text and "pid=" not in text, text


def test_ray_that_cannot_start_says_why_in_one_line(write_config, tmp_path):
    too_long = tmp_path / ("x" * 100)
    too_long.mkdir()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "generate", write_config()], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, stdin=subprocess.DEVNULL,
                          env=fresh_env(RAY_TMPDIR=str(too_long)))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("jepa-minority generate: Ray could not start: its socket paths under RAY_TMPDIR=")
    assert "107 bytes" in last and "set RAY_TMPDIR to a short folder" in last


RAYLET_NOTICE_DRIVER = """
import os, sys, time
from pathlib import Path
import ray
from pipeline.cluster import connect_ray, logs_folder

connect_ray(dashboard=False, verbose=sys.argv[1] == "verbose")

@ray.remote(num_cpus=0)
class Idle:
    def ready(self):
        return True

# The raylet warns past 4x its startup concurrency (the CPU count), not counting 2 x 4 I/O workers
idle = [Idle.remote() for _ in range(4 * os.cpu_count() + 2 * 4 + 1)]
ray.get([actor.ready.remote() for actor in idle])
raylet_log = Path(logs_folder()) / "raylet.out"
deadline = time.monotonic() + 60
while "worker processes have been started" not in raylet_log.read_text() and time.monotonic() < deadline:
    time.sleep(0.2)
time.sleep(3)  # the driver's error listener receives the notice well within this
print("raylet notice logged:", "worker processes have been started" in raylet_log.read_text(), flush=True)
"""


def test_the_raylets_notices_stay_in_its_log_unless_verbose(tmp_path):
    (tmp_path / "driver.py").write_text(RAYLET_NOTICE_DRIVER)
    consoles = {mode: subprocess.run([sys.executable, str(tmp_path / "driver.py"), mode], capture_output=True,
                                     text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL, env=fresh_env())
                for mode in ("quiet", "verbose")}
    for mode, done in consoles.items():
        assert done.returncode == 0 and "raylet notice logged: True" in done.stdout, done.stdout + done.stderr
    notice = "PYTHON worker processes have been started"
    assert notice not in consoles["quiet"].stdout + consoles["quiet"].stderr, consoles["quiet"].stdout
    assert "(raylet)" in consoles["verbose"].stdout and notice in consoles["verbose"].stdout  # it does reach a driver


def test_progress_counts_committed_rows_and_only_this_runs_failures(tmp_path):
    output = resolve(str(tmp_path / "out"), StorageConfig())
    data = output.child(DATA_DIR)
    rows = lambda n, tag: pa.table({"sample_id": [f"{tag}{i}" for i in range(n)]})  # noqa: E731
    write_table(data.child("000000", "part-before.parquet"), rows(5, "b"), 2)
    failures = output.child(FAILURES_DIR)
    stale = failures.child("000001", "old.json")
    write_bytes(stale, b"{}")
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).timestamp()
    os.utime(stale.path, (past, past))  # a record left by an earlier run
    watch = CommitWatch(output, {"000000": 3, "000001": 5})
    watch.poll()
    assert (watch.committed, watch.failed) == (0, 0)
    write_table(data.child("000000", "part-a.parquet"), rows(3, "a"), 2)
    write_table(data.child("000001", "part-c.parquet"), rows(4, "c"), 2)
    write_table(data.child("000002", "part-d.parquet"), rows(6, "d"), 2)  # a bucket this run does not write
    write_bytes(failures.child("000001", "new.json"), json.dumps({"error": "x"}).encode())
    write_bytes(failures.child("000002", "other.json"), json.dumps({"error": "x"}).encode())  # nor records
    watch.poll()
    watch.poll()  # a file is counted once however often it is seen
    assert (watch.committed, watch.failed) == (7, 1)
    assert watch.waiting == {}  # both buckets have all their samples, committed or failed: no poll lists them again
    write_table(data.child("000001", "part-e.parquet"), rows(2, "e"), 2)
    write_bytes(failures.child("000000", "late.json"), json.dumps({"error": "x"}).encode())
    watch.poll()
    assert (watch.committed, watch.failed) == (7, 1)
    assert status_line(12, 20, 1, 0.5) == "12/20 samples committed (60%), 0.50 samples/s, ETA 14s, 1 failed"
    assert status_line(0, 20, 0, 0.0).endswith("ETA unknown, 0 failed")


@pytest.mark.slow
def test_ctrl_c_mid_run_keeps_each_committed_batch_and_ends_in_one_line(write_config, tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the job's whole process group, once the first batch is in.
    Batches commit as they finish (not at ``max_rows_per_file``), so some rows are there; the job says so in
    one line, exits 130, and leaves none of the Ray processes it started."""
    path = write_config(work={"class_labels": list(range(10)), "samples_per_label": 6},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2},
                        output={"max_rows_per_file": 1024})
    data, log = tmp_path / "out" / DATA_DIR, tmp_path / "console.log"
    with open(log, "w") as out:
        job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", path], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=subprocess.STDOUT, env=fresh_env(), cwd=ROOT,
                               start_new_session=True)
    started = set()
    deadline = time.monotonic() + 600
    while not list(data.rglob("*.parquet")):
        assert job.poll() is None, f"the run ended before it could be interrupted: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no batch was committed in time"
        started |= set(psutil.Process(job.pid).children(recursive=True))
        time.sleep(0.2)
    started |= set(psutil.Process(job.pid).children(recursive=True))
    said = len(log.read_text().splitlines())
    os.killpg(job.pid, signal.SIGINT)
    code = job.wait(timeout=120)
    lines = log.read_text().splitlines()
    text = "\n".join(lines)
    committed = pq.ParquetDataset(str(data)).read(columns=["sample_id"]).num_rows
    assert 0 < committed < 60, text
    assert code == 130, text
    assert lines[said:] == [f"interrupted: {committed} of 60 committed; rerun the same command to resume"], text
    assert not (tmp_path / "out" / "_run.json").exists()
    time.sleep(2)  # the cluster's processes end as the driver does; give the last ones a moment
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [" ".join(p.cmdline())[:120] for p in left]


def test_the_common_error_is_named_only_when_most_failures_share_it(tmp_path):
    output = resolve(str(tmp_path / "out"), StorageConfig())

    nan = "ValueError: the image is NaN or infinite\n(at step 3)"  # a record's first line is its error
    errors = {"a": nan, "b": nan.replace("3", "2"), "c": nan, "d": "OSError: disk"}
    for index, (sample_id, error) in enumerate(errors.items()):
        write_bytes(output.child(FAILURES_DIR).child(f"{sample_id}.json"),
                    json.dumps({"sample_index": index, "error": error}).encode())
    failed = failed_ids(output, Committed.nothing())
    assert common_error(failed) == ("ValueError: the image is NaN or infinite", 3)
    assert common_error({key: failed[key] for key in ("a", "d")}) == (None, 0)  # half is not most
    assert common_error({}) == (None, 0)


def test_a_status_line_while_the_work_runs_counts_what_is_committed_so_far(tmp_path, caplog):
    """A run that commits part of its work shows 0 < committed < planned. Committed here by hand, mid-body:
    a real run's mid-run line depends on timing (the Ctrl-C test above sees real mid-run commits)."""
    output = resolve(str(tmp_path / "out"), StorageConfig())
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    counts = lambda: [tuple(map(int, m.groups())) for m in  # noqa: E731
                      (re.match(r"(\d+)/(\d+) samples committed", r.getMessage()) for r in caplog.records) if m]
    with show_progress(output, {"000000": 18}, planned=20, already=2, every=0.05, stream=io.StringIO()):
        write_table(output.child(DATA_DIR, "000000", "part-a.parquet"), pa.table({"sample_id": ["a", "b", "c"]}), 2)
        deadline = time.monotonic() + 60
        while (5, 20) not in counts():
            assert time.monotonic() < deadline, counts()
            time.sleep(0.05)
        mid = counts()
    assert mid[-1] == (5, 20) and all(0 < done < planned for done, planned in mid)  # 2 before + 3 this run
    assert counts()[-1] == (5, 20)  # and the last line, when the work ends
