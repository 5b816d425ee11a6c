"""Where the bronze loader's parts come from, and reading them.

Parts on the local disk (a :class:`LakeStore` ref's ``local_path``) are read in place: a few
tens of KB from the page cache take microseconds, while a worker-thread hop per part, fighting
the busy loop for the GIL, cost more than decoding the part. Other parts are fetched a few at a
time concurrently, ahead of the COPY (:mod:`klined.jobs.bronze`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from klined.lake import LakeStore

#: concurrent fetchers of the parts not on the local disk
READERS = 4

T = TypeVar("T")


class PartSource(Protocol):
    """Where parts come from: :class:`klined.lake.LakeStore`, or a test's folder.

    ``list_parts(hour_ms)`` returns refs with a ``key`` (and ideally ``exchange``);
    ``read_part_bytes(ref)`` their bytes. Either may be a coroutine function or a plain one.
    """

    def list_parts(self, hour_ms: int) -> Any: ...

    def read_part_bytes(self, ref: Any) -> Any: ...


async def maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


def ref_exchange(ref: Any) -> str:
    exchange = getattr(ref, "exchange", None)
    if isinstance(exchange, str) and exchange:
        return exchange
    key: str = ref.key
    head = key.split("/", 1)[0]
    return head.removeprefix("exchange=") if head.startswith("exchange=") else ""


async def read_parts(
    source: PartSource,
    refs: Sequence[Any],
    send: MemoryObjectSendStream[tuple[Any, bytes | Exception]],
) -> None:
    """Read parts with a few concurrent readers, in any order; a failure is sent as an item."""
    pending = iter(refs)

    async def reader(out: MemoryObjectSendStream[tuple[Any, bytes | Exception]]) -> None:
        async with out:
            for ref in pending:
                try:
                    data: bytes = await maybe_await(source.read_part_bytes(ref))
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    await out.send((ref, exc))
                    continue
                await out.send((ref, data))

    async with send, anyio.create_task_group() as tg:
        for _ in range(min(READERS, len(refs))):
            tg.start_soon(reader, send.clone())


def local_path(source: PartSource, ref: Any) -> str | None:
    """A local copy of the part that can be read in place, skipping a worker-thread hop."""
    path = getattr(ref, "local_path", None)
    if isinstance(source, LakeStore) and isinstance(path, str) and path:
        return path
    return None


async def read_one(source: PartSource, ref: Any) -> bytes | Exception:
    try:
        data: bytes = await maybe_await(source.read_part_bytes(ref))
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        return exc
    return data


def read_local(path: str) -> bytes | None:
    """The file's bytes, or ``None`` to let the source read it (gone, unreadable...)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
