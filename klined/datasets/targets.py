"""Where dataset files go: a local folder or an S3 prefix, each file replaced whole.

A file is always written complete somewhere readers do not look, then put in place in one
step, so a reader sees the old file or the new one, never a part of either:

* **local**: ``<dir>/.candles.parquet.<random>.tmp`` beside the file (readers skip names that
  start with a dot, and the name does not end in the format's suffix), made durable, then
  renamed over ``candles.parquet`` (``rename(2)`` is atomic) and the rename made durable;
* **S3**: a local temporary file, uploaded under the final key (a PUT, or a multipart upload
  completed in one request: either way the new object appears whole, and S3 reads are
  strongly consistent), checked by size, then the temporary file removed.

Manifests (``_manifest.json``: Hive, Spark, Athena and pyarrow skip names starting with ``_``)
are written the same way, after the files they describe.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec

from klined.config import S3Config
from klined.errors import DatasetError, LakeError
from klined.lake.compress import fsync_dir
from klined.lake.s3 import LakeStore, describe, is_not_found

MANIFEST = "_manifest.json"
LOCK = ".klined-export.lock"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DatasetError(f"{uri!r} names no bucket; write s3://bucket/prefix")
    return bucket, prefix.strip("/")


class LocalTarget:
    """A folder on this machine."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def scratch(self, rel: str) -> Path:
        """A temporary file beside ``rel``, for :meth:`install`."""
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")

    def _install(self, rel: str, tmp: Path) -> None:
        final = self.root / rel
        _sync(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    async def install(self, rel: str, tmp: Path) -> None:
        """Put a finished scratch file in place of ``rel`` (atomic, durable)."""
        await anyio.to_thread.run_sync(self._install, rel, tmp)

    async def remove(self, rel: str) -> None:
        await anyio.to_thread.run_sync(lambda: (self.root / rel).unlink(missing_ok=True))

    async def read_bytes(self, rel: str) -> bytes | None:
        try:
            return await anyio.Path(self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    async def write_bytes(self, rel: str, data: bytes) -> None:
        tmp = self.scratch(rel)
        await anyio.Path(tmp).write_bytes(data)
        await self.install(rel, tmp)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time in this folder (a second export fails at once, clearly)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise DatasetError(
                    f"another klined export is writing to {self.root}; wait for it to finish"
                ) from None
            yield
        finally:
            os.close(fd)


class S3Target:
    """A prefix in an S3 bucket (any S3-compatible endpoint), reached with the lake's client
    settings: credentials from the standard AWS chain, endpoint and region from ``[s3]``."""

    #: files up to this size go up in one PUT with their SHA-256 checked by S3
    PUT_MAX = 64 << 20

    def __init__(self, bucket: str, prefix: str, s3: S3Config, scratch_dir: Path) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = S3Config(
            bucket=bucket, prefix=self.prefix, endpoint_url=s3.endpoint_url, region=s3.region
        )
        self.store = LakeStore(scratch_dir, config)
        self.scratch_dir = scratch_dir

    def key(self, rel: str) -> str:
        return self.store.object_key(rel)

    def describe(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(rel)}" if rel else f"s3://{self.bucket}/{self.prefix}"

    def scratch(self, rel: str) -> Path:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".klined-", suffix=".tmp", dir=self.scratch_dir)
        os.close(fd)
        return Path(name)

    async def _put(self, rel: str, path: Path, content_type: str) -> None:
        key = self.key(rel)
        size = (await anyio.Path(path).stat()).st_size

        async def upload() -> None:
            async with self.store.client() as s3:
                if size <= self.PUT_MAX:
                    data = await anyio.Path(path).read_bytes()
                    await s3.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=data,
                        ContentType=content_type,
                        ChecksumAlgorithm="SHA256",
                    )
                else:
                    await s3.upload_file(
                        str(path), self.bucket, key, ExtraArgs={"ContentType": content_type}
                    )
                head: dict[str, Any] = await s3.head_object(Bucket=self.bucket, Key=key)
            if int(head.get("ContentLength", -1)) != size:
                raise LakeError(f"s3://{self.bucket}/{key} has the wrong size after upload")

        try:
            await self.store.retrying(f"upload of s3://{self.bucket}/{key}", upload)
        except LakeError as exc:
            raise DatasetError(str(exc)) from exc

    async def install(self, rel: str, tmp: Path) -> None:
        try:
            await self._put(rel, tmp, _content_type(rel))
        finally:
            await anyio.Path(tmp).unlink(missing_ok=True)

    async def mirror(self, rel: str, path: Path) -> str:
        """Upload a local file (left in place) under ``rel``; its object key."""
        await self._put(rel, path, _content_type(rel))
        return self.key(rel)

    async def remove(self, rel: str) -> None:
        key = self.key(rel)

        async def delete() -> None:
            async with self.store.client() as s3:
                await s3.delete_object(Bucket=self.bucket, Key=key)

        try:
            await self.store.retrying(f"delete of s3://{self.bucket}/{key}", delete)
        except LakeError as exc:
            raise DatasetError(str(exc)) from exc

    async def read_bytes(self, rel: str) -> bytes | None:
        key = self.key(rel)

        async def get() -> bytes | None:
            async with self.store.client() as s3:
                try:
                    response = await s3.get_object(Bucket=self.bucket, Key=key)
                except Exception as exc:
                    if is_not_found(exc):
                        return None
                    raise
                async with response["Body"] as body:
                    data: bytes = await body.read()
            return data

        try:
            return await self.store.retrying(f"read of s3://{self.bucket}/{key}", get)
        except LakeError as exc:
            raise DatasetError(f"cannot read s3://{self.bucket}/{key}: {describe(exc)}") from exc

    async def write_bytes(self, rel: str, data: bytes) -> None:
        tmp = self.scratch(rel)
        await anyio.Path(tmp).write_bytes(data)
        await self.install(rel, tmp)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """S3 has no locks: two exports to one prefix at once are the user's to avoid."""
        yield


Target = LocalTarget | S3Target


def _content_type(rel: str) -> str:
    if rel.endswith(".parquet"):
        return "application/vnd.apache.parquet"
    if rel.endswith(".csv"):
        return "text/csv"
    if rel.endswith(".jsonl"):
        return "application/x-ndjson"
    return "application/json"


def target_for(out: str, s3: S3Config, scratch_dir: Path | None = None) -> Target:
    """``s3://bucket/prefix`` or a local folder."""
    if out.startswith("s3://"):
        bucket, prefix = split_s3_uri(out)
        scratch = scratch_dir or Path(tempfile.gettempdir()) / "klined-export"
        return S3Target(bucket, prefix, s3, scratch)
    return LocalTarget(Path(out).expanduser())


def decode_json(data: bytes | None, what: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise DatasetError(f"{what} is not valid JSON ({exc}); move it away or fix it") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{what} is not a klined manifest")
    return value
