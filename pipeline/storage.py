"""Object storage through pyarrow filesystems: local paths, ``file://`` and ``s3://`` URIs.

Writes are atomic: a reader sees a file whole or not at all. On a local disk the bytes go to a
``.``-prefixed (hidden) temporary name that ends in a uuid, which no reader takes for data, and are
renamed into place; on S3 a PUT or a completed multipart upload is already all-or-nothing, and a write that fails midway
aborts its multipart upload (pyarrow's stream leaves it open and cannot abort it: botocore does), so neither a
truncated object nor an upload's stored parts stay behind.
Credentials are never passed in: pyarrow's S3 client reads the standard AWS environment / profile chain.
"""

from __future__ import annotations

import io
import logging
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.settings import UserError

log = logging.getLogger(__name__)
TEMP_PREFIX = ".tmp-"  # hidden: pyarrow, Ray Data, Hugging Face datasets and list_files all skip it


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage. Credentials come only from the AWS environment / profile chain."""

    endpoint_url: str | None = None
    """an S3-protocol endpoint, e.g. http://127.0.0.1:9000 (default: AWS)"""
    region: str | None = None
    """the bucket's region"""

    def __post_init__(self):
        if self.endpoint_url and "@" in urlparse(self.endpoint_url).netloc:
            raise StorageError("storage.endpoint_url carries credentials (user:secret@host), which would be logged "
                               "with the config: give only http(s)://host:port and put the keys in "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile")
        endpoint = urlparse(self.endpoint_url) if self.endpoint_url else None
        if endpoint and (endpoint.scheme not in ("http", "https") or not endpoint.hostname):
            raise StorageError(f"storage.endpoint_url {self.endpoint_url!r} is not an http(s) URL: give "
                               "http(s)://host:port, e.g. http://127.0.0.1:9000, or leave it out for AWS")


class StorageError(UserError, RuntimeError):
    """Storage cannot be reached or used; the message says which location and what to check."""


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: where a run's files live."""

    filesystem: pafs.FileSystem
    path: str  # filesystem path without scheme (bucket/prefix on S3)
    uri: str  # what the user wrote, for messages and lineage
    storage: StorageConfig = StorageConfig()  # how the filesystem was reached (to abort a failed S3 upload)

    def child(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        return Location(self.filesystem, path, "/".join([self.uri.rstrip("/"), *parts]), self.storage)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)


def resolve(uri: str, storage: StorageConfig) -> Location:
    """A Location for a local path, ``file://`` or ``s3://`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        local = Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), str(local), uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri} names no bucket: write s3://BUCKET/prefix")
        return Location(s3_filesystem(storage), f"{parsed.netloc}{parsed.path}".rstrip("/"), uri, storage)
    raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    options: dict = {"region": storage.region} if storage.region else {}
    if storage.endpoint_url:
        endpoint = urlparse(storage.endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise StorageError(f"storage.endpoint_url must look like http(s)://host:port, got {storage.endpoint_url!r}")
        options |= {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme}
    # Fail fast on a dead endpoint instead of retrying for minutes.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=30, retry_strategy=pafs.AwsStandardS3RetryStrategy(3), **options)


def check_reachable(location: Location) -> None:
    """Refuse early, writing nothing, what could not hold the folder: a file in its place, a local parent
    that is not a writable folder; on S3 an endpoint that does not answer, a missing bucket, refused keys."""
    fs, path = location.filesystem, location.path
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise StorageError(f"{location.uri} is a file, not a folder: choose a folder for the output")
        if location.is_local:
            folder = Path(path)
            while not folder.exists():
                folder = folder.parent
            if not folder.is_dir():
                raise StorageError(f"cannot write to {location.uri}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StorageError(f"cannot write to {location.uri}: {folder} is not writable by this user")
            return
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} of {location.uri} does not exist; create it or fix output.uri")
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))  # a listing: the keys must be accepted
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(f"cannot reach {location.uri}: {_explain(error)}") from error


def check_writable(location: Location) -> None:
    """check_reachable, then create the local folder, or write and delete a probe object on S3."""
    check_reachable(location)
    fs, path = location.filesystem, location.path
    try:
        if location.is_local:
            fs.create_dir(path, recursive=True)
            return
        probe = f"{path}/{TEMP_PREFIX}probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(f"cannot write to {location.uri}: {_explain(error)}") from error


CREDENTIAL_ERRORS = re.compile(r"invalidaccesskeyid|invalid_access_key_id|signaturedoesnotmatch|accessdenied|access_denied"
                               r"|\b403\b", re.IGNORECASE)  # a bare 403 only as a word: object names hold hex digests
NETWORK_ERRORS = ("NETWORK_CONNECTION", "Couldn't connect", "Could not connect", "Connection refused", "curlCode", "Timeout")


def _explain(error: OSError) -> str:
    """The S3 client's error in words, with the fix: an endpoint that did not answer, or refused credentials."""
    text = str(error)
    if any(hint in text for hint in NETWORK_ERRORS):
        return f"the storage endpoint did not answer ({text.splitlines()[0]}); check storage.endpoint_url"
    if CREDENTIAL_ERRORS.search(text):
        return f"the credentials were refused ({text.splitlines()[0]}); check AWS_ACCESS_KEY_ID / AWS_PROFILE"
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def clear_errors(action: str, location: Location) -> Iterator[None]:
    """Turn the filesystem's low-level OSError into a StorageError naming the location and the fix."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(f"cannot {action} {location.uri}: {_explain(error)}") from error


def exists(location: Location) -> bool:
    with clear_errors("reach", location):
        return location.filesystem.get_file_info(location.path).type != pafs.FileType.NotFound


def read_bytes(location: Location) -> bytes:
    try:
        with location.filesystem.open_input_stream(location.path) as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise StorageError(f"file not found: {location.uri}") from error
    except OSError as error:
        raise StorageError(f"cannot read {location.uri}: {_explain(error)}") from error


def write_bytes(location: Location, data: bytes) -> None:
    """Write a whole file atomically."""
    fs, path = location.filesystem, location.path
    parent, _, name = path.rpartition("/")
    with clear_errors("write", location):
        if location.is_local:
            fs.create_dir(parent, recursive=True)
            # Ends in the uuid, never in .parquet: duckdb and polars globs would read a leftover temp file.
            temp = f"{parent}/{TEMP_PREFIX}{name}-{uuid.uuid4().hex}"
            try:
                with fs.open_output_stream(temp) as stream:
                    stream.write(data)
                fs.move(temp, path)
            except OSError:
                Path(temp).unlink(missing_ok=True)  # a write that failed here leaves nothing behind
                raise
        else:
            try:
                with fs.open_output_stream(path) as stream:
                    stream.write(data)
            except OSError:
                _abort_uploads(location)
                raise


def commit(target: Location, files: Mapping[str, bytes], marker: tuple[str, bytes]) -> None:
    """Data first, completion marker last: each of ``files`` (name -> bytes) written whole into ``target``, then
    the ``marker`` (name, bytes), so a reader that sees the marker sees every file, and a write that fails
    midway leaves no marker (partial output is never visible as done)."""
    for name, data in files.items():
        write_bytes(target.child(name), data)
    name, data = marker
    write_bytes(target.child(name), data)


def _abort_uploads(location: Location) -> None:
    """Abort the open multipart uploads of this exact key: a failed write's parts, never completed."""
    import botocore.exceptions
    import botocore.session

    bucket, key = location.path.split("/", 1)
    try:
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=location.storage.endpoint_url, region_name=location.storage.region)
        listing = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
        for upload in listing.get("Uploads", []):
            if upload["Key"] == key:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        log.warning("could not abort the failed upload of %s (%s): a bucket lifecycle rule "
                    "(AbortIncompleteMultipartUpload) clears its parts", location.uri, error)


def write_table(location: Location, table: pa.Table, row_group_size: int) -> None:
    """Write a Parquet file atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    write_bytes(location, buffer.getvalue())


def write_ipc(location: Location, table: pa.Table) -> None:
    """Write an Arrow IPC file atomically, zstd-compressed."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    write_bytes(location, sink.getvalue().to_pybytes())


def read_ipc_schema(location: Location) -> pa.Schema:
    """The schema (with its metadata) of an Arrow IPC file."""
    return pa.ipc.open_file(pa.BufferReader(read_bytes(location))).schema


def list_files(location: Location, suffix: str, modified_since: datetime | None = None) -> list[Location]:
    """Committed files in a folder and the folders below it, sorted by path; what lies under a ``_`` / ``.`` name
    (temporary files, bookkeeping) is skipped, as pyarrow's readers skip it. With ``modified_since``, only those
    written since then (by the store's clock)."""
    selector = pafs.FileSelector(location.path, allow_not_found=True, recursive=True)
    with clear_errors("list", location):
        infos = location.filesystem.get_file_info(selector)
    root = location.path.rstrip("/") + "/"
    names = []
    for info in infos:
        name = info.path.removeprefix(root)
        hidden = any(part[0] in "_." for part in name.split("/"))
        if (info.type == pafs.FileType.File and name.endswith(suffix) and not hidden
                and (modified_since is None or info.mtime >= modified_since)):
            names.append(name)
    return [location.child(name) for name in sorted(names)]


def delete(location: Location) -> None:
    with clear_errors("delete", location):
        location.filesystem.delete_file(location.path)
