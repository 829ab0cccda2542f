"""The one thread that runs a serving process's torch compute, off its asyncio event loop.

torch's intra-op thread pool is an OpenMP team per calling thread. When two threads of one process
both run parallel torch ops (say the event loop's thread builds the model and samples while a worker
thread runs the steps), libgomp sees more busy threads than cores and stops spinning between parallel
regions, so every region pays for waking its threads. Measured on the 2-core dev machine with 2
intra-op threads: a 64x256 softmax took 6.5 us on the only torch thread and 65 us on a second one, and a
batch-32 decode step of the `small` preset 11 ms against 24 ms. So the engine and its local runners
send all their torch work (building, steps, weight updates, sampling) to this one thread, and the
event loop thread runs none.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_owner_pid = -1  # a forked child must not reuse its parent's (dead) thread
_thread_id: int | None = None


def _get() -> ThreadPoolExecutor:
    global _executor, _owner_pid
    with _lock:
        if _executor is None or _owner_pid != os.getpid():
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch", initializer=_mark)
            _owner_pid = os.getpid()
        return _executor


def _mark() -> None:
    global _thread_id
    _thread_id = threading.get_ident()


def on_torch_thread() -> bool:
    return _thread_id is not None and threading.get_ident() == _thread_id and _owner_pid == os.getpid()


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on the torch thread and wait for it (from synchronous code; inline when already there)."""
    if on_torch_thread():
        return fn(*args, **kwargs)
    return _get().submit(fn, *args, **kwargs).result()


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Await fn(*args) on the torch thread without blocking the event loop."""
    if on_torch_thread():
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_get(), fn, *args)
