"""Rendering on another core: a worker process that turns claimed rows into messages.

Building messages is CPU work and the sending loop is CPU-bound as well (every
reply is parsed in Python), so on a machine with more than one core a large run
renders in worker processes while the event loop sends. Dispatch stays one code
path: it awaits :meth:`Renderer.render` for each claimed batch whether that
runs here or in a worker.

A worker compiles the template once (it is pickled as its source and
options) and returns, per row,
the :class:`~mergekit.transports.base.Message` or the reason the row is
invalid. Workers ignore SIGINT (the parent stops the run and then them) and die
with the parent (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves none behind.
If a worker dies anyway, rendering falls back to this process; the run goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import fields
from typing import Any

from .errors import RenderError
from .render import Template
from .transports.base import Message

log = logging.getLogger(__name__)

# A run with fewer rows to send renders in-process: a worker costs ~50 ms to start.
MIN_ROWS_FOR_WORKERS = 5000
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

RowInput = tuple[int, str, dict[str, str]]  # (row number, recipient key, data)
Rendered = Message | str  # the message, or why the row is invalid

_template: Template | None = None  # the worker's compiled template


def die_with_parent() -> None:
    """Have Linux send this (forked) process SIGTERM when its parent dies; elsewhere, nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_processes(rows_to_send: int) -> int:
    """Worker processes for a run: one per core beyond the first, none for a small run."""
    if rows_to_send < MIN_ROWS_FOR_WORKERS:
        return 0
    return max(0, min(usable_cores() - 1, 4))


def render_rows(template: Template, rows: Sequence[RowInput]) -> list[Rendered]:
    """Render each row; a row that cannot be rendered gives its reason instead."""
    out: list[Rendered] = []
    for row, key, data in rows:
        try:
            out.append(template.render(data, row=row, key=key))
        except RenderError as err:
            out.append(err.message)
    return out


def _start_worker(template: Template) -> None:
    global _template
    # A forked worker inherits the parent's asyncio signal set-up: a signal here
    # must not reach the parent's loop through the shared wakeup fd.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    _template = template


_MESSAGE_FIELDS = tuple(field.name for field in fields(Message))


def _render_in_worker(rows: Sequence[RowInput]) -> list[tuple[Any, ...] | str]:
    # Messages travel as tuples of their fields: unpickling a slotted dataclass
    # looks up its fields again for every object, on the sending process's core.
    assert _template is not None, "worker not initialised"
    return [
        result if isinstance(result, str) else tuple(getattr(result, name) for name in _MESSAGE_FIELDS)
        for result in render_rows(_template, rows)
    ]


def _ready() -> int:
    return os.getpid()


class Renderer:
    """Renders batches in ``processes`` worker processes, or in this one when that is 0."""

    def __init__(self, template: Template, processes: int) -> None:
        self.template = template
        self.processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the workers (before any other thread of this run, so ``fork`` is safe)."""
        if self.processes < 1:
            return
        # fork is instant; with other threads alive (a test's server) a fork
        # could copy a held lock, so start from a clean forkserver instead.
        method = "fork" if threading.active_count() == 1 else "forkserver"
        if method not in multiprocessing.get_all_start_methods():
            method = "spawn"
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=multiprocessing.get_context(method),
            initializer=_start_worker,
            initargs=(self.template,),  # pickled as its source and options: compiled in the worker
        )
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.processes)))
        except (BrokenProcessPool, OSError) as err:
            log.warning("render workers did not start (%s); rendering in this process", err)
            self._drop_pool()

    async def render(self, rows: Sequence[RowInput]) -> list[Rendered]:
        """Render in a worker whenever there is one, however many batches it holds: this
        process's own core is busy sending, and a batch rendered here would hold that up."""
        if self._pool is not None:
            try:
                found = await asyncio.get_running_loop().run_in_executor(self._pool, _render_in_worker, rows)
                return [item if isinstance(item, str) else Message(*item) for item in found]
            except BrokenProcessPool:
                log.warning("a render worker died; rendering in this process from now on")
                self._drop_pool()
        return render_rows(self.template, rows)

    def close(self) -> None:
        self._drop_pool()

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["Renderer", "default_processes", "die_with_parent", "render_rows", "usable_cores"]
