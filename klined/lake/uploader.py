"""Mirroring sealed parts to S3: idempotent, verified, patient through outages.

Verification: every ``lake.verify_interval_s`` (and on ``klined check --lake``) the parts still
on disk that are marked uploaded are compared with S3, by size and MD5 (the listing's ETag of a
single-part upload; HEAD's SHA-256 otherwise), a day folder at a time. A part missing there
(deleted, lost by the store) is uploaded again; one with different content is reported and
never overwritten.

Each sealed part is uploaded once to ``s3://<bucket>/<prefix>/<key>`` and verified (size, and
the ETag as MD5 and/or the stored SHA-256 checksum); then a sidecar ``<key>.uploaded`` records
the verified upload so a restart does not upload it again. A key that already holds identical
content counts as uploaded ("already present"); different content is never overwritten. While
S3 is unreachable parts simply stay on disk and the uploader retries with capped, jittered
backoff; it never dies because S3 is down. Local parts are deleted ``retention_hours`` after
their verified upload, never before, and never in local-only mode.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from klined.config import LakeConfig, S3Config
from klined.errors import LakeError
from klined.lake.layout import GZ_SUFFIX, UPLOADED_SUFFIX, parse_key
from klined.lake.reader import iter_local_parts
from klined.lake.s3 import LakeStore, backoff_delay, describe, is_not_found, plain_md5
from klined.lake.writer import wall_ms
from klined.model import HOUR_MS, iso
from klined.status import LakeStatus

ERROR_LOG_INTERVAL_S = 60.0


class UploadReport(msgspec.Struct, kw_only=True):
    """What an upload call did. ``failed`` lists keys still not uploaded."""

    enabled: bool = True
    parts: int = 0
    uploaded: int = 0
    already_present: int = 0
    bytes_uploaded: int = 0
    failed: list[str] = msgspec.field(default_factory=list)
    error: str = ""


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


class _Pending(msgspec.Struct):
    size: int
    hour_ms: int


def _hash(path: Path) -> tuple[bytes, str, str, str]:
    data = path.read_bytes()
    md5 = hashlib.md5(data, usedforsecurity=False)
    sha = hashlib.sha256(data).digest()
    return (
        data,
        md5.hexdigest(),
        base64.b64encode(md5.digest()).decode(),
        base64.b64encode(sha).decode(),
    )


def _same_object(head: dict[str, Any], size: int, md5_hex: str, sha_b64: str) -> bool:
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


class LakeUploader(LakeStore):
    """Uploads sealed parts to S3 and applies local retention. A no-op without a bucket.

    Run :meth:`run` in the daemon's task group and pass :meth:`part_closed` to the writer as
    ``on_part_closed``. The chain's flush step calls :meth:`upload_pending` for its hour.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        lake: LakeConfig,
        s3: S3Config | None = None,
        *,
        status: LakeStatus | None = None,
        clock: Callable[[], int] = wall_ms,
        concurrency: int = 4,
        rescan_interval_s: float = 3600.0,
        **store_options: Any,
    ) -> None:
        super().__init__(root, s3, **store_options)
        self.lake = lake
        self._status = status
        self._clock = clock
        self._concurrency = concurrency
        self._rescan_interval_s = rescan_interval_s
        self._pending: dict[str, _Pending] = {}
        self._uploaded: dict[str, int] = {}  # key -> uploaded_ms (parts still on disk)
        self._markers_missing: dict[str, UploadMarker] = {}  # uploaded, marker not written
        self._marker_logged_at = -ERROR_LOG_INTERVAL_S
        self._lock = anyio.Lock()
        self._nudge = anyio.Event()
        self.uploaded_count = 0
        self.last_error = ""
        self._error_logged_at = 0.0
        self._update_status()

    # -- bookkeeping ----------------------------------------------------------------------------

    @property
    def pending(self) -> list[str]:
        """Keys of sealed parts known to be waiting for upload."""
        return sorted(self._pending)

    def _update_status(self) -> None:
        if self._status is None:
            return
        self._status.s3_enabled = self.enabled
        self._status.pending_upload_parts = len(self._pending)
        self._status.pending_upload_bytes = sum(p.size for p in self._pending.values())
        self._status.uploaded_parts = self.uploaded_count
        self._status.last_upload_error = self.last_error

    def _record_error(self, error: str) -> None:
        """Remember the failure; log when failing starts and then once a minute at most."""
        now = time.monotonic()
        if not self.last_error or now - self._error_logged_at >= ERROR_LOG_INTERVAL_S:
            logger.warning(
                "lake: S3 upload failing ({} part(s) waiting): {}", len(self._pending), error
            )
            self._error_logged_at = now
        self.last_error = error
        self._update_status()

    def _record_success(self) -> None:
        if self.last_error:
            logger.info("lake: S3 uploads work again")
        self.last_error = ""
        self._update_status()

    def part_closed(self, key: str, size: int) -> None:
        """The writer sealed a part: queue it and wake the upload loop. Never raises."""
        if not self.enabled:
            return
        try:
            hour_ms = parse_key(key).hour_ms
        except ValueError:
            logger.error("lake: not uploading foreign key {}", key)
            return
        if key not in self._uploaded:
            self._pending[key] = _Pending(size, hour_ms)
            self._nudge.set()
            self._update_status()

    def _scan(self, hour_ms: int | None) -> tuple[dict[str, _Pending], dict[str, int]]:
        """Local sealed parts (of one hour, or all) split into pending and uploaded."""
        pending: dict[str, _Pending] = {}
        uploaded: dict[str, int] = {}
        decoder = msgspec.json.Decoder(UploadMarker)
        for part in iter_local_parts(self.root, hour_ms=hour_ms):
            try:
                pk = parse_key(part.key)
            except ValueError:
                continue
            marker_path = part.path.with_name(part.path.name + UPLOADED_SUFFIX)
            try:
                marker = decoder.decode(marker_path.read_bytes())
            except FileNotFoundError:
                marker = None
            except (OSError, msgspec.DecodeError):
                marker = None  # unreadable marker: HEAD will tell whether it is there
            if (
                marker is not None
                and marker.bucket == self.s3.bucket
                and marker.object_key == self.object_key(part.key)
                and marker.size == part.size
            ):
                uploaded[part.key] = marker.uploaded_ms
            else:
                pending[part.key] = _Pending(part.size, pk.hour_ms)
        return pending, uploaded

    async def rescan(self, hour_ms: int | None = None) -> None:
        """Pick up sealed parts from disk (all, or one hour's) that are not queued yet."""
        pending, uploaded = await anyio.to_thread.run_sync(self._scan, hour_ms)
        self._uploaded.update(uploaded)
        for key, item in pending.items():
            if key not in self._uploaded:
                self._pending[key] = item
        self._update_status()

    # -- uploading ------------------------------------------------------------------------------

    async def _head(self, s3: Any, object_key: str) -> dict[str, Any] | None:
        try:
            with anyio.fail_after(self.op_timeout_s):
                head: dict[str, Any] = await s3.head_object(
                    Bucket=self.s3.bucket, Key=object_key, ChecksumMode="ENABLED"
                )
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        return head

    async def _upload_one(self, s3: Any, key: str) -> tuple[str, int]:
        """Upload and verify one part; ``("uploaded"|"already"|"gone", bytes)``."""
        path = self.root / key
        try:
            data, md5_hex, md5_b64, sha_b64 = await anyio.to_thread.run_sync(_hash, path)
        except FileNotFoundError:
            return "gone", 0
        object_key = self.object_key(key)
        outcome, head = await self._put_verified(s3, object_key, data, md5_hex, md5_b64, sha_b64)
        marker = UploadMarker(
            bucket=self.s3.bucket,
            object_key=object_key,
            size=len(data),
            md5=md5_hex,
            sha256=sha_b64,
            etag=str(head.get("ETag", "")).strip('"'),
            uploaded_ms=self._clock(),
        )
        try:
            await anyio.to_thread.run_sync(self._write_marker, path, marker)
        except OSError as exc:
            # the upload is done and verified; the marker only spares a HEAD after a restart.
            # A full disk must not stop uploads: remember it and write it when the disk lets us
            self._note_marker_failure(key, exc)
            self._markers_missing[key] = marker
        else:
            self._markers_missing.pop(key, None)
        return outcome, len(data)

    async def _put_verified(
        self, s3: Any, object_key: str, data: bytes, md5_hex: str, md5_b64: str, sha_b64: str
    ) -> tuple[str, dict[str, Any]]:
        """PUT unless identical content is there already, then verify; ``("uploaded" |
        "already", head)``. Different content under the key is never overwritten."""
        head = await self._head(s3, object_key)
        if head is not None:
            if not _same_object(head, len(data), md5_hex, sha_b64):
                raise LakeError(
                    f"s3://{self.s3.bucket}/{object_key} exists with different content; "
                    "not overwritten"
                )
            return "already", head
        with anyio.fail_after(self.op_timeout_s):
            await s3.put_object(
                Bucket=self.s3.bucket,
                Key=object_key,
                Body=data,
                ContentMD5=md5_b64,
                ChecksumSHA256=sha_b64,
                ChecksumAlgorithm="SHA256",
                # the object is the part as stored: no Content-Encoding, so no client unzips
                # it on the way and every checksum is of these very bytes
                ContentType="application/gzip"
                if object_key.endswith(GZ_SUFFIX)
                else "application/x-ndjson",
            )
        head = await self._head(s3, object_key)
        if head is None or not _same_object(head, len(data), md5_hex, sha_b64):
            raise LakeError(f"s3://{self.s3.bucket}/{object_key} failed verification")
        return "uploaded", head

    async def upload_from_memory(self, key: str, data: bytes) -> None:
        """Upload a part that exists only in memory (the disk refused it), verified, with a
        few quick retries; :class:`LakeError` when it cannot be done."""
        if not self.enabled:
            raise LakeError("no S3 bucket configured")
        md5 = hashlib.md5(data, usedforsecurity=False)
        md5_b64 = base64.b64encode(md5.digest()).decode()
        sha_b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()

        async def put() -> None:
            async with self.client() as s3:
                await self._put_verified(
                    s3, self.object_key(key), data, md5.hexdigest(), md5_b64, sha_b64
                )

        await self.retrying(f"upload of {key} from memory", put)

    def _note_marker_failure(self, key: str, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._marker_logged_at >= ERROR_LOG_INTERVAL_S:
            self._marker_logged_at = now
            logger.warning(
                "lake: uploaded {} but cannot write its marker ({}); uploads go on, the "
                "markers are written once the disk allows ({} waiting)",
                key,
                exc,
                len(self._markers_missing) + 1,
            )

    async def write_missing_markers(self) -> int:
        """Write the markers a full disk refused earlier; return how many are still missing."""
        for key, marker in list(self._markers_missing.items()):
            path = self.root / key
            if not path.exists():
                self._markers_missing.pop(key, None)
                continue
            try:
                await anyio.to_thread.run_sync(self._write_marker, path, marker)
            except OSError:
                break
            self._markers_missing.pop(key, None)
        return len(self._markers_missing)

    @staticmethod
    def _write_marker(path: Path, marker: UploadMarker) -> None:
        final = path.with_name(path.name + UPLOADED_SUFFIX)
        tmp = final.with_name(final.name + ".tmp")
        try:
            tmp.write_bytes(msgspec.json.encode(marker))
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    async def _upload_keys(self, keys: list[str], *, stop_on_error: bool) -> UploadReport:
        """Upload ``keys`` with bounded concurrency; failures are reported, not raised."""
        report = UploadReport(parts=len(keys))
        if not keys:
            return report
        limiter = anyio.CapacityLimiter(self._concurrency)
        abort = False

        async def one(s3: Any, key: str) -> None:
            nonlocal abort
            async with limiter:
                if abort:
                    report.failed.append(key)
                    return
                try:
                    outcome, size = await self._upload_one(s3, key)
                except Exception as exc:
                    report.failed.append(key)
                    report.error = f"{key}: {describe(exc)}"
                    abort = abort or stop_on_error
                    return
            self._pending.pop(key, None)
            if outcome == "gone" or key in self._uploaded:
                return
            self._uploaded[key] = self._clock()
            self.uploaded_count += 1
            if outcome == "uploaded":
                report.uploaded += 1
                report.bytes_uploaded += size
            else:
                report.already_present += 1
                logger.info("lake: {} was already in S3 with identical content", key)
            self._update_status()

        try:
            async with self.client() as s3, anyio.create_task_group() as tg:
                for key in keys:
                    tg.start_soon(one, s3, key)
        except Exception as exc:  # the client itself could not be made
            report.failed = [k for k in keys if k in self._pending]
            report.error = describe(exc)
        return report

    async def _pass(self) -> bool:
        """One round over everything pending; False if anything failed."""
        async with self._lock:
            keys = sorted(self._pending)
            if not keys:
                return True
            report = await self._upload_keys(keys, stop_on_error=True)
        if report.failed:
            self._record_error(report.error or "upload failed")
            return False
        if report.uploaded:
            logger.info(
                "lake: uploaded {} part(s), {} bytes", report.uploaded, report.bytes_uploaded
            )
        self._record_success()
        return True

    async def upload_pending(self, hour_ms: int | None = None) -> UploadReport:
        """Make sure every sealed local part (of the hour, or all) is in S3, verified.

        Retries with backoff; raises :class:`LakeError` if a part still cannot be uploaded.
        Without a bucket it does nothing (``enabled=False``).
        """
        if not self.enabled:
            return UploadReport(enabled=False)
        await self.write_missing_markers()
        await self.rescan(hour_ms)
        keys = [k for k, p in self._pending.items() if hour_ms is None or p.hour_ms == hour_ms]
        what = "all hours" if hour_ms is None else f"hour {iso(hour_ms)}"
        return await self._upload_with_retries(keys, what)

    async def upload(self, parts: list[tuple[str, int]]) -> UploadReport:
        """Upload these sealed local parts (``(key, size)``) now, verified, with retries;
        :class:`LakeError` if one still fails (it stays queued for the upload loop). Without a
        bucket it does nothing."""
        if not self.enabled:
            return UploadReport(enabled=False)
        for key, size in parts:
            self.part_closed(key, size)
        return await self._upload_with_retries([k for k, _ in parts], f"{len(parts)} part(s)")

    async def _upload_with_retries(self, keys: list[str], what: str) -> UploadReport:
        total = UploadReport(parts=len(keys))
        for attempt in range(self.attempts):
            async with self._lock:
                # filtered under the lock: the loop's own pass may have just uploaded some
                keys = [k for k in keys if k in self._pending]
                if not keys:
                    break
                report = await self._upload_keys(sorted(keys), stop_on_error=False)
            total.uploaded += report.uploaded
            total.already_present += report.already_present
            total.bytes_uploaded += report.bytes_uploaded
            total.error = report.error
            keys = report.failed
            if keys and attempt + 1 < self.attempts:
                await anyio.sleep(
                    backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s)
                )
        total.failed = sorted(k for k in keys if k in self._pending)
        if total.failed:
            self._record_error(total.error)
            raise LakeError(
                f"{len(total.failed)} of {total.parts} part(s) of {what} could not be uploaded "
                f"to s3://{self.s3.bucket}: {total.error}"
            )
        return total

    # -- verification ---------------------------------------------------------------------------

    def _markers(self) -> dict[str, UploadMarker]:
        """Local parts marked uploaded to this bucket, with what their marker says."""
        decoder = msgspec.json.Decoder(UploadMarker)
        found: dict[str, UploadMarker] = {}
        for part in iter_local_parts(self.root):
            marker_path = part.path.with_name(part.path.name + UPLOADED_SUFFIX)
            try:
                marker = decoder.decode(marker_path.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue
            if marker.bucket == self.s3.bucket and marker.size == part.size:
                found[part.key] = marker
        return found

    async def verify(self) -> VerifyReport:
        """Compare the local parts marked uploaded with S3; upload the missing ones again.

        Never raises for S3 trouble: the report's ``error`` says what went wrong.
        """
        report = VerifyReport()
        if not self.enabled:
            return report
        markers = await anyio.to_thread.run_sync(self._markers)
        report.checked = len(markers)
        folders: dict[str, list[str]] = {}
        for key in markers:
            folders.setdefault(key.rsplit("/hour=", 1)[0] + "/", []).append(key)
        missing: list[str] = []
        try:
            async with self.client() as s3:
                for folder, keys in sorted(folders.items()):
                    prefix = self.object_key(folder)
                    objects = await self.retrying(
                        "S3 listing", functools.partial(self._objects, s3, prefix)
                    )
                    listed = {o["Key"]: o for o in objects}
                    for key in keys:
                        marker = markers[key]
                        obj = listed.get(self.object_key(key))
                        if obj is None:
                            missing.append(key)
                        elif not await self._matches(s3, obj, marker):
                            report.different.append(key)
        except Exception as exc:
            report.error = describe(exc)
            logger.warning("lake: S3 verification failed: {}", report.error)
        for key in report.different:
            logger.error(
                "lake: s3://{}/{} differs from the local part (size or checksum); not "
                "overwritten: look at it by hand",
                self.s3.bucket,
                self.object_key(key),
            )
        if missing:
            await anyio.to_thread.run_sync(self._forget_markers, missing)
            for key in missing:
                self._uploaded.pop(key, None)
                try:
                    size = (self.root / key).stat().st_size
                except OSError:
                    continue
                self._pending[key] = _Pending(size, parse_key(key).hour_ms)
                report.missing.append(key)
            logger.error(
                "lake: {} part(s) marked uploaded are missing in s3://{}; uploading them again",
                len(report.missing),
                self.s3.bucket,
            )
            self._nudge.set()
            self._update_status()
        return report

    async def _matches(self, s3: Any, obj: dict[str, Any], marker: UploadMarker) -> bool:
        if int(obj.get("Size", -1)) != marker.size:
            return False
        md5 = plain_md5(obj.get("ETag"))
        if md5 is not None:
            return md5 == marker.md5
        head = await self._head(s3, obj["Key"])
        return head is not None and _same_object(head, marker.size, marker.md5, marker.sha256)

    def _forget_markers(self, keys: list[str]) -> None:
        for key in keys:
            path = self.root / key
            path.with_name(path.name + UPLOADED_SUFFIX).unlink(missing_ok=True)

    # -- retention ------------------------------------------------------------------------------

    def _delete_local(self, keys: list[str]) -> list[str]:
        deleted: list[str] = []
        for key in keys:
            path = self.root / key
            try:
                # the marker goes first: a crash in between leaves a part that HEAD re-verifies
                path.with_name(path.name + UPLOADED_SUFFIX).unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("lake: cannot delete {}: {}", key, exc)
                continue
            deleted.append(key)
            folder = path.parent
            while folder != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent
        return deleted

    async def apply_retention(self) -> int:
        """Delete local parts uploaded ``retention_hours`` ago or more; return how many."""
        if not self.enabled:
            return 0
        limit = self._clock() - int(self.lake.retention_hours * HOUR_MS)
        due = [k for k, at in self._uploaded.items() if at <= limit]
        if not due:
            return 0
        deleted = await anyio.to_thread.run_sync(self._delete_local, due)
        for key in deleted:
            self._uploaded.pop(key, None)
        if deleted:
            logger.info("lake: retention removed {} local part(s)", len(deleted))
        return len(deleted)

    # -- loop -----------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Scan the spool, then upload and apply retention every ``upload_interval_s``.

        Woken early when a part is sealed; after a failure it backs off (capped, jittered).
        """
        self._update_status()
        if not self.enabled:
            task_status.started()
            await anyio.sleep_forever()
        await self._guarded(self.rescan())
        task_status.started()
        failures = 0
        last_rescan = last_verify = time.monotonic()
        while True:
            if time.monotonic() - last_rescan >= self._rescan_interval_s:
                await self._guarded(self.rescan())
                last_rescan = time.monotonic()
            every = self.lake.verify_interval_s
            if every and time.monotonic() - last_verify >= every:
                await self._guarded(self.verify())
                last_verify = time.monotonic()
            ok = await self._guarded(self._pass())
            if self._markers_missing:
                await self._guarded(self.write_missing_markers())
            await self._guarded(self.apply_retention())
            if ok:
                failures = 0
                with anyio.move_on_after(self.lake.upload_interval_s):
                    await self._nudge.wait()
            else:
                failures += 1
                await anyio.sleep(
                    backoff_delay(failures - 1, self.backoff_initial_s, self.backoff_max_s)
                )
            self._nudge = anyio.Event()

    async def _guarded(self, step: Any) -> Any:
        """Run a loop step; an unexpected error is logged and recorded, never fatal."""
        try:
            return await step
        except Exception as exc:
            logger.exception("lake: uploader step failed")
            self._record_error(describe(exc))
            return False
