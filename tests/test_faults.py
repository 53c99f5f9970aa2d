"""Faults during a run, all real: a sampler actor's process killed, a Ray worker node killed, the S3
endpoint failing or going away. Each run must end with every manifest ``sample_id`` in the data
exactly once, or fail clearly with nothing that looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.feather as feather
import pyarrow.fs as pafs
import pytest

from jobs import generate as generate_job
from pipeline.generate.config import load_config
from pipeline.generate.job import run_generation
from pipeline.generate.preflight import preflight_generation
from pipeline.generate.work import Manifest
from pipeline.schema import DATA_DIR, DATA_FILE_PREFIX, FAILURES_DIR, MANIFEST_FILE, bucket_of
from pipeline.storage import TEMP_PREFIX
from tests.test_generation import planned_ids, read_rows


def sampler_pids(root: int) -> set[int]:
    """PIDs of the sampler actors (Ray Data's MapWorker(MapBatches(SampleGenerator))) under process ``root``."""
    pids = set()
    for process in psutil.Process(root).children(recursive=True):
        try:
            if "SampleGenerator" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def start_driver(config: str, ray_address: str, log: Path, **env: str) -> subprocess.Popen:
    """``python -m jobs.generate`` in its own process group, attached to the cluster at ``ray_address``."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "jobs.generate", config],
                                env=os.environ | {"RAY_ADDRESS": ray_address} | env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_commits(driver: subprocess.Popen, data: Path, log: Path, timeout: float = 300) -> int:
    """Wait until the running driver has committed its first data file; returns the rows committed."""
    deadline = time.monotonic() + timeout
    while not list(data.rglob(f"{DATA_FILE_PREFIX}*.parquet")):
        assert driver.poll() is None, f"the run ended before the fault: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no data file was committed in time"
        time.sleep(0.2)
    return len(read_rows(pafs.LocalFileSystem(), str(data)))


def finish(driver: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        pytest.fail(f"the run did not finish within {timeout} s: {log.read_text()[-3000:]}")


def assert_exactly_once(out: Path) -> None:
    """Every manifest id in the data once, nothing else, and the run marked complete."""
    manifest = planned_ids(out)
    ids = [row["sample_id"] for row in read_rows(pafs.LocalFileSystem(), str(out / "data"))]
    assert len(ids) == len(set(ids)), "a sample_id was committed twice"
    assert sorted(ids) == sorted(manifest), "committed ids differ from the manifest"
    run = json.loads((out / "_run.json").read_text())
    assert run["counts"]["committed"] == len(manifest) and run["counts"]["failed"] == 0


def test_a_killed_sampler_actor_is_restarted_and_every_sample_lands_once(ray_cluster, write_config, tmp_path):
    path = write_config(work={"class_labels": [1, 2, 4, 5, 8, 9], "samples_per_label": 4},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2},
                        output={"max_rows_per_file": 2})
    out, log = tmp_path / "out", tmp_path / "driver.log"
    driver = start_driver(path, ray_cluster, log)
    committed = wait_for_commits(driver, out / "data", log)
    (actor,) = sampler_pids(os.getpid())  # the session's local cluster runs under this process
    os.kill(actor, signal.SIGKILL)
    assert committed < 24 and driver.poll() is None  # killed mid-run
    assert finish(driver, log) == 0, log.read_text()[-3000:]
    assert_exactly_once(out)
    assert not list((out / FAILURES_DIR).rglob("*.json"))


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head with no CPUs and two worker nodes with 2 CPUs each, all on 127.0.0.1: every sampler
    actor and write task runs on a worker node, which the test may then kill."""
    from tests.services import start_multi_node_cluster

    cluster = start_multi_node_cluster(tmp_path / "cluster.log", workers=2, cpus_per_worker=2)
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_a_lost_worker_node_loses_no_sample(two_node_cluster, write_config, tmp_path):
    cluster = two_node_cluster
    path = write_config(work={"class_labels": [1, 2, 4, 5, 8, 9], "samples_per_label": 4},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2},
                        output={"max_rows_per_file": 2})
    out, log = tmp_path / "out", tmp_path / "driver.log"
    driver = start_driver(path, cluster.address, log)
    committed = wait_for_commits(driver, out / "data", log)
    (lost,) = [i for i, raylet in enumerate(cluster.raylets) if sampler_pids(raylet)]  # the actor's node
    cluster.kill_node(lost)
    assert committed < 24 and driver.poll() is None  # lost mid-run
    # The only place left for the pool's one actor is the surviving node (the head has no CPUs).
    assert finish(driver, log) == 0, log.read_text()[-3000:]
    assert_exactly_once(out)


@pytest.fixture
def s3_proxy(s3):
    """A faulty proxy in front of the session's moto server (see tests/services.py FaultyS3Proxy)."""
    from tests.services import FaultyS3Proxy

    proxies = []

    def make(**faults) -> FaultyS3Proxy:
        proxies.append(FaultyS3Proxy(s3.endpoint, **faults))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.down()


def s3_rows(s3, bucket: str, prefix: str) -> list[dict]:
    filesystem = pafs.S3FileSystem(endpoint_override=s3.endpoint.removeprefix("http://"), scheme="http",
                                   access_key=s3.access_key, secret_key=s3.secret_key, region="us-east-1")
    return read_rows(filesystem, f"{bucket}/{prefix}/data")


def s3_keys(s3, bucket: str, prefix: str) -> set[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    return {item["Key"].removeprefix(f"{prefix}/") for item in listing.get("Contents", [])}


def assert_exactly_once_on_s3(s3, bucket: str, prefix: str) -> None:
    import io

    stored = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_FILE}")["Body"].read()
    manifest = Manifest.read(feather.read_table(io.BytesIO(stored))).table.column("sample_id").to_pylist()
    ids = [row["sample_id"] for row in s3_rows(s3, bucket, prefix)]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(manifest)
    run = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/_run.json")["Body"].read())
    assert run["counts"]["committed"] == len(manifest)


def test_transient_s3_errors_are_retried_and_the_run_completes(ray_cluster, s3, s3_proxy, write_config):
    proxy = s3_proxy(fail_first_tries=True)
    s3.client().create_bucket(Bucket="flaky")
    path = write_config(output={"uri": "s3://flaky/run"}, storage={"endpoint_url": proxy.endpoint})
    assert run_generation(preflight_generation(load_config(path))).complete
    assert proxy.slowdowns >= 2 and proxy.resets >= 2, "the faults never reached the run"
    assert_exactly_once_on_s3(s3, "flaky", "run")


MULTIPART_BYTES = 25 * 1024 * 1024  # above pyarrow's 10 MiB upload part: written as a multipart upload


def test_a_write_that_fails_midway_through_a_multipart_upload_leaves_nothing(s3, s3_proxy):
    """Part 2 onwards is refused on every try: the write fails, no truncated object is completed and
    the upload's stored parts are aborted, not left behind at the key."""
    from pipeline.storage import StorageConfig, StorageError, read_bytes, resolve, write_bytes

    proxy = s3_proxy(fail_parts_from=2)
    client = s3.client()
    client.create_bucket(Bucket="multipart")
    data = os.urandom(MULTIPART_BYTES)
    faulty = resolve("s3://multipart/big.bin", StorageConfig(endpoint_url=proxy.endpoint, region="us-east-1"))
    with pytest.raises(StorageError, match="cannot write s3://multipart/big.bin"):
        write_bytes(faulty, data)
    assert proxy.failed_parts > 0, "the fault never reached the upload"
    assert "Contents" not in client.list_objects_v2(Bucket="multipart", Prefix="big.bin")
    assert client.list_multipart_uploads(Bucket="multipart").get("Uploads", []) == []

    direct = resolve("s3://multipart/big.bin", StorageConfig(endpoint_url=s3.endpoint, region="us-east-1"))
    write_bytes(direct, data)  # the same write without the fault goes through whole
    assert read_bytes(direct) == data


def test_a_commit_whose_file_cannot_be_written_writes_no_marker(tmp_path):
    """Data first, marker last: a file that cannot be written stops the commit before its completion marker."""
    from pipeline.storage import StorageConfig, StorageError, commit, resolve

    target = resolve(str(tmp_path / "out"), StorageConfig())
    blocker = tmp_path / "out" / "table.md" / "mine.txt"  # a folder where the table goes: it cannot be written
    blocker.parent.mkdir(parents=True)
    blocker.write_text("mine")
    files = {"plot.png": b"plot", "table.md": b"table"}
    with pytest.raises(StorageError, match="cannot write .*table.md"):
        commit(target, files, ("done.json", b"{}"))
    assert not (tmp_path / "out" / "done.json").exists() and (tmp_path / "out" / "plot.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plot.png", "table.md"]  # no temporary file left
    blocker.unlink()
    blocker.parent.rmdir()
    commit(target, files, ("done.json", b"{}"))
    assert {name: (tmp_path / "out" / name).read_bytes() for name in [*files, "done.json"]} == files | {"done.json": b"{}"}


@pytest.mark.slow
def test_an_s3_outage_mid_run_fails_clearly_and_the_rerun_resumes(ray_cluster, s3, s3_proxy, write_config, tmp_path):
    proxy = s3_proxy()
    s3.client().create_bucket(Bucket="outage")
    path = write_config(work={"class_labels": [1, 2, 4, 5, 8, 9], "samples_per_label": 4},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2},
                        output={"uri": "s3://outage/run", "max_rows_per_file": 2},
                        storage={"endpoint_url": proxy.endpoint})
    log = tmp_path / "driver.log"
    driver = start_driver(path, ray_cluster, log)
    deadline = time.monotonic() + 300
    while not any(key.startswith(f"{DATA_DIR}/{bucket_of(0)}/{DATA_FILE_PREFIX}") for key in s3_keys(s3, "outage", "run")):
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no data file was committed in time"
        time.sleep(0.2)
    proxy.down()
    assert finish(driver, log) != 0
    message = log.read_text()
    assert "jepa-minority generate: " in message and "storage endpoint did not answer" in message, message[-3000:]
    keys = s3_keys(s3, "outage", "run")
    assert "_run.json" not in keys
    partial = s3_rows(s3, "outage", "run")  # every committed file reads whole
    assert 0 < len(partial) < 24

    proxy.up()
    summary = run_generation(preflight_generation(load_config(path)))
    assert summary.complete and summary.generated == 24 - len(partial)
    assert_exactly_once_on_s3(s3, "outage", "run")


SOAK_SAMPLES = 2500  # 100 batches: a 1 MiB-per-batch leak still grows the median by about 50 MiB
SOAK_BATCH = 25  # rows per batch, and so per committed file
SOAK_MEDIAN_GROWTH_MIB = 32  # the sampler actor's median RSS, late in the run against early: flat
SOAK_PEAK_GROWTH_MIB = 128  # its late 95th-percentile reading against the early median: transient buffers only


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@pytest.mark.slow
def test_soak_thousands_of_samples_in_one_run_with_flat_actor_memory(ray_cluster, write_config, tmp_path):
    path = write_config(sampling={"method": "unguided", "steps": 1},
                        work={"class_labels": list(range(10)), "samples_per_label": SOAK_SAMPLES // 10},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": SOAK_BATCH},
                        output={"max_rows_per_file": 100, "row_group_size": 50})
    out, log = tmp_path / "out", tmp_path / "driver.log"
    driver = start_driver(path, ray_cluster, log)
    wait_for_commits(driver, out / "data", log, timeout=600)
    readings = []  # (files committed, actor RSS in MiB) while the run goes on
    deadline = time.monotonic() + 1800
    while driver.poll() is None:
        assert time.monotonic() < deadline, "the soak did not finish in time"
        for pid in sampler_pids(os.getpid()):
            try:
                readings.append((len(list((out / "data").rglob(f"{DATA_FILE_PREFIX}*.parquet"))),
                                 psutil.Process(pid).memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.25)
    assert driver.returncode == 0, log.read_text()[-3000:]
    assert_exactly_once(out)
    files = SOAK_SAMPLES // SOAK_BATCH
    early = [rss for done, rss in readings if files * 0.1 <= done < files * 0.3]
    late = [rss for done, rss in readings if done >= files * 0.7]
    assert len(early) >= 5 and len(late) >= 5, f"too few memory readings over the run: {readings}"
    high = float(np.percentile(late, 95))  # a reading or two can catch a batch's transient buffers
    print(f"soak: {SOAK_SAMPLES} samples, {len(readings)} readings; actor RSS median {median(early):.0f} MiB early, "
          f"{median(late):.0f} MiB late, late 95th percentile {high:.0f} MiB, late max {max(late):.0f} MiB")
    assert median(late) - median(early) < SOAK_MEDIAN_GROWTH_MIB, readings
    assert high - median(early) < SOAK_PEAK_GROWTH_MIB, readings


# A real write through pipeline/storage.py, killed part-way by the kernel: with RLIMIT_FSIZE set, the
# write that would pass the limit raises SIGXFSZ, whose default action ends the process on the spot (no
# handler, no cleanup: as a SIGKILL would, but always at byte ``limit``). Python ignores SIGXFSZ, so the
# writer restores the default first; the limits are set after the imports, which may write bytecode.
KILLED_WRITER = """
import resource, signal, sys
import numpy as np
import pyarrow as pa
from pipeline.storage import StorageConfig, resolve, write_table
uri, limit, ids = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
payload = np.random.default_rng(0).bytes(4 * limit)  # incompressible: the file is far past the limit
table = pa.table({"sample_id": ids, "image": [payload[i::len(ids)] for i in range(len(ids))]})
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
write_table(resolve(uri, StorageConfig()), table, row_group_size=len(ids))
"""


def test_what_a_killed_write_leaves_is_never_read_as_data(ray_cluster, write_config, tmp_path):
    """A data file's write killed mid-file, through storage's own atomic write: it leaves only a hidden
    ``.tmp-`` file, which the storage listing, resume, the job's counts and every reader skip."""
    import datasets
    import pyarrow.dataset as pads

    from tests.conftest import cpu_manifest
    from pipeline.sink import part_name
    from pipeline.storage import StorageConfig, list_files, resolve, write_ipc

    path = write_config(work={"class_labels": [3], "samples_per_label": 4})
    data = tmp_path / "out" / "data"
    manifest = cpu_manifest(load_config(path))
    write_ipc(resolve(str(tmp_path / "out" / MANIFEST_FILE), StorageConfig()), manifest.work)  # a run's first file
    ids = manifest.table.column("sample_id").to_pylist()[:2]  # this run's own rows
    target, limit = data / bucket_of(0) / part_name(ids), 256 * 1024  # where the sink writes samples 0 and 1
    writer = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), str(limit), *ids],
                            capture_output=True, text=True, timeout=120)
    assert writer.returncode == -signal.SIGXFSZ, writer.stderr  # killed, not finished nor failed
    (temp,) = target.parent.iterdir()
    assert temp.name.startswith(f"{TEMP_PREFIX}{target.name}-") and temp.stat().st_size == limit
    assert list_files(resolve(str(data), StorageConfig()), ".parquet") == []
    assert pads.dataset(str(data), format="parquet").count_rows() == 0

    summary = run_generation(preflight_generation(load_config(path)))
    assert summary.complete and summary.committed == 4 and summary.generated == 4
    assert_exactly_once(tmp_path / "out")
    assert temp.exists() and temp.stat().st_size == limit  # still there, never read
    assert pads.dataset(str(data), format="parquet").count_rows() == 4  # pyarrow's discovery skips "." names
    loaded = datasets.load_dataset("parquet", data_dir=str(data), split="train")
    assert loaded.num_rows == 4


def test_a_guidance_overflow_is_recorded_or_retried_unguided_when_configured(ray_cluster, write_config, tmp_path,
                                                                             capsys):
    """eta 1e30 without normalisation overflows the guided samples to NaN; unguided they are fine. The summary
    names the error the failures share and suggests no rerun that would fail the same way."""
    overflow = {"method": "jepa", "steps": 3, "guidance": {"eta": 1e30, "normalize": False, "tau": 1.0, "k": 4}}
    path = write_config(sampling=overflow, work={"class_labels": [0, 3], "samples_per_label": 1})
    assert generate_job.main([path]) == 1
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / FAILURES_DIR).rglob("*.json")]
    assert len(records) == 2 and all("NaN or infinite" in r["error"] for r in records)
    error = records[0]["error"].splitlines()[0]
    assert "samples:   0 of 2 committed (0 by this run), 2 failed" in lines
    assert f"failures:  2 of 2 failed with: {error} (every record in _failures/)" in lines
    (status,) = [line for line in lines if line.startswith("status:")]
    assert "would fail the same way" in status and "rerun the same command" not in status

    summary = run_generation(preflight_generation(load_config(path, ["output.retry_unguided=true"])))  # the same run, resumed
    assert summary.complete and summary.generated == 2 and summary.failed == 0
    rows = read_rows(pafs.LocalFileSystem(), str(tmp_path / "out" / "data"))
    assert [r["method"] for r in rows] == ["unguided", "unguided"]
    assert all(np.isfinite(r["jepa_score"]) for r in rows)
    assert not list((tmp_path / "out" / FAILURES_DIR).rglob("*.json"))  # records of committed ids are removed


def test_an_unreachable_endpoint_is_not_blamed_on_credentials_whatever_the_object_is_called():
    """An object name is a hex digest that may hold '403': the network error is named, not the keys."""
    from pipeline.storage import _explain

    unreachable = OSError("When initiating multiple part upload for key 'run/data/train-35c34751ff2403ea.parquet' in "
                          "bucket 'outage': AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation")
    assert _explain(unreachable).startswith("the storage endpoint did not answer")
    refused = OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body.")
    assert _explain(refused).startswith("the credentials were refused")
    assert _explain(OSError("HTTP 403 Forbidden")).startswith("the credentials were refused")
