"""Blocking calls on worker threads that a cancelled job still waits for.

`asyncio.to_thread` gives up on its thread when the awaiting task is cancelled: the task moves on (to
the sink's abort, which closes the output's descriptor) while the thread is still inside its pwritev.
That descriptor number can be handed to the next file the process opens, and the late write lands
there. A call made with `to_thread_to_end` is awaited to its end first; the cancellation is then
re-raised. Only for calls that end on their own (a positional read or write of one chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


async def to_thread_to_end(fn: Callable[..., T], *args: Any) -> T:
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await wait_out([fut])
        raise


async def wait_out(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Wait until every future is done, through any cancellation of the caller (who re-raises what
    stopped it afterwards); their errors count as seen: the job is going anyway, they are not the news."""
    waiting = asyncio.ensure_future(asyncio.wait(futures))
    while not waiting.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(waiting)
    for fut in futures:
        if not fut.cancelled():
            fut.exception()
