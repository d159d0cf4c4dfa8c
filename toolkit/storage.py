"""Where a run writes: a local folder or an object-store prefix (``s3://bucket/prefix``, and any other
URI pyarrow's filesystems open), checked before training and written through one filesystem API.

S3 endpoints and credentials come the way AWS tools take them: ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` (MinIO, Ceph, a local moto server), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
/``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, or an explicit ``endpoint``. They are
resolved once, on the driver, into a filesystem object that Ray pickles to every worker, so workers
on other machines reach the same endpoint without their own configuration.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

from toolkit.errors import one_line


class StorageError(Exception):
    """A storage location that cannot be used, in one line."""


def is_uri(path: Optional[str]) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (those are local folders)."""
    return bool(path) and "://" in path and not path.startswith("file://")


def s3_endpoint(explicit: Optional[str] = None) -> Optional[str]:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str, endpoint: Optional[str] = None):
    """``(pyarrow filesystem, path inside it)`` for ``uri``. S3 gets short timeouts, so that an
    unreachable endpoint is reported in seconds, not after minutes of retries."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        env = os.environ
        kwargs = dict(
            endpoint_override=s3_endpoint(endpoint),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            connect_timeout=10.0, request_timeout=60.0,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            # Explicit keys travel with the pickled filesystem to workers on other nodes.
            kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                          session_token=env.get("AWS_SESSION_TOKEN") or None)
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise StorageError(f"{uri}: no bucket named")
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None}), path
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:
        raise StorageError(f"{uri}: {one_line(e, typed=False)}") from None


def open_location(location: str, endpoint: Optional[str] = None):
    """``(pyarrow filesystem, path inside it)`` for a local folder or a URI: the one opener of both."""
    import pyarrow.fs as pafs

    if is_uri(location):
        return filesystem(location, endpoint)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def check_local_folder(path: str) -> Optional[str]:
    """Why the local folder ``path`` cannot receive files (None if it can). Writes and removes a probe
    file in the nearest existing folder: permission bits say nothing about read-only filesystems."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return "exists and is not a folder"
    probe = p
    while not probe.exists():  # the nearest existing parent must be a writable folder
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    test = probe / f".write-probe-{secrets.token_hex(4)}"
    try:
        test.write_bytes(b"")
        test.unlink()
    except OSError as e:
        return f"{probe} is not writable ({e.strerror or e})"
    return None


def check_writable(location: str, endpoint: Optional[str] = None) -> Optional[str]:
    """Why ``location`` (a local folder or a URI) cannot receive the run's files, or None. For object
    stores it writes and deletes a probe object: the only check that covers a missing bucket, wrong
    credentials, a read-only policy and an endpoint that does not answer alike."""
    if not is_uri(location):
        return check_local_folder(location[len("file://"):] if location.startswith("file://") else location)
    try:
        fs, path = filesystem(location, endpoint)
        probe = f"{path.rstrip('/')}/.write-probe-{secrets.token_hex(4)}"
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except StorageError as e:
        return str(e).split(": ", 1)[-1]
    except Exception as e:  # pyarrow raises OSError, ValueError, or its own ArrowException
        return one_line(e, typed=False)
    return None


def upload_folder(local: str, location: str, endpoint: Optional[str] = None, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under ``local`` to ``location``; the files named in ``last`` go after all
    others, so a reader that waits for them never sees a half-uploaded folder. Returns the keys."""
    fs, base = filesystem(location, endpoint)
    files = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda name: name in last)
    written = []
    for name in files:
        key = f"{base.rstrip('/')}/{name}"
        with open(os.path.join(local, name), "rb") as src, fs.open_output_stream(key) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        written.append(key)
    return written


def has_checkpoint(storage: str, name: str, endpoint: Optional[str] = None) -> bool:
    """Whether run ``name`` under ``storage`` (Ray Train's storage path) holds a checkpoint folder."""
    import pyarrow.fs as pafs

    try:
        fs, base = open_location(storage, endpoint)
        infos = fs.get_file_info(pafs.FileSelector(f"{base.rstrip('/')}/{name}", allow_not_found=True))
    except Exception:
        return False
    return any(i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos)
