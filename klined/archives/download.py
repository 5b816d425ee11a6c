"""Fetch Binance's archive files, verified: the ``.CHECKSUM`` first, then the zip, hashed as it
streams to disk, so a file is only ever read after it matched its checksum.

The base URL is ``exchanges.binance.archive_url``: ``https://`` (Binance US's public data, or
any mirror with the same layout, such as the simulator) or ``file://`` (a local mirror: files
are hashed and read in place, never copied or deleted). Every request has a timeout; transport
errors, timeouts and 5xx are retried with capped, jittered backoff a bounded number of times;
a 404 is :class:`klined.errors.ArchiveNotPublished`; a location that cannot be connected to at
all is :class:`klined.errors.ArchiveUnreachable` for the rest of the run (one warning, then
every caller falls back at once).
"""

from __future__ import annotations

import hashlib
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import anyio
import httpx
from loguru import logger

from klined.archives.files import CHUNK, sha256_file
from klined.errors import ArchiveError, ArchiveNotPublished, ArchiveUnreachable
from klined.rest.ratelimit import backoff_delay

#: tries per request for transport errors, timeouts and 5xx
ATTEMPTS = 4
#: a checksum mismatch may be a download gone wrong: fetched once more before giving up
MISMATCH_RETRIES = 1


class ArchiveSource:
    """One archive location. Use as ``async with ArchiveSource(url, ...) as source``."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        work_dir: Path | None = None,
        attempts: int = ATTEMPTS,
        backoff_s: tuple[float, float] = (0.5, 10.0),
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.local_root = Path(unquote(parts.path)) if parts.scheme == "file" else None
        self.timeout_s = timeout_s
        self.work_dir = work_dir
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.rng = rng or random.Random()
        self.unreachable = ""  # why, once the location could not be reached at all
        self.bytes_downloaded = 0
        self._http: httpx.AsyncClient | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> ArchiveSource:
        if self.local_root is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                headers={"User-Agent": "klined"},
                follow_redirects=True,
            )
            if self.work_dir is not None:
                self.work_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="klined-archive-", dir=self.work_dir)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._http.aclose()
        if self._tmp is not None:
            self._tmp.cleanup()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    # ----------------------------------------------------------------------------- requests

    async def checksum(self, path: str, name: str) -> bytes:
        """The body of ``<path>`` (a ``.CHECKSUM`` file: a few dozen bytes)."""
        if self.local_root is not None:
            return await anyio.to_thread.run_sync(self._read_local, path, name)
        chunks: list[bytes] = []
        await self._get(path, name, chunks.append, chunks.clear)
        return b"".join(chunks)

    async def fetch(
        self,
        path: str,
        name: str,
        sha256: str,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Path:
        """The verified zip on local disk: a temporary file (delete it with :meth:`discard`),
        or the mirror's own file for ``file://``."""
        if self.local_root is not None:
            local = self.local_root / path
            if not local.is_file():
                raise ArchiveNotPublished(name, f"not in the mirror ({local})")
            got = await anyio.to_thread.run_sync(sha256_file, local, name)
            if on_bytes is not None:
                on_bytes(local.stat().st_size)
            _verify(name, got, sha256)
            return local
        assert self._tmp is not None
        target = Path(self._tmp.name) / name
        for attempt in range(MISMATCH_RETRIES + 1):
            got = await self._download(path, name, target, on_bytes)
            try:
                _verify(name, got, sha256)
            except ArchiveError:
                target.unlink(missing_ok=True)
                if attempt == MISMATCH_RETRIES:
                    raise
                logger.warning("{}: checksum mismatch, downloading it again", name)
                continue
            return target
        raise AssertionError("unreachable")  # pragma: no cover

    async def _download(
        self, path: str, name: str, target: Path, on_bytes: Callable[[int], None] | None
    ) -> str:
        """Write ``path`` to ``target``; its SHA-256."""
        digests = [hashlib.sha256()]
        with target.open("wb") as out:

            def sink(chunk: bytes) -> None:
                digests[-1].update(chunk)
                out.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))

            def restart() -> None:
                out.seek(0)
                out.truncate()
                digests.append(hashlib.sha256())

            await self._get(path, name, sink, restart)
        return digests[-1].hexdigest()

    def discard(self, path: Path) -> None:
        """Remove a file :meth:`fetch` downloaded (never a mirror's own file)."""
        if self._tmp is not None and path.parent == Path(self._tmp.name):
            path.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- machinery

    def _read_local(self, path: str, name: str) -> bytes:
        assert self.local_root is not None
        if not self.local_root.is_dir():
            raise ArchiveUnreachable(f"the archive mirror {self.local_root} is not a folder")
        local = self.local_root / path
        try:
            return local.read_bytes()
        except FileNotFoundError:
            raise ArchiveNotPublished(name, f"not in the mirror ({local})") from None
        except OSError as exc:
            raise ArchiveError(name, f"cannot read {local}: {exc.strerror or exc}") from None

    async def _get(
        self,
        path: str,
        name: str,
        sink: Callable[[bytes], None],
        restart: Callable[[], None],
    ) -> None:
        """Stream ``path`` into ``sink``; a failed try calls ``restart`` and starts over
        (bounded)."""
        if self.unreachable:
            raise ArchiveUnreachable(self.unreachable)
        assert self._http is not None
        url = self.url(path)
        refused = 0
        for attempt in range(self.attempts):
            problem: str
            if attempt:
                restart()
            try:
                with anyio.fail_after(self.timeout_s * 4):  # a whole file, however slow
                    async with self._http.stream("GET", url) as resp:
                        if resp.status_code == 404:
                            raise ArchiveNotPublished(name, f"not published ({url}: HTTP 404)")
                        if resp.status_code == 200:
                            async for chunk in resp.aiter_bytes(CHUNK):
                                self.bytes_downloaded += len(chunk)
                                sink(chunk)
                            return
                        body = (await resp.aread())[:200]
                        problem = f"HTTP {resp.status_code}: {body!r}"
                        if 400 <= resp.status_code < 500 and resp.status_code != 429:
                            raise ArchiveError(name, f"{url} refused: {problem}")
            except httpx.ConnectError as exc:
                refused += 1
                problem = f"cannot connect: {exc}"
            except (httpx.HTTPError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if refused == self.attempts:
                break
            if attempt + 1 < self.attempts:
                delay = backoff_delay(attempt, *self.backoff_s, self.rng)
                logger.debug("{}: {} (retry {} in {:.1f}s)", url, problem, attempt + 1, delay)
                await anyio.sleep(delay)
        if refused == self.attempts:
            self.unreachable = f"{self.base_url} cannot be reached ({problem})"
            logger.warning("binance archive unreachable: {}", self.unreachable)
            raise ArchiveUnreachable(self.unreachable)
        raise ArchiveError(name, f"download failed after {self.attempts} tries: {problem}")


def _verify(name: str, got: str, expected: str) -> None:
    if got != expected:
        raise ArchiveError(
            name,
            f"checksum mismatch: the file's SHA-256 is {got}, its .CHECKSUM says {expected}",
        )
