"""Campaign operations: what each command does, as library calls.

:func:`send` ingests the CSV, recovers an interrupted run and dispatches;
:func:`retry` dispatches deferred, unknown (and failed) rows now; :func:`status`,
:func:`report` and :func:`preview` read. The CLI is a thin layer over these.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .dispatch import Dispatcher, RunResult, SendOptions
from .errors import ConfigError, LedgerError, RenderError
from .ledger import STATES, Campaign, Ledger, LedgerRow, open_ledger
from .render import Template, TemplateSource
from .source import SourceOptions, SourceRow, read_rows
from .transports import transport_from_url
from .transports.base import Message

DEFAULT_LEDGER = "mergekit.db"


def default_campaign_name(recipients: str | Path, template: str | Path) -> str:
    """``<recipients file stem>-<template file stem>``, e.g. ``recipients-welcome``."""
    return f"{Path(recipients).stem}-{Path(template).stem}"


@dataclass
class SendReport:
    """A run's result plus what ingest found; ``dry_run`` runs leave the real ledger alone."""

    run: RunResult
    ingested: int = 0
    already_known: int = 0
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)

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
    on_start: Callable[[int], None] | None = None,
) -> SendReport:
    """Ingest ``recipients`` and send every sendable row; resume if the campaign exists.

    Everything that can be wrong with the arguments (template syntax, transport
    URL, options, CSV shape and encoding) raises before the first message leaves.
    ``on_start`` gets the number of rows this run will try to send.

    :raises ConfigError, InputError, TemplateError, LedgerError: bad arguments; nothing sent.
    :raises TransportError: the transport cannot work at all; rows stay resumable.
    """
    options.check()
    name = campaign or default_campaign_name(recipients, template_path)
    source_template = TemplateSource.read(template_path)
    compiled = Template(source_template, campaign=name)
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
    on_start: Callable[[int], None] | None,
) -> SendReport:
    record = ledger.open_campaign(
        name,
        template_path=str(Path(source_template.path).resolve()),
        template_source=source_template.text,
        fingerprint=source_template.fingerprint,
        transport=sender.url.redacted,
        allow_template_change=allow_template_change,
    )
    ledger.lock_for_send(record)
    counts = ledger.ingest(record, read_rows(recipients, source))
    recovered = ledger.recover(record)
    result = _dispatch(ledger, record, compiled, sender, options, on_progress, on_start)
    result.recovered_unknown = recovered
    return SendReport(result, counts.added, counts.known)


def _dispatch(
    ledger: Ledger,
    record: Campaign,
    compiled: Template,
    sender: Any,
    options: SendOptions,
    on_progress: Callable[[Counter[str]], None] | None,
    on_start: Callable[[int], None] | None,
) -> RunResult:
    if on_start is not None:
        on_start(_sendable(ledger.counts(record), options))
    dispatcher = Dispatcher(ledger, record, compiled, sender, options, on_progress)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_run_with_signals(dispatcher))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (``pip install mergekit[fast]``) unless
    ``MERGEKIT_UVLOOP=0``: a cheaper loop for a CPU-bound sender (docs/benchmarks)."""
    if os.environ.get("MERGEKIT_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _sendable(counts: dict[str, int], options: SendOptions) -> int:
    total = counts["pending"] + counts["deferred"]
    if options.unknown == "resend":
        total += counts["unknown"] + counts["sending"]
    if options.include_failed:
        total += counts["failed"]
    return total


async def _run_with_signals(dispatcher: Dispatcher) -> RunResult:
    loop = asyncio.get_running_loop()
    handled = (signal.SIGINT, signal.SIGTERM)
    for sig in handled:
        loop.add_signal_handler(sig, dispatcher.stop)
    try:
        return await dispatcher.run()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _already_sent_note(ledger_path: str, name: str) -> list[str]:
    if not Path(ledger_path).exists():
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
    on_start: Callable[[int], None] | None = None,
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
        compiled = Template(
            TemplateSource.parse(record.template_source, path=record.template_path), campaign=record.name
        )
        sender = transport_from_url(url, concurrency=options.concurrency)
        ledger.lock_for_send(record)
        recovered = ledger.recover(record)
        result = _dispatch(ledger, record, compiled, sender, options, on_progress, on_start)
        result.recovered_unknown = recovered
        return SendReport(result)
    finally:
        ledger.close()


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


def preview(
    recipients: str | Path,
    template_path: str | Path,
    *,
    limit: int = 1,
    row: int | None = None,
    campaign: str | None = None,
    source: SourceOptions = SourceOptions(),
) -> list[PreviewItem]:
    """Render the first ``limit`` rows (or just data row ``row``) without sending or a ledger."""
    if limit < 1:
        raise ConfigError("must be at least 1", option="--limit")
    if row is not None and row < 1:
        raise ConfigError("rows are numbered from 1 (the first line after the header)", option="--row")
    name = campaign or default_campaign_name(recipients, template_path)
    compiled = Template.from_path(template_path, campaign=name)
    with contextlib.closing(read_rows(recipients, source)) as chunks:
        return _preview_rows(chunks, compiled, limit, row, recipients)


def _preview_rows(
    chunks: Iterator[list[SourceRow]], compiled: Template, limit: int, row: int | None, recipients: str | Path
) -> list[PreviewItem]:
    items: list[PreviewItem] = []
    for chunk in chunks:
        for source_row in chunk:
            if row is not None and source_row.row != row:
                continue
            if source_row.state != "pending":
                items.append(
                    PreviewItem(
                        source_row.row, source_row.key, None, f"{source_row.state}: {source_row.reason}"
                    )
                )
            else:
                try:
                    message = compiled.render(source_row.data, row=source_row.row, key=source_row.key)
                    items.append(PreviewItem(source_row.row, source_row.key, message))
                except RenderError as err:
                    items.append(PreviewItem(source_row.row, source_row.key, None, f"invalid: {err.message}"))
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
