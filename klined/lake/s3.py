"""The S3 side of the lake: listing an hour's parts and fetching them (local copy first).

Credentials come only from the standard AWS chain (environment, profile, instance role); the
TOML names bucket, prefix, endpoint and region. Every call has a timeout and transient
failures are retried with capped, jittered exponential backoff. With no bucket configured the
lake is local only and everything here works on the local spool alone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
from loguru import logger

from klined.config import S3Config
from klined.errors import LakeError
from klined.lake.layout import hour_path, parse_key, s3_key, strip_prefix
from klined.lake.reader import LocalPart, iter_local_parts
from klined.model import HOUR_MS, hours_between

T = TypeVar("T")

#: concurrent S3 listings / transfers per operation
CONCURRENCY = 8


class PartRef(msgspec.Struct, frozen=True, kw_only=True):
    """One closed part of the lake and where it can be read from."""

    key: str  # lake key, without the S3 prefix
    exchange: str
    symbol: str  # canonical BASE/QUOTE
    hour_ms: int
    size: int
    local_path: str | None = None  # present locally (at listing time)
    s3_key: str | None = None  # present in S3 under this object key
    etag: str | None = None  # S3 ETag (quotes stripped), when listed from S3


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Capped exponential backoff with jitter (50-100% of the capped value)."""
    return min(max_s, initial_s * (2 ** min(attempt, 30))) * random.uniform(0.5, 1.0)


def is_not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


def describe(exc: BaseException) -> str:
    """A short one-line description of an S3 failure (never includes credentials)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def plain_md5(etag: str | None) -> str | None:
    """The MD5 an ETag stands for, if it is a single-part, unencrypted-style ETag."""
    if not etag:
        return None
    tag = etag.strip('"').lower()
    if len(tag) == 32 and all(c in "0123456789abcdef" for c in tag):
        return tag
    return None


class LakeStore:
    """Read access to the lake: local spool plus (when configured) its S3 mirror.

    The bronze loader uses :meth:`list_parts` and :meth:`read_part_bytes`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        s3: S3Config | None = None,
        *,
        op_timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        attempts: int = 4,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.s3 = s3 or S3Config()
        self.op_timeout_s = op_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self.attempts = max(1, attempts)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._session: Any = None

    @property
    def enabled(self) -> bool:
        """Whether an S3 bucket is configured (else the lake is local only)."""
        return bool(self.s3.bucket)

    def object_key(self, key: str) -> str:
        return s3_key(self.s3.prefix, key)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        """A fresh S3 client (short-lived: no stale connections survive an outage)."""
        if not self.enabled:
            raise LakeError("no S3 bucket configured")
        import aioboto3
        from aiobotocore.config import AioConfig

        if self._session is None:
            self._session = aioboto3.Session()
        config = AioConfig(
            connect_timeout=self._connect_timeout_s,
            read_timeout=self._read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        async with AsyncExitStack() as stack:
            with anyio.fail_after(self.op_timeout_s):
                s3 = await stack.enter_async_context(
                    self._session.client(
                        "s3",
                        endpoint_url=self.s3.endpoint_url or None,
                        region_name=self.s3.region or None,
                        config=config,
                    )
                )
            yield s3

    async def retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` (each try bounded by ``op_timeout_s``) with backoff; LakeError at the end."""
        for attempt in range(self.attempts):
            try:
                with anyio.fail_after(self.op_timeout_s):
                    return await op()
            except LakeError:
                raise
            except Exception as exc:
                if attempt + 1 >= self.attempts:
                    raise LakeError(f"{what} failed: {describe(exc)}") from exc
                delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s)
                logger.warning("lake: {} failed ({}); retry in {:.1f}s", what, describe(exc), delay)
                await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- listing --------------------------------------------------------------------------------

    async def _prefixes(self, s3: Any, prefix: str) -> list[str]:
        out: list[str] = []
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=prefix, Delimiter="/"):
            out.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        return out

    async def _objects(
        self, s3: Any, prefix: str, after: str = "", before: str = ""
    ) -> list[dict[str, Any]]:
        """Objects under ``prefix``; with ``after``/``before``, only keys strictly between
        them (S3 lists in key order: it starts after ``after`` and stops at ``before``)."""
        out: list[dict[str, Any]] = []
        paginator = s3.get_paginator("list_objects_v2")
        extra = {"StartAfter": after} if after else {}
        async for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=prefix, **extra):
            for obj in page.get("Contents", []):
                if before and obj["Key"] >= before:
                    return out
                out.append(obj)
        return out

    async def _list_s3(
        self,
        tails: list[str],
        exchange: str | None,
        keep: Callable[[int], bool],
        between: tuple[str, str] = ("", ""),
    ) -> list[PartRef]:
        """Parts in S3 under every symbol folder + each of ``tails`` (hour folders), whose
        hour ``keep`` accepts: exchange and symbol folders first, then the folders. With
        ``between`` (two hour folders), one listing per symbol of the keys between them."""
        base = self.object_key("")
        refs: list[PartRef] = []
        async with self.client() as s3:
            if exchange:
                exchange_prefixes = [f"{base}exchange={exchange}/"]
            else:
                exchange_prefixes = await self.retrying(
                    "S3 listing", lambda: self._prefixes(s3, base + "exchange=")
                )
            symbol_prefixes: list[str] = []
            for ex_prefix in exchange_prefixes:
                symbol_prefixes += await self.retrying(
                    "S3 listing", functools.partial(self._prefixes, s3, ex_prefix + "symbol=")
                )
            limiter = anyio.CapacityLimiter(CONCURRENCY)
            errors: list[LakeError] = []

            async def one(prefix: str) -> None:
                after = prefix + between[0] if between[0] else ""
                before = prefix + between[1] if between[1] else ""
                async with limiter:
                    try:
                        objects = await self.retrying(
                            "S3 listing", lambda: self._objects(s3, prefix, after, before)
                        )
                    except LakeError as exc:
                        errors.append(exc)
                        return
                for obj in objects:
                    key = strip_prefix(self.s3.prefix, obj["Key"])
                    try:
                        pk = parse_key(key or "")
                    except ValueError:
                        continue
                    if not keep(pk.hour_ms):
                        continue
                    refs.append(
                        PartRef(
                            key=pk.key,
                            exchange=pk.exchange,
                            symbol=pk.symbol,
                            hour_ms=pk.hour_ms,
                            size=int(obj["Size"]),
                            s3_key=obj["Key"],
                            etag=str(obj.get("ETag", "")).strip('"') or None,
                        )
                    )

            async with anyio.create_task_group() as tg:
                for sym_prefix in symbol_prefixes:
                    for tail in tails:
                        tg.start_soon(one, sym_prefix + tail)
        if errors:
            raise errors[0]
        return refs

    async def _list_hour_s3(self, hour_ms: int, exchange: str | None) -> list[PartRef]:
        tail = f"interval_minutes=1/{hour_path(hour_ms)}/"
        return await self._list_s3([tail], exchange, lambda h: h == hour_ms)

    async def _list(
        self,
        local: list[LocalPart],
        remote: Callable[[], Awaitable[list[PartRef]]],
    ) -> list[PartRef]:
        """Local parts united with S3's (when configured), sorted by key."""
        refs: dict[str, PartRef] = {}
        if self.enabled:
            try:
                listed = await remote()
            except LakeError:
                raise
            except Exception as exc:
                raise LakeError(f"S3 listing failed: {describe(exc)}") from exc
            for ref in listed:
                refs[ref.key] = ref
        for part in local:
            try:
                pk = parse_key(part.key)
            except ValueError:
                continue
            found = refs.get(part.key)
            refs[part.key] = PartRef(
                key=part.key,
                exchange=pk.exchange,
                symbol=pk.symbol,
                hour_ms=pk.hour_ms,
                size=part.size,
                local_path=str(part.path),
                s3_key=found.s3_key if found else None,
                etag=found.etag if found else None,
            )
        return [refs[k] for k in sorted(refs)]

    async def list_parts(self, hour_ms: int, exchange: str | None = None) -> list[PartRef]:
        """Every closed part of the hour (local spool united with S3), sorted by key.

        Raises :class:`LakeError` if S3 is configured but cannot be listed: a partial listing
        would make the loader miss parts silently.
        """
        local = await anyio.to_thread.run_sync(
            lambda: list(iter_local_parts(self.root, hour_ms=hour_ms, exchange=exchange))
        )
        return await self._list(local, lambda: self._list_hour_s3(hour_ms, exchange))

    async def list_range(
        self, start_ms: int, end_ms: int, exchange: str | None = None
    ) -> list[PartRef]:
        """Every closed part of the hours in ``[start_ms, end_ms)`` (local united with S3),
        sorted by key. In S3 one listing per pair, from the first hour's folder to the end's
        (keys sort by time: a day of one pair is a few dozen keys), not one per hour."""
        hours = hours_between(start_ms, end_ms)
        if not hours:
            return []
        lo, hi = hours[0], hours[-1] + HOUR_MS

        def keep(hour: int) -> bool:
            return lo <= hour < hi

        def scan() -> list[LocalPart]:
            found = []
            for part in iter_local_parts(self.root, exchange=exchange):
                try:
                    if keep(parse_key(part.key).hour_ms):
                        found.append(part)
                except ValueError:
                    continue  # not one of ours
            return found

        between = (hour_path(lo), hour_path(hi))
        local = await anyio.to_thread.run_sync(scan)
        return await self._list(
            local, lambda: self._list_s3(["interval_minutes=1/"], exchange, keep, between)
        )

    # -- reading --------------------------------------------------------------------------------

    async def read_part_bytes(self, ref: PartRef) -> bytes:
        """A part's bytes: the local file if it is (still) there and readable, else an S3 GET
        (verified); :class:`LakeError` when neither works."""
        local = self.root / ref.key
        try:
            return await anyio.Path(local).read_bytes()
        except FileNotFoundError:
            problem = "is not in the local lake"
        except OSError as exc:  # unreadable here (permissions, I/O error): S3 may have it
            problem = f"cannot be read locally ({exc.strerror or exc})"
            if not (self.enabled and ref.s3_key):
                raise LakeError(f"part {ref.key} {problem}") from exc
        if not self.enabled:
            raise LakeError(f"part {ref.key} {problem} and S3 is not configured")
        object_key = ref.s3_key or self.object_key(ref.key)

        async def get() -> bytes:
            async with self.client() as s3:
                response = await s3.get_object(Bucket=self.s3.bucket, Key=object_key)
                async with response["Body"] as body:
                    data: bytes = await body.read()
            return data

        data = await self.retrying(f"S3 GET {object_key}", get)
        if len(data) != ref.size:
            raise LakeError(f"S3 object {object_key} has {len(data)} bytes, expected {ref.size}")
        md5 = plain_md5(ref.etag)
        if md5 is not None and hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
            raise LakeError(f"S3 object {object_key} does not match its ETag")
        return data
