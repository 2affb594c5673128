"""One SQLite campaign sent from several processes, one per core.

Sending is CPU-bound Python (each message rendered, written, its replies
parsed), so one process uses one core however many connections it holds. A
large run on a SQLite ledger therefore forks, after ingest, one more sending
process per spare core. Each runs its own :class:`~.dispatch.Dispatcher` with
its share of ``--concurrency`` and renders its own batches; they claim from the
same ledger, and a claim is a write transaction, so no row goes to two of
them. A row's ``sending`` state is committed before its message leaves, in
whichever process, so the crash guarantees are those of one process.

The parent forwards SIGINT and SIGTERM to its children, a child gets SIGTERM
when the parent dies (Linux ``PR_SET_PDEATHSIG``), and each reports its
progress and its counts to the parent over a pipe, one JSON line each. A child
that dies leaves its claimed rows ``sending``; the run ends resumable and the
next one finds them ``unknown``, as after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn

from .dispatch import Dispatcher, RunResult, SendOptions
from .errors import ConfigError, MergekitError
from .ledger import Campaign, Ledger, SqliteLedger
from .render import Template
from .transports.base import Transport
from .workers import MIN_ROWS_FOR_WORKERS, die_with_parent, usable_cores

log = logging.getLogger(__name__)

MAX_PROCESSES = 4


def sending_processes(ledger: Ledger, options: SendOptions, to_send: int) -> int:
    """How many processes send this run: ``--processes``, or one per core for a large run.

    One process where sharing would not pay or not be safe: a small run, a dry run
    (nothing to send), a ``--rate`` (one limiter must see every message), or a
    process already running other threads (a fork copies their locks, held or
    not). ``--processes`` above one with a PostgreSQL ledger is refused:
    ``mergekit worker`` scales that out.
    """
    wanted = options.processes
    if wanted is not None and wanted > 1 and not isinstance(ledger, SqliteLedger):
        raise ConfigError(
            "several sending processes need a SQLite ledger",
            option="--processes",
            hint="With a PostgreSQL ledger, start more `mergekit worker` processes instead",
        )
    if wanted is None:
        large = to_send >= MIN_ROWS_FOR_WORKERS and options.rate is None
        wanted = min(usable_cores(), MAX_PROCESSES) if large else 1
    if wanted == 1 or not isinstance(ledger, SqliteLedger) or ledger.path == ":memory:" or options.dry_run:
        return 1
    if threading.active_count() > 1:
        if options.processes is not None:
            log.warning("sending from one process: this one runs other threads, which a fork would copy")
        return 1
    return min(wanted, options.concurrency)


class Senders:
    """The forked sending processes of one run, seen from the parent."""

    def __init__(self, children: dict[int, int]) -> None:
        self._children = children  # pid -> read end of its pipe
        self.this_run: Counter[str] = Counter()
        self.interrupted = False
        self.failures: list[str] = []
        self.errors: list[ChildError] = []  # a child's MergekitError, which the parent raises
        self._reported: set[int] = set()  # children that reported theirs
        self.on_error: Callable[[], None] = lambda: None  # the run stops on the first one

    @classmethod
    def fork(
        cls,
        count: int,
        ledger: SqliteLedger,
        campaign: Campaign,
        template: Template,
        transport: Transport,
        options: SendOptions,
    ) -> tuple[Senders, SendOptions]:
        """Fork ``count - 1`` children, each sending its share; returns them and the parent's share."""
        shares = [options.concurrency // count + (i < options.concurrency % count) for i in range(count)]
        children: dict[int, int] = {}
        for share in shares[1:]:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                for other in children.values():
                    os.close(other)
                _child(ledger.path, campaign, template, transport, _share(options, share, count), write)
            os.close(write)
            children[pid] = read
        return cls(children), _share(options, shares[0], count)

    def signal(self, sig: int) -> None:
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def gather(self, on_progress: Callable[[Counter[str]], None] | None) -> None:
        """Read every child's reports until it ends, passing progress on; then reap them."""
        await asyncio.gather(*(self._read(pid, fd, on_progress) for pid, fd in self._children.items()))
        for pid in self._children:
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and pid not in self._reported:
                self.failures.append(f"sending process {pid} ended with exit code {code}")
        self._children = {}

    async def _read(self, pid: int, fd: int, on_progress: Callable[[Counter[str]], None] | None) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb")
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            async for line in reader:
                report = json.loads(line)
                if "progress" in report:
                    if on_progress is not None:
                        on_progress(Counter(report["progress"]))
                elif "done" in report:
                    self.this_run.update(report["done"])
                    self.interrupted |= report["interrupted"]
                elif "exit_code" in report:
                    self.errors.append(ChildError(report["error"], report["exit_code"]))
                    self._reported.add(pid)
                    self.on_error()
                else:
                    self.failures.append(f"sending process {pid}: {report['error']}")
        finally:
            transport.close()


class ChildError(MergekitError):
    """A sending process's MergekitError (a ledger fault, a transport that cannot work), raised
    again in the parent: its one line and exit code, as if the parent had met it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _share(options: SendOptions, concurrency: int, processes: int) -> SendOptions:
    # Each process renders its own batches: a render worker would only take a core from another.
    return replace(options, concurrency=concurrency, processes=processes, render_processes=0)


def _child(
    ledger_path: str,
    campaign: Campaign,
    template: Template,
    transport: Transport,
    options: SendOptions,
    write: int,
) -> NoReturn:
    """A forked sending process: its own ledger connection and loop; never returns."""
    code = 0
    out = os.fdopen(write, "w", buffering=1, encoding="utf-8")
    try:
        die_with_parent()
        if os.getppid() == 1:  # the parent died before the line above took effect
            raise SystemExit("the parent process is gone")
        # The parent's connection must not cross a fork. Never created: a ledger file deleted
        # meanwhile is the parent's to write back, not an empty one to start.
        ledger = SqliteLedger(ledger_path, create=False)

        def progress(counts: Counter[str]) -> None:
            out.write(json.dumps({"progress": counts}) + "\n")

        dispatcher = Dispatcher(ledger, campaign, template, transport, options, progress)
        result = run_dispatcher(dispatcher)
        ledger.close()
        out.write(json.dumps({"done": result.this_run, "interrupted": result.interrupted}) + "\n")
    except BaseException as err:  # reported to the parent, which decides the exit
        code = 1
        report: dict[str, object] = {"error": f"{type(err).__name__}: {err}"}
        if isinstance(err, MergekitError):  # the parent raises it as its own
            report = {"error": str(err), "exit_code": err.exit_code}
        with contextlib.suppress(OSError):
            out.write(json.dumps(report) + "\n")
    finally:
        with contextlib.suppress(OSError):
            out.flush()
        os._exit(code)


def run_dispatcher(dispatcher: Dispatcher, senders: Senders | None = None) -> RunResult:
    """Run ``dispatcher`` on a fresh event loop (uvloop where installed), stopping on
    SIGINT/SIGTERM; with ``senders``, wait for them too and count their rows in."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_run_with_signals(dispatcher, senders))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (``pip install mergekit[fast]``) unless
    ``MERGEKIT_UVLOOP=0``: a cheaper loop for a CPU-bound sender (docs/benchmarks)."""
    if os.environ.get("MERGEKIT_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run_with_signals(dispatcher: Dispatcher, senders: Senders | None) -> RunResult:
    loop = asyncio.get_running_loop()
    handled = (signal.SIGINT, signal.SIGTERM)

    def stop(sig: int) -> None:
        dispatcher.stop()
        if senders is not None:
            senders.signal(sig)

    for sig in handled:
        loop.add_signal_handler(sig, stop, sig)
    if senders is not None:
        senders.on_error = lambda: stop(signal.SIGTERM)
    try:
        if senders is None:
            return await dispatcher.run()
        try:
            result = await dispatcher.run()
        except BaseException:
            senders.signal(signal.SIGTERM)
            raise
        finally:
            await senders.gather(dispatcher.on_progress)
        for failure in senders.failures:
            log.warning("%s; rows it had claimed stay 'sending' until the next run", failure)
        if senders.errors:
            raise senders.errors[0]
        result = dispatcher.result()  # the ledger once every process is done
        result.this_run.update(senders.this_run)
        result.interrupted |= senders.interrupted
        return result
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


__all__ = ["Senders", "run_dispatcher", "sending_processes"]
