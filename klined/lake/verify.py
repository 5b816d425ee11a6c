"""Proof that a sealed part is in S3: its upload marker, the checksums, and the re-verification.

A verified upload leaves a sidecar ``<key>.uploaded`` (:class:`UploadMarker`) beside the part,
so a restart does not upload it again. An object counts as ours when its size and every
checksum S3 offers agree (:func:`same_object`: the ETag as MD5 and/or the stored SHA-256).

Verification: every ``lake.verify_interval_s`` (and on ``klined check --lake``) the parts still
on disk that are marked uploaded are compared with S3, by size and MD5 (the listing's ETag of a
single-part upload; HEAD's SHA-256 otherwise), a day folder at a time
(:func:`compare_with_s3`). A part missing there (deleted, lost by the store) is uploaded again
(the uploader forgets its marker and queues it); one with different content is reported and
never overwritten.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import anyio
import msgspec
from loguru import logger

from klined.lake.layout import UPLOADED_SUFFIX
from klined.lake.reader import iter_local_parts
from klined.lake.s3 import LakeStore, describe, is_not_found, plain_md5


class UploadMarker(msgspec.Struct, kw_only=True):
    """Content of a ``<key>.uploaded`` sidecar."""

    bucket: str
    object_key: str
    size: int
    md5: str
    sha256: str
    etag: str = ""
    uploaded_ms: int


class VerifyReport(msgspec.Struct, kw_only=True):
    """What a verification found: parts compared, and the keys missing or different in S3."""

    checked: int = 0
    missing: list[str] = msgspec.field(default_factory=list)  # uploaded again
    different: list[str] = msgspec.field(default_factory=list)  # never overwritten
    error: str = ""


def hash_part(path: Path) -> tuple[bytes, str, str, str]:
    data = path.read_bytes()
    md5 = hashlib.md5(data, usedforsecurity=False)
    sha = hashlib.sha256(data).digest()
    return (
        data,
        md5.hexdigest(),
        base64.b64encode(md5.digest()).decode(),
        base64.b64encode(sha).decode(),
    )


def same_object(head: dict[str, Any], size: int, md5_hex: str, sha_b64: str) -> bool:
    """Whether HEAD describes our bytes: same size and every checksum it offers agrees."""
    if int(head.get("ContentLength", -1)) != size:
        return False
    checks: list[bool] = []
    if head.get("ChecksumSHA256"):
        checks.append(head["ChecksumSHA256"] == sha_b64)
    etag_md5 = plain_md5(head.get("ETag"))
    if etag_md5 is not None:
        checks.append(etag_md5 == md5_hex)
    return bool(checks) and all(checks)


async def head_object(store: LakeStore, s3: Any, object_key: str) -> dict[str, Any] | None:
    try:
        with anyio.fail_after(store.op_timeout_s):
            head: dict[str, Any] = await s3.head_object(
                Bucket=store.s3.bucket, Key=object_key, ChecksumMode="ENABLED"
            )
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise
    return head


def write_marker(path: Path, marker: UploadMarker) -> None:
    final = path.with_name(path.name + UPLOADED_SUFFIX)
    tmp = final.with_name(final.name + ".tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(marker))
        os.replace(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_markers(root: Path, bucket: str) -> dict[str, UploadMarker]:
    """Local parts marked uploaded to this bucket, with what their marker says."""
    decoder = msgspec.json.Decoder(UploadMarker)
    found: dict[str, UploadMarker] = {}
    for part in iter_local_parts(root):
        marker_path = part.path.with_name(part.path.name + UPLOADED_SUFFIX)
        try:
            marker = decoder.decode(marker_path.read_bytes())
        except (OSError, msgspec.DecodeError):
            continue
        if marker.bucket == bucket and marker.size == part.size:
            found[part.key] = marker
    return found


def forget_markers(root: Path, keys: list[str]) -> None:
    for key in keys:
        path = root / key
        path.with_name(path.name + UPLOADED_SUFFIX).unlink(missing_ok=True)


async def compare_with_s3(
    store: LakeStore, markers: dict[str, UploadMarker], report: VerifyReport
) -> list[str]:
    """Compare the marked parts with S3, a day folder at a time; return the keys missing there.

    Parts with different content go to ``report.different`` (and are logged); S3 trouble goes
    to ``report.error``, never raised.
    """
    folders: dict[str, list[str]] = {}
    for key in markers:
        folders.setdefault(key.rsplit("/hour=", 1)[0] + "/", []).append(key)
    missing: list[str] = []
    try:
        async with store.client() as s3:
            for folder, keys in sorted(folders.items()):
                prefix = store.object_key(folder)
                objects = await store.retrying(
                    "S3 listing", functools.partial(store._objects, s3, prefix)
                )
                listed = {o["Key"]: o for o in objects}
                for key in keys:
                    marker = markers[key]
                    obj = listed.get(store.object_key(key))
                    if obj is None:
                        missing.append(key)
                    elif not await _matches(store, s3, obj, marker):
                        report.different.append(key)
    except Exception as exc:
        report.error = describe(exc)
        logger.warning("lake: S3 verification failed: {}", report.error)
    for key in report.different:
        logger.error(
            "lake: s3://{}/{} differs from the local part (size or checksum); not "
            "overwritten: look at it by hand",
            store.s3.bucket,
            store.object_key(key),
        )
    return missing


async def _matches(store: LakeStore, s3: Any, obj: dict[str, Any], marker: UploadMarker) -> bool:
    if int(obj.get("Size", -1)) != marker.size:
        return False
    md5 = plain_md5(obj.get("ETag"))
    if md5 is not None:
        return md5 == marker.md5
    head = await head_object(store, s3, obj["Key"])
    return head is not None and same_object(head, marker.size, marker.md5, marker.sha256)
