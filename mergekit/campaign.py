"""Campaign operations: what each command does, as library calls.

:func:`send` ingests the CSV, recovers an interrupted run and dispatches;
:func:`retry` dispatches deferred, unknown (and failed) rows now; :func:`work`
joins a campaign in a shared (PostgreSQL) ledger as one more worker;
:func:`status`, :func:`report` and :func:`preview` read. The CLI is a thin
layer over these.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .dispatch import Dispatcher, Rate, RunResult, SendOptions
from .errors import ConfigError, LedgerError, LedgerStorageError, RenderError
from .ledger import STATES, Campaign, Ledger, LedgerRow, SqliteLedger, open_ledger
from .render import Template, TemplateSource
from .senders import Senders, run_dispatcher, sending_processes
from .source import SourceOptions, SourceRow, check_header, read_rows
from .transports import transport_from_url
from .transports.base import Message
from .unsubscribe import Unsubscribe, read_suppression

DEFAULT_LEDGER = "mergekit.db"
TRANSPORT_ENV = "MERGEKIT_TRANSPORT"  # a worker's transport URL (with its secrets) when --transport is absent
# The youngest generation's collection threshold during a run (frozen_heap): twice the containers
# of 16 in-flight batches of 500 rendered messages (~12 each), so batches alone never trigger one.
RUN_GC_THRESHOLD = 200_000


def default_campaign_name(recipients: str | Path, template: str | Path) -> str:
    """``<recipients file stem>-<template file stem>``, e.g. ``recipients-welcome``."""
    return f"{Path(recipients).stem}-{Path(template).stem}"


@dataclass(frozen=True)
class ContentOptions:
    """Rich-content options of ``send`` and ``preview``; each field is the option of the same name.

    ``suppress`` lists ``--suppress`` files; the unsubscribe options need the
    secret in ``MERGEKIT_UNSUBSCRIBE_SECRET``.
    """

    attachments_dir: str | None = None
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    suppress: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """What the ledger keeps so that ``retry`` renders the same messages (no secret)."""
        return {
            "attachments_dir": str(Path(self.attachments_dir).resolve()) if self.attachments_dir else None,
            "unsubscribe_url": self.unsubscribe_url,
            "unsubscribe_mailto": self.unsubscribe_mailto,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> ContentOptions:
        return cls(
            attachments_dir=settings.get("attachments_dir"),
            unsubscribe_url=settings.get("unsubscribe_url"),
            unsubscribe_mailto=settings.get("unsubscribe_mailto"),
        )


def _compile(source: TemplateSource, name: str, content: ContentOptions) -> Template:
    """The template with the content options applied; raises ConfigError for a missing secret."""
    unsubscribe = Unsubscribe.from_options(content.unsubscribe_url, content.unsubscribe_mailto)
    return Template(source, campaign=name, attachments_dir=content.attachments_dir, unsubscribe=unsubscribe)


def _check_attachments_dir(content: ContentOptions) -> None:
    if content.attachments_dir and not Path(content.attachments_dir).is_dir():
        raise ConfigError(
            f"{content.attachments_dir!r} is not a folder",
            option="--attachments-dir",
            hint="Name the folder that holds the files the Attachment: headers name",
        )


@dataclass
class SendReport:
    """A run's result plus what ingest found; ``dry_run`` runs leave the real ledger alone."""

    run: RunResult
    ingested: int = 0
    already_known: int = 0
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    worker: str | None = None  # the worker id of a ``work`` run, as its rows record it

    @property
    def exit_code(self) -> int:
        if self.dry_run:
            return 1 if self.run.counts["invalid"] else 0
        return self.run.exit_code


def send(
    recipients: str | Path,
    template_path: str | Path,
    *,
    transport: str,
    ledger_path: str = DEFAULT_LEDGER,
    campaign: str | None = None,
    options: SendOptions = SendOptions(),
    source: SourceOptions = SourceOptions(),
    allow_template_change: bool = False,
    on_progress: Callable[[Counter[str]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    content: ContentOptions = ContentOptions(),
) -> SendReport:
    """Ingest ``recipients`` and send every sendable row; resume if the campaign exists.

    Everything that can be wrong with the arguments (template syntax, transport
    URL, options, CSV shape and encoding) raises before the first message leaves.
    ``on_start`` gets the number of rows this run will try to send and the number
    of processes that send them.

    :raises ConfigError, InputError, TemplateError, LedgerError: bad arguments; nothing sent.
    :raises TransportError: the transport cannot work at all; rows stay resumable.
    """
    options.check()
    _check_attachments_dir(content)
    name = campaign or default_campaign_name(recipients, template_path)
    source_template = TemplateSource.read(template_path)
    compiled = _compile(source_template, name, content)
    suppressed = read_suppression(content.suppress, email_column=source.email_column)
    source = replace(source, suppressed=suppressed)
    check_header(recipients, source)  # a bad header refuses the run before the ledger records it
    sender = transport_from_url(transport, concurrency=options.concurrency)
    if options.dry_run:
        with tempfile.TemporaryDirectory(prefix="mergekit-dry-run-") as scratch:
            ledger = open_ledger(str(Path(scratch) / "dry-run.db"))
            try:
                report = _ingest_and_dispatch(
                    ledger,
                    name,
                    recipients,
                    source_template,
                    compiled,
                    sender,
                    options,
                    source,
                    True,
                    on_progress,
                    on_start,
                    content,
                )
            finally:
                ledger.close()
            report.dry_run = True
            report.notes.extend(_already_sent_note(ledger_path, name))
            return report
    ledger = open_ledger(ledger_path)
    try:
        return _ingest_and_dispatch(
            ledger,
            name,
            recipients,
            source_template,
            compiled,
            sender,
            options,
            source,
            allow_template_change,
            on_progress,
            on_start,
            content,
        )
    finally:
        ledger.close()


def _ingest_and_dispatch(
    ledger: Ledger,
    name: str,
    recipients: str | Path,
    source_template: TemplateSource,
    compiled: Template,
    sender: Any,
    options: SendOptions,
    source: SourceOptions,
    allow_template_change: bool,
    on_progress: Callable[[Counter[str]], None] | None,
    on_start: Callable[[int, int], None] | None,
    content: ContentOptions,
) -> SendReport:
    ledger.lock_for_send(name)  # first: a refused run records nothing (template, settings, rows)
    record = ledger.open_campaign(
        name,
        template_path=str(Path(source_template.path).resolve()),
        template_source=source_template.text,
        fingerprint=source_template.fingerprint,
        transport=sender.url.redacted,
        allow_template_change=allow_template_change,
        settings={**campaign_settings(options), **content.settings()},
    )
    compiled = compiled.with_identity(record.identity)
    counts = ledger.ingest(record, read_rows(recipients, source))
    recovered = ledger.recover(record)
    # After recover, so rows a crash left unknown are covered too; re-applies the
    # lists earlier runs gave, whatever the CSV says now.
    newly_suppressed = ledger.suppress(record, source.suppressed)
    result = _dispatch(ledger, record, compiled, sender, options, on_progress, on_start)
    result.recovered_unknown = recovered
    report = SendReport(result, counts.added, counts.known)
    if newly_suppressed:
        report.notes.append(
            f"{newly_suppressed} rows already in the ledger were suppressed by --suppress lists"
        )
    return report


def _dispatch(
    ledger: Ledger,
    record: Campaign,
    compiled: Template,
    sender: Any,
    options: SendOptions,
    on_progress: Callable[[Counter[str]], None] | None,
    on_start: Callable[[int, int], None] | None,
) -> RunResult:
    to_send = _sendable(ledger.counts(record), options)
    processes = sending_processes(ledger, options, to_send)
    if on_start is not None:
        on_start(to_send, processes)
    with frozen_heap():
        if processes == 1:
            return run_dispatcher(Dispatcher(ledger, record, compiled, sender, options, on_progress))
        assert isinstance(ledger, SqliteLedger)
        senders, share = Senders.fork(processes, ledger, record, compiled, sender, options)
        return run_dispatcher(Dispatcher(ledger, record, compiled, sender, share, on_progress), senders)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive when a run starts out of the garbage collector's passes until it ends.

    A run holds ``--concurrency`` batches of messages while they are sent, so the
    collector promotes them and every full collection rescans, with them, the
    ~100,000 objects of the libraries already imported (pandas, Jinja2, httpx…),
    which never become garbage: 0.2 s of CPU in a 20,000-message HTTP run, a
    sixth of the client's (issue 6). ``gc.freeze()`` sets those aside (a forked
    sending process or render worker inherits that).

    The youngest generation is collected after :data:`RUN_GC_THRESHOLD` more
    container objects were made than died, not 700: each rendered message lives
    through its batch's request, so at 700 every one (about a dozen containers)
    was scanned once or twice on its way to the oldest generation, ~1.5 µs a
    message on the HTTP path (issue 6). The count rises as a batch is rendered
    and falls as an older one is freed, so collections come with garbage cycles
    or a growing heap, not with the churn of batches in flight. Both settings
    are given back afterwards, leaving a library caller's process as it was.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(RUN_GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _sendable(counts: dict[str, int], options: SendOptions) -> int:
    total = counts["pending"] + counts["deferred"]
    if options.unknown == "resend":
        total += counts["unknown"] + counts["sending"]
    if options.include_failed:
        total += counts["failed"]
    return total


def _already_sent_note(ledger_path: str, name: str) -> list[str]:
    if "://" not in ledger_path and not Path(ledger_path).exists():
        return []
    ledger = open_ledger(ledger_path)
    try:
        counts = ledger.counts(ledger.find_campaign(name))
    except LedgerError:
        return []
    finally:
        ledger.close()
    if not counts["sent"]:
        return []
    return [
        f"the ledger {ledger_path} already records {counts['sent']} sent rows for campaign "
        f"{name!r}; a real run skips them"
    ]


def retry(
    *,
    ledger_path: str = DEFAULT_LEDGER,
    campaign: str | None = None,
    transport: str | None = None,
    options: SendOptions = SendOptions(),
    on_progress: Callable[[Counter[str]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> SendReport:
    """Send ``deferred`` and ``unknown`` rows now (and ``failed`` with ``include_failed``).

    The template is the one the ledger recorded; the transport is ``transport``
    or the campaign's last one when that URL held no secret.
    """
    options = replace(options, due_only=False, unknown="resend")
    options.check()
    ledger = _open_existing(ledger_path)
    try:
        record = ledger.find_campaign(campaign)
        url = transport or record.transport
        if transport is None and "***" in record.transport:
            raise ConfigError(
                f"the campaign's transport {record.transport} needs its secret again",
                option="--transport",
                hint="Pass --transport with the full URL",
            )
        compiled = _compiled(record)
        sender = transport_from_url(url, concurrency=options.concurrency)
        ledger.lock_for_send(record.name)
        recovered = ledger.recover(record)
        ledger.suppress(record, {})
        result = _dispatch(ledger, record, compiled, sender, options, on_progress, on_start)
        result.recovered_unknown = recovered
        return SendReport(result)
    finally:
        ledger.close()


def campaign_settings(options: SendOptions) -> dict[str, Any]:
    """What ``send`` records for workers joining later: ``--unknown``, ``--rate``, ``--max-attempts``."""
    return {
        "unknown": options.unknown,
        "max_attempts": options.max_attempts,
        "rate": [options.rate.count, options.rate.per_seconds] if options.rate else None,
    }


def work(
    *,
    ledger_path: str,
    campaign: str | None = None,
    transport: str | None = None,
    options: SendOptions = SendOptions(),
    follow: bool = False,
    poll_interval: float = 1.0,
    on_progress: Callable[[Counter[str]], None] | None = None,
) -> SendReport:
    """Join ``campaign`` (one started by ``send``) and send its rows until none is left.

    Meant for a shared PostgreSQL ledger, where any number of workers on any
    number of machines run this at once; on a SQLite ledger it holds the
    campaign alone, like ``send``. The campaign's ``--unknown``, ``--rate``
    (campaign-wide, shared by all workers) and ``--max-attempts`` are those its
    last ``send`` recorded; ``options`` gives this worker's ``concurrency`` and
    ``batch_size``. The transport is ``transport``, else ``$MERGEKIT_TRANSPORT``,
    else the campaign's recorded URL if it held no secret.

    The worker stops when nothing is claimable and no other worker holds rows
    (a dead worker's rows turn ``unknown`` when its lease expires, and this
    worker resends them). With ``follow`` it keeps waiting for new rows, due
    deferred rows, or the campaign itself, until SIGINT/SIGTERM.

    :raises ConfigError: no transport to use, or a bad option; nothing sent.
    :raises LedgerError: the ledger cannot be opened or lacks the campaign (without ``follow``).
    :raises TransportError: the transport cannot work at all; rows stay resumable.
    """
    options.check()
    url = transport or os.environ.get(TRANSPORT_ENV) or None
    if url is not None:
        transport_from_url(url)  # a bad URL is refused before joining
    ledger = _open_existing(ledger_path)
    joined = _work(ledger, campaign, url, options, follow=follow, poll=poll_interval, on_progress=on_progress)
    try:
        with frozen_heap():
            return asyncio.run(joined)
    finally:
        ledger.close()


async def _work(
    ledger: Ledger,
    name: str | None,
    url: str | None,
    base: SendOptions,
    *,
    follow: bool,
    poll: float,
    on_progress: Callable[[Counter[str]], None] | None,
) -> SendReport:
    started = time.monotonic()
    stopping = asyncio.Event()
    running: list[Dispatcher] = []

    def stop() -> None:
        stopping.set()
        for dispatcher in running:
            dispatcher.stop()

    loop = asyncio.get_running_loop()
    handled = (signal.SIGINT, signal.SIGTERM)
    for sig in handled:
        loop.add_signal_handler(sig, stop)
    this_run: Counter[str] = Counter()
    recovered = 0
    record: Campaign | None = None
    locked = False
    try:
        while not stopping.is_set():
            try:
                record = ledger.find_campaign(name)
            except LedgerStorageError:
                raise  # not a campaign yet to appear: the ledger itself failed
            except LedgerError:
                if not follow:
                    raise
                await _sleep(stopping, poll)
                continue
            if not locked:
                ledger.lock_for_send(record.name)  # PostgreSQL: no-op; SQLite: this process alone
                locked = True
            recovered += ledger.recover(record)
            ledger.suppress(record, {})
            options = _joined_options(record, base)
            counts = ledger.counts(record)
            if _claimable(ledger, record, counts, options):
                dispatcher = Dispatcher(
                    ledger,
                    record,
                    _compiled(record),
                    _transport_for(record, url, options),
                    options,
                    on_progress,
                )
                running.append(dispatcher)
                try:
                    result = await dispatcher.run()
                finally:
                    running.remove(dispatcher)
                this_run.update(result.this_run)
                if not result.this_run:  # others claimed first: wait rather than spin
                    await _sleep(stopping, poll)
                continue
            if not follow and not counts["sending"]:
                break
            # Rows held by other workers (their leases may still expire), or --follow: wait.
            await _sleep(stopping, poll)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    if record is None:
        raise LedgerError("stopped before the campaign appeared", path=ledger.path)
    counts = ledger.counts(record)
    return SendReport(
        RunResult(
            campaign=record.name,
            counts=counts,
            this_run=this_run,
            recovered_unknown=recovered,
            interrupted=stopping.is_set(),
            elapsed=time.monotonic() - started,
            next_due=ledger.next_due(record) if counts["deferred"] else None,
        ),
        worker=getattr(ledger, "worker_id", None),
    )


def _joined_options(record: Campaign, base: SendOptions) -> SendOptions:
    settings = record.settings
    rate = settings.get("rate")
    return replace(
        base,
        unknown=settings.get("unknown", base.unknown),
        max_attempts=int(settings.get("max_attempts", base.max_attempts)),
        rate=Rate(float(rate[0]), float(rate[1])) if rate else None,
    )


def _claimable(ledger: Ledger, record: Campaign, counts: dict[str, int], options: SendOptions) -> bool:
    if counts["pending"] or (counts["unknown"] and options.unknown == "resend"):
        return True
    due = ledger.next_due(record) if counts["deferred"] else None
    return due is not None and due <= time.time()


def _compiled(record: Campaign) -> Template:
    """The template and content options the campaign's ``send`` recorded, for its identity."""
    return _compile(
        TemplateSource.parse(record.template_source, path=record.template_path),
        record.name,
        ContentOptions.from_settings(record.settings),
    ).with_identity(record.identity)


def _transport_for(record: Campaign, url: str | None, options: SendOptions) -> Any:
    if url is None:
        if "***" in record.transport:
            raise ConfigError(
                f"the campaign's transport {record.transport} needs its secret on this machine",
                option="--transport",
                hint=f"Pass --transport with the full URL, or set {TRANSPORT_ENV}",
            )
        url = record.transport
    return transport_from_url(url, concurrency=options.concurrency)


async def _sleep(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=seconds)


def _open_existing(ledger_path: str) -> Ledger:
    if "://" not in ledger_path and not Path(ledger_path).exists():
        raise LedgerError(
            "no ledger at this path",
            path=ledger_path,
            hint="Pass --ledger with the file mergekit send wrote (default mergekit.db)",
        )
    return open_ledger(ledger_path)


def status(*, ledger_path: str = DEFAULT_LEDGER, campaign: str | None = None) -> dict[str, Any]:
    """Counts per state plus ``campaign``, ``total`` and ``recovered_unknown``.

    Rows in ``sending`` while no ``mergekit send`` holds the campaign are shown
    as ``unknown``: their run died, and the next run will treat them so.
    """
    ledger = _open_existing(ledger_path)
    try:
        record = ledger.find_campaign(campaign)
        counts = ledger.counts(record)
        if counts["sending"] and not ledger.is_locked(record):
            counts["unknown"] += counts["sending"]
            counts["sending"] = 0
        next_due = ledger.next_due(record) if counts["deferred"] else None
        return status_object(record.name, counts, ledger.recovered_unknown(record), next_due)
    finally:
        ledger.close()


def status_object(
    name: str, counts: dict[str, int], recovered_unknown: int, next_due: float | None
) -> dict[str, Any]:
    """The ``--json`` object of DESIGN.md: every state's count, ``campaign`` and ``total``."""
    return {
        "campaign": name,
        **{state: counts[state] for state in STATES},
        "total": sum(counts.values()),
        "recovered_unknown": recovered_unknown,
        "next_attempt_at": iso_time(next_due),
    }


def report(
    *, ledger_path: str = DEFAULT_LEDGER, campaign: str | None = None, states: Sequence[str] = ()
) -> tuple[str, Iterator[LedgerRow]]:
    """The campaign's name and its rows (in ``states`` if given), read lazily."""
    unknown_states = sorted(set(states) - set(STATES))
    if unknown_states:
        raise ConfigError(
            f"unknown state {unknown_states[0]!r}", option="--state", hint=f"Use one of {', '.join(STATES)}"
        )
    ledger = _open_existing(ledger_path)
    record = ledger.find_campaign(campaign)

    def rows() -> Iterator[LedgerRow]:
        try:
            yield from ledger.rows(record, list(states) or None)
        finally:
            ledger.close()

    return record.name, rows()


@dataclass(frozen=True)
class PreviewItem:
    """One previewed row: its message, or why it cannot be sent."""

    row: int
    key: str
    message: Message | None
    reason: str = ""
    state: str = "pending"  # the row's state at ingest; "invalid" when it does not render


def preview(
    recipients: str | Path,
    template_path: str | Path,
    *,
    limit: int = 1,
    row: int | None = None,
    campaign: str | None = None,
    source: SourceOptions = SourceOptions(),
    content: ContentOptions = ContentOptions(),
) -> list[PreviewItem]:
    """Render the first ``limit`` rows (or just data row ``row``) without sending or a ledger.

    Rows that would not be sent (invalid, duplicate, suppressed) are items too,
    with their state and reason, and count towards ``limit``.
    """
    if limit < 1:
        raise ConfigError("must be at least 1", option="--limit")
    if row is not None and row < 1:
        raise ConfigError("rows are numbered from 1 (the first line after the header)", option="--row")
    _check_attachments_dir(content)
    name = campaign or default_campaign_name(recipients, template_path)
    compiled = _compile(TemplateSource.read(template_path), name, content)
    source = replace(source, suppressed=read_suppression(content.suppress, email_column=source.email_column))
    with contextlib.closing(read_rows(recipients, source)) as chunks:
        return _preview_rows(chunks, compiled, limit, row, recipients)


def _preview_rows(
    chunks: Iterable[Sequence[SourceRow]],
    compiled: Template,
    limit: int,
    row: int | None,
    recipients: str | Path,
) -> list[PreviewItem]:
    items: list[PreviewItem] = []
    for chunk in chunks:
        for source_row in chunk:
            if row is not None and source_row.row != row:
                continue
            if source_row.state != "pending":
                items.append(
                    PreviewItem(
                        source_row.row,
                        source_row.key,
                        None,
                        f"{source_row.state}: {source_row.reason}",
                        source_row.state,
                    )
                )
            else:
                try:
                    message = compiled.render(source_row.data, row=source_row.row, key=source_row.key)
                    items.append(PreviewItem(source_row.row, source_row.key, message))
                except RenderError as err:
                    items.append(
                        PreviewItem(
                            source_row.row, source_row.key, None, f"invalid: {err.message}", "invalid"
                        )
                    )
            if row is not None or len(items) >= limit:
                return items
    if row is not None:
        raise ConfigError(f"there is no row {row} in {recipients}", option="--row")
    return items


def iso_time(timestamp: float | None) -> str | None:
    """A UTC ISO 8601 time, or None."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
