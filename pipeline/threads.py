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
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def to_thread_to_end(fn: Callable[..., T], *args: Any) -> T:
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fut)
        if not fut.cancelled():
            fut.exception()  # the job is going anyway; its error is not the news
        raise
