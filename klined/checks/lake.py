"""The lake's rows of ``klined check``: the S3 bucket, the local lake root, and whether the
local parts are in S3."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

import anyio

from klined.checks.result import CheckResult, Outcome
from klined.config import Config

#: below this much free space on the lake's file system the lake row WARNs
LOW_DISK_BYTES = 1024**3
#: where the S3 probe object goes, under the configured prefix
S3_PROBE_DIR = "_klined_check"


# -- S3 ---------------------------------------------------------------------------------------


def _s3_reason(exc: BaseException, cfg: Config) -> str:
    """Missing bucket, access denied, bad credentials, unreachable endpoint: said plainly."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    from klined.lake.s3 import describe

    endpoint = cfg.s3.endpoint_url or f"AWS S3 in {cfg.s3.region}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code == "NoSuchBucket":
            return f"bucket {cfg.s3.bucket!r} does not exist ({endpoint})"
        if code in ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem"):
            return (
                f"access denied on bucket {cfg.s3.bucket!r} ({code}): the credentials need "
                "s3:PutObject, s3:GetObject and s3:ListBucket on it"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return f"credentials rejected ({code}): check the AWS credentials klined runs with"
        if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
            return f"wrong region for bucket {cfg.s3.bucket!r} ({code}): set s3.region"
        return f"{code or 'error'}: {error.get('Message') or describe(exc)}"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "no AWS credentials found (environment, AWS profile or instance role)"
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return f"endpoint unreachable: {endpoint}"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return f"endpoint did not answer in time: {endpoint}"
    if isinstance(exc, OSError):
        return f"endpoint unreachable: {endpoint} ({exc.strerror or exc})"
    return describe(exc)


async def check_s3(cfg: Config) -> CheckResult:
    """Write, list, read and delete a small probe object under the prefix."""
    if not cfg.s3.bucket:
        return CheckResult("s3", Outcome.SKIP, "no bucket configured (the lake is local only)")
    from klined.lake.s3 import LakeStore

    store = LakeStore(
        cfg.lake_root, cfg.s3, op_timeout_s=15.0, connect_timeout_s=5.0, read_timeout_s=10.0
    )
    key = store.object_key(f"{S3_PROBE_DIR}/{uuid.uuid4().hex}")
    url = f"s3://{cfg.s3.bucket}/{key}"
    body = f"klined check {time.time():.3f}\n".encode()
    bucket = cfg.s3.bucket
    step = "write"
    written = False
    try:
        async with store.client() as s3:
            try:
                await s3.put_object(Bucket=bucket, Key=key, Body=body)
                written = True
                step = "list"
                listed = await s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
                if not any(o.get("Key") == key for o in listed.get("Contents", [])):
                    return CheckResult("s3", Outcome.FAIL, f"list: the probe {url} is not listed")
                step = "read"
                response = await s3.get_object(Bucket=bucket, Key=key)
                async with response["Body"] as stream:
                    back = await stream.read()
                if back != body:
                    return CheckResult("s3", Outcome.FAIL, f"read: {url} came back different")
                step = "delete"
                await s3.delete_object(Bucket=bucket, Key=key)
                written = False
            finally:
                if written and step != "delete":
                    # cleanup after a failed step: the row already says what failed
                    with (
                        anyio.CancelScope(shield=True),
                        anyio.move_on_after(5),
                        contextlib.suppress(Exception),
                    ):
                        await s3.delete_object(Bucket=bucket, Key=key)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        why = _s3_reason(exc, cfg)
        if step == "delete":
            return CheckResult(
                "s3",
                Outcome.WARN,
                f"write, list and read OK; delete failed: {why} (klined never deletes from S3; "
                f"remove {url} by hand)",
            )
        return CheckResult("s3", Outcome.FAIL, f"{step}: {why}")
    where = f" via {cfg.s3.endpoint_url}" if cfg.s3.endpoint_url else ""
    prefix = f"s3://{bucket}/{cfg.s3.prefix + '/' if cfg.s3.prefix else ''}"
    return CheckResult("s3", Outcome.OK, f"{prefix}: write, list, read, delete OK{where}")


# -- the lake ---------------------------------------------------------------------------------


def _lake_sync(root: Path) -> CheckResult:
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError as exc:
        return CheckResult("lake", Outcome.FAIL, f"{root}: {exc.strerror or exc}")
    free = f"{_bytes(usage.free)} free of {_bytes(usage.total)}"
    if existing != root:
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            return CheckResult(
                "lake", Outcome.FAIL, f"{root} does not exist and {existing} is not writable"
            )
        result = CheckResult(
            "lake", Outcome.OK, f"{root} does not exist yet, `klined run` creates it; {free}"
        )
    elif not root.is_dir():
        return CheckResult("lake", Outcome.FAIL, f"{root} is not a directory")
    else:
        probe = root / f".klined-check-{uuid.uuid4().hex}"
        try:
            with probe.open("wb") as fh:
                fh.write(b"klined check\n")
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
        except OSError as exc:
            probe.unlink(missing_ok=True)
            return CheckResult(
                "lake", Outcome.FAIL, f"{root} is not writable: {exc.strerror or exc}"
            )
        result = CheckResult("lake", Outcome.OK, f"{root} writable; {free}")
    if usage.free < LOW_DISK_BYTES:
        result.outcome = Outcome.WARN
        result.reason += " (low: the spool keeps parts until they are uploaded)"
    return result


async def check_lake(cfg: Config) -> CheckResult:
    """The lake root is writable (or creatable); free disk space shown, WARN when low."""
    return await anyio.to_thread.run_sync(_lake_sync, cfg.lake_root, abandon_on_cancel=True)


async def check_lake_in_s3(cfg: Config) -> CheckResult:
    """The local parts marked uploaded are in S3 with the same size and checksum; the ones S3
    lost are uploaded again (the only thing ``check`` writes, and only with ``--lake``)."""
    row = "lake in s3"
    if not cfg.s3.bucket:
        return CheckResult(row, Outcome.SKIP, "no bucket configured (the lake is local only)")
    from klined.lake import LakeUploader

    uploader = LakeUploader(cfg.lake_root, cfg.lake, cfg.s3, attempts=2)
    report = await uploader.verify()
    if report.error:
        return CheckResult(row, Outcome.FAIL, f"cannot compare with S3: {report.error}")
    details = [f"differs (not overwritten): {k}" for k in report.different[:20]]
    if report.missing:
        try:
            await uploader.upload_pending()
        except Exception as exc:
            return CheckResult(
                row,
                Outcome.FAIL,
                f"{len(report.missing)} part(s) missing in S3 could not be uploaded again: {exc}",
                [f"missing: {k}" for k in report.missing[:20]],
            )
        details += [f"uploaded again: {k}" for k in report.missing[:20]]
    if report.different:
        return CheckResult(
            row,
            Outcome.FAIL,
            f"{len(report.different)} of {report.checked} part(s) differ from their S3 copy",
            details,
        )
    if report.missing:
        return CheckResult(
            row,
            Outcome.WARN,
            f"{len(report.missing)} of {report.checked} part(s) were missing in S3 and are "
            "uploaded again:",
            details,
        )
    return CheckResult(
        row, Outcome.OK, f"{report.checked} local part(s) match their S3 copy (size, MD5)"
    )


# -- output -----------------------------------------------------------------------------------


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - the loop always returns
