"""The ``mergekit`` command: parse options, call one library function, show the result.

Exit codes (DESIGN.md) describe the campaign as it stands when the command
ends: 0 every sendable row delivered, 1 finished with rows failed or invalid,
2 bad usage or input (nothing sent), 3 stopped with rows still to send.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import campaign as campaigns
from .addresses import canonical_address
from .dispatch import Rate, SendOptions, campaign_exit_code
from .errors import MergekitError
from .gallery import write_gallery
from .ledger import STATES
from .source import DEFAULT_ENCODING, SourceOptions
from .unsubscribe import SECRET_VARIABLE

F = TypeVar("F", bound=Callable[..., Any])
GALLERY_LIMIT = 100  # rows a gallery shows unless --limit says otherwise
log = logging.getLogger("mergekit")


def _fail_cleanly(command: F) -> F:
    """Turn a MergekitError into one line on stderr and its exit code (``--debug``: traceback)."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MergekitError as err:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                log.debug("traceback", exc_info=True)
            click.echo(f"Error: {err}", err=True)
            sys.exit(err.exit_code)

    return wrapper  # type: ignore[return-value]


def ledger_options(command: F) -> F:
    command = click.option(
        "--campaign", metavar="NAME", help="Campaign name (default: the only or most recent one)."
    )(command)
    return click.option(
        "--ledger",
        "ledger_path",
        default=campaigns.DEFAULT_LEDGER,
        show_default=True,
        metavar="PATH",
        help="Ledger: a SQLite file, or a postgresql:// URL shared by workers.",
    )(command)


def source_options(command: F) -> F:
    command = click.option(
        "--encoding",
        default="utf-8",
        show_default=True,
        help="Encoding of the CSV (UTF-8 with or without BOM by default).",
    )(command)
    command = click.option(
        "--key",
        "key_column",
        metavar="COL",
        help="Column that identifies a recipient (default: the address).",
    )(command)
    return click.option(
        "--email-column",
        default="email",
        show_default=True,
        metavar="COL",
        help="Column holding the recipient's address.",
    )(command)


def content_options(command: F) -> F:
    """Options of ``preview`` and ``send`` for attachments, unsubscribe and suppression."""
    for decorator in reversed(
        [
            click.option(
                "--attachments-dir",
                type=click.Path(file_okay=False),
                metavar="DIR",
                help="Folder that Attachment: paths are relative to, and must stay inside "
                "(default: the template's folder).",
            ),
            click.option(
                "--unsubscribe-url",
                metavar="URL",
                help="One-click unsubscribe URL (RFC 8058), e.g. 'https://example.com/u/{token}'; "
                f"{{token}} is signed with ${SECRET_VARIABLE}.",
            ),
            click.option(
                "--unsubscribe-mailto",
                metavar="ADDRESS",
                help=f"Unsubscribe address for List-Unsubscribe (needs ${SECRET_VARIABLE}).",
            ),
            click.option(
                "--suppress",
                multiple=True,
                type=click.Path(dir_okay=False),
                metavar="FILE",
                help="Never send to the addresses in FILE (CSV with an email column, or one per line); "
                "repeatable.",
            ),
        ]
    ):
        command = decorator(command)
    return command


def _content(
    attachments_dir: str | None,
    unsubscribe_url: str | None,
    unsubscribe_mailto: str | None,
    suppress: tuple[str, ...],
) -> campaigns.ContentOptions:
    return campaigns.ContentOptions(
        attachments_dir=attachments_dir,
        unsubscribe_url=unsubscribe_url,
        unsubscribe_mailto=unsubscribe_mailto,
        suppress=tuple(suppress),
    )


def send_options(command: F) -> F:
    for decorator in reversed(
        [
            click.option(
                "--concurrency",
                default=4,
                show_default=True,
                type=int,
                help="Connections (or requests) in flight at once.",
            ),
            click.option(
                "--batch-size",
                type=int,
                help="Messages per batch (default: the transport's largest; SMTP 100).",
            ),
            click.option("--rate", metavar="N/s|N/m|N/h", help="Cap the send rate, e.g. 50/s."),
            click.option(
                "--processes",
                type=int,
                help="Processes that send, sharing --concurrency (SQLite ledger; default: one per "
                "core, up to 4, for 5,000 rows or more).",
            ),
            click.option(
                "--max-attempts",
                default=3,
                show_default=True,
                type=int,
                help="Tries per message in this run before it is left deferred.",
            ),
            click.option(
                "--json", "as_json", is_flag=True, help="Print the final status as one JSON object."
            ),
        ]
    ):
        command = decorator(command)
    return command


@click.group()
@click.version_option(package_name="mergekit")
@click.option("--debug", is_flag=True, help="Log details and tracebacks to stderr.")
def main(debug: bool) -> None:
    """Mail merge: a CSV and a Jinja template become a campaign, sent and recorded."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.argument("recipients", type=click.Path(dir_okay=False))
@click.argument("template", type=click.Path(dir_okay=False))
@click.option("--limit", type=int, help=f"How many rows to show [default: 1; {GALLERY_LIMIT} with --html].")
@click.option("--row", type=int, help="Show only this data row (1 = first line after the header).")
@click.option(
    "--html",
    "html_dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Write a browsable gallery (DIR/index.html, one page per message) instead of printing.",
)
@source_options
@content_options
@_fail_cleanly
def preview(
    recipients: str,
    template: str,
    limit: int | None,
    row: int | None,
    html_dir: str | None,
    email_column: str,
    key_column: str | None,
    encoding: str,
    attachments_dir: str | None,
    unsubscribe_url: str | None,
    unsubscribe_mailto: str | None,
    suppress: tuple[str, ...],
) -> None:
    """Print messages as they would go on the wire: headers, a blank line, the body.

    With --html DIR, write a static gallery instead: an index of the previewed
    rows (subject, state, and why a row will not be sent) and one page per
    message (headers, HTML part, text part, attachments). Open DIR/index.html.
    """
    items = campaigns.preview(
        recipients,
        template,
        limit=limit or (GALLERY_LIMIT if html_dir else 1),
        row=row,
        source=_source(email_column, key_column, encoding),
        content=_content(attachments_dir, unsubscribe_url, unsubscribe_mailto, suppress),
    )
    if html_dir:
        gallery = write_gallery(items, html_dir, title=f"{template} with {recipients}")
        ready = sum(item.message is not None for item in items)
        click.echo(
            f"wrote {gallery}: {len(items)} rows, {ready} ready to send, {len(items) - ready} not sendable"
        )
        if any(item.state == "invalid" for item in items):
            sys.exit(1)
        return
    for index, item in enumerate(items):
        if index:
            click.echo()
        click.echo(f">>> row {item.row} ({item.key})")
        if item.message is None:
            click.echo(f"not sendable: {item.reason}")
        else:
            click.echo(item.message.raw.decode("ascii", "replace").replace("\r\n", "\n"), nl=False)
    if any(item.state == "invalid" for item in items):
        sys.exit(1)


@main.command()
@click.argument("recipients", type=click.Path(dir_okay=False))
@click.argument("template", type=click.Path(dir_okay=False))
@click.option(
    "--transport",
    required=True,
    metavar="URL",
    help="Where to send: smtp://host:587, smtps://host, maildir://DIR, null://",
)
@click.option("--dry-run", is_flag=True, help="Render and check every row; send nothing.")
@ledger_options
@send_options
@click.option(
    "--unknown",
    type=click.Choice(["resend", "skip"]),
    default="resend",
    show_default=True,
    help="Rows whose outcome a crash left unknown: resend them "
    "with the same Message-ID, or leave them unsent.",
)
@click.option(
    "--allow-template-change", is_flag=True, help="Resume a campaign although its template changed."
)
@source_options
@content_options
@_fail_cleanly
def send(
    recipients: str,
    template: str,
    transport: str,
    dry_run: bool,
    ledger_path: str,
    campaign: str | None,
    concurrency: int,
    batch_size: int | None,
    rate: str | None,
    processes: int | None,
    max_attempts: int,
    as_json: bool,
    unknown: str,
    allow_template_change: bool,
    email_column: str,
    key_column: str | None,
    encoding: str,
    attachments_dir: str | None,
    unsubscribe_url: str | None,
    unsubscribe_mailto: str | None,
    suppress: tuple[str, ...],
) -> None:
    """Send a campaign (or resume it: sent rows are skipped, new rows are added)."""
    options = SendOptions(
        concurrency=concurrency,
        batch_size=batch_size,
        rate=Rate.parse(rate) if rate else None,
        processes=processes,
        max_attempts=max_attempts,
        unknown=unknown,
        dry_run=dry_run,
    )
    with _progress() as (on_start, on_progress):
        report = campaigns.send(
            recipients,
            template,
            transport=transport,
            ledger_path=ledger_path,
            campaign=campaign,
            options=options,
            source=_source(email_column, key_column, encoding),
            allow_template_change=allow_template_change,
            on_progress=on_progress,
            on_start=on_start,
            content=_content(attachments_dir, unsubscribe_url, unsubscribe_mailto, suppress),
        )
    _show_run(report, as_json, ledger_path)


@main.command()
@ledger_options
@click.option("--transport", metavar="URL", help="Transport (default: the campaign's last one).")
@click.option("--failed", "include_failed", is_flag=True, help="Also retry failed rows.")
@send_options
@_fail_cleanly
def retry(
    ledger_path: str,
    campaign: str | None,
    transport: str | None,
    include_failed: bool,
    concurrency: int,
    batch_size: int | None,
    rate: str | None,
    processes: int | None,
    max_attempts: int,
    as_json: bool,
) -> None:
    """Send deferred and unknown rows now, whatever their next-attempt time."""
    options = SendOptions(
        concurrency=concurrency,
        batch_size=batch_size,
        rate=Rate.parse(rate) if rate else None,
        processes=processes,
        max_attempts=max_attempts,
        include_failed=include_failed,
    )
    with _progress() as (on_start, on_progress):
        report = campaigns.retry(
            ledger_path=ledger_path,
            campaign=campaign,
            transport=transport,
            options=options,
            on_progress=on_progress,
            on_start=on_start,
        )
    _show_run(report, as_json, ledger_path)


@main.command()
@click.option(
    "--ledger",
    "ledger_path",
    required=True,
    metavar="URL",
    help="The campaign's shared ledger: postgresql://user@host/db[?lease=SECONDS].",
)
@click.option("--campaign", metavar="NAME", help="Campaign to join (default: the only or most recent one).")
@click.option(
    "--transport",
    metavar="URL",
    help=f"Where to send (default: ${campaigns.TRANSPORT_ENV}, else the campaign's URL if secret-free).",
)
@click.option(
    "--concurrency",
    default=4,
    show_default=True,
    type=int,
    help="Connections (or requests) in flight at once in this worker.",
)
@click.option(
    "--batch-size",
    type=int,
    help="Messages per claimed batch (default: the transport's largest; SMTP 100).",
)
@click.option(
    "--follow", is_flag=True, help="Keep waiting for new rows (or the campaign) until Ctrl-C or SIGTERM."
)
@click.option("--json", "as_json", is_flag=True, help="Print the final status as one JSON object.")
@_fail_cleanly
def worker(
    ledger_path: str,
    campaign: str | None,
    transport: str | None,
    concurrency: int,
    batch_size: int | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Join a campaign in a shared ledger and send its rows until none is left.

    Run it on as many machines as you like; --rate, --unknown and --max-attempts
    are the campaign's, as its mergekit send set them.
    """
    with _progress() as (_, on_progress):
        report = campaigns.work(
            ledger_path=ledger_path,
            campaign=campaign,
            transport=transport,
            options=SendOptions(concurrency=concurrency, batch_size=batch_size),
            follow=follow,
            on_progress=on_progress,
        )
    _show_run(report, as_json, ledger_path)


@main.command()
@ledger_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_fail_cleanly
def status(ledger_path: str, campaign: str | None, as_json: bool) -> None:
    """Show how many rows are in each state."""
    found = campaigns.status(ledger_path=ledger_path, campaign=campaign)
    if as_json:
        click.echo(json.dumps(found))
    else:
        _print_status(found)
    sys.exit(campaign_exit_code(found))


# What Excel and LibreOffice take as the start of a formula in a CSV cell (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
REPORT_FIELDS = (
    "row",
    "key",
    "email",
    "state",
    "attempts",
    "last_code",
    "last_text",
    "provider_id",
    "message_id",
    "next_attempt_at",
    "unknown_count",
    "updated_at",
    "address",  # the canonical form of ``email`` (mergekit.addresses); last, so no column moves
)


@main.command()
@ledger_options
@click.option(
    "--state",
    "states",
    multiple=True,
    metavar="STATE",
    help=f"Only rows in this state (repeatable): {', '.join(STATES)}.",
)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file instead of standard output.",
)
@_fail_cleanly
def report(
    ledger_path: str, campaign: str | None, states: tuple[str, ...], fmt: str, output: str | None
) -> None:
    """Write every recipient's outcome (who failed and why) as CSV or JSON."""
    _, rows = campaigns.report(ledger_path=ledger_path, campaign=campaign, states=states)
    with click.open_file(output or "-", "w", encoding="utf-8", lazy=False) as out:
        if fmt == "json":
            out.write("[")
            for index, row in enumerate(rows):
                out.write(("," if index else "") + "\n" + json.dumps(_report_record(row)))
            out.write("\n]\n")
        else:
            # Every text cell quoted, numbers bare: a spreadsheet reads a quoted cell as one cell.
            writer = csv.DictWriter(
                out, fieldnames=REPORT_FIELDS, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC
            )
            writer.writeheader()
            for row in rows:
                writer.writerow(_spreadsheet_safe(_report_record(row)))


def _report_record(row: Any) -> dict[str, Any]:
    record = asdict(row)
    for name in ("next_attempt_at", "updated_at"):
        record[name] = campaigns.iso_time(record[name])
    record["address"] = canonical_address(row.email)
    return record


def _spreadsheet_safe(record: dict[str, Any]) -> dict[str, Any]:
    """The record with each text a spreadsheet would run as a formula prefixed by ``'``.

    The OWASP rule for CSV injection: a cell that starts with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return. Addresses, keys and server replies come from
    other people; ``--format json`` keeps them exact.
    """
    return {
        name: "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value
        for name, value in record.items()
    }


def _source(email_column: str, key_column: str | None, encoding: str) -> SourceOptions:
    chosen = DEFAULT_ENCODING if encoding.lower().replace("_", "-") in {"utf-8", "utf8"} else encoding
    return SourceOptions(encoding=chosen, email_column=email_column, key_column=key_column)


def _from_processes(processes: int) -> str:
    return f" from {processes} processes" if processes > 1 else ""


@contextmanager
def _progress() -> Iterator[tuple[Callable[[int, int], None], Callable[[Counter[str]], None]]]:
    """A rich progress bar on a terminal; a plain line every few seconds otherwise."""
    console = Console(stderr=True)
    if console.is_terminal:
        bar = Progress(
            TextColumn("sending"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8.0f} msg/s"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        task = bar.add_task("send", total=None, rate=0.0)
        started = time.monotonic()
        done = 0

        def start_bar(total: int, processes: int) -> None:
            bar.update(task, total=total)

        def advance_bar(counts: Counter[str]) -> None:
            nonlocal done
            done += sum(counts.values())
            bar.update(task, completed=done, rate=done / max(time.monotonic() - started, 1e-3))

        with bar:
            yield start_bar, advance_bar
        return
    state = {"total": 0, "done": 0, "last": time.monotonic(), "started": time.monotonic()}

    def start_lines(total: int, processes: int) -> None:
        state["total"] = total
        click.echo(f"sending up to {total} rows{_from_processes(processes)}", err=True)

    def advance_lines(counts: Counter[str]) -> None:
        state["done"] += sum(counts.values())
        now = time.monotonic()
        if now - state["last"] >= 5:
            state["last"] = now
            rate = state["done"] / max(now - state["started"], 1e-3)
            click.echo(f"progress: {state['done']}/{state['total']} rows ({rate:.0f}/s)", err=True)

    yield start_lines, advance_lines


def _show_run(report: campaigns.SendReport, as_json: bool, ledger_path: str) -> None:
    run = report.run
    found = campaigns.status_object(run.campaign, run.counts, run.recovered_unknown, run.next_due)
    if report.dry_run:
        found["dry_run"] = True
    if report.worker is not None:
        found["worker"] = report.worker
        found["this_run"] = dict(run.this_run)
    if as_json:
        click.echo(json.dumps(found))
    elif report.dry_run:
        click.echo(
            f"dry run: {run.this_run['would_send']} rows would be sent, "
            f"{run.counts['invalid']} invalid, {run.counts['duplicate']} duplicate, "
            f"{run.counts['suppressed']} suppressed; nothing was sent"
        )
    else:
        if report.worker is not None:
            click.echo(f"worker {report.worker} joined campaign {run.campaign}")
        else:
            click.echo(
                f"campaign {run.campaign}: {report.ingested} new rows ingested, "
                f"{report.already_known} already in the ledger"
            )
        if run.recovered_unknown:
            click.echo(
                f"{run.recovered_unknown} rows were left 'sending' by an interrupted "
                "run: counted unknown and handled by --unknown"
            )
        done = ", ".join(f"{count} {state}" for state, count in sorted(run.this_run.items()))
        click.echo(f"this run: {done or 'nothing to send'} in {run.elapsed:.1f}s")
    if not as_json:
        _print_status(found)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    _print_hint(found, run.interrupted, ledger_path, run.next_due)
    sys.exit(report.exit_code)


def _print_status(found: dict[str, Any]) -> None:
    table = Table(title=f"campaign {found['campaign']}", title_justify="left")
    table.add_column("state")
    table.add_column("rows", justify="right")
    for state in STATES:
        if found[state]:
            table.add_row(state, str(found[state]))
    table.add_row("total", str(found["total"]), style="bold")
    Console(soft_wrap=True).print(table)


def _print_hint(found: dict[str, Any], interrupted: bool, ledger_path: str, next_due: float | None) -> None:
    ledger = "" if ledger_path == campaigns.DEFAULT_LEDGER else f" --ledger {ledger_path}"
    if interrupted:
        click.echo("stopped: run the same command again to resume", err=True)
    elif found["deferred"] and next_due:
        click.echo(
            f"{found['deferred']} rows deferred until {campaigns.iso_time(next_due)}: "
            f"run the same send again after that, or `mergekit retry{ledger}` now",
            err=True,
        )
    elif found["unknown"]:
        click.echo(
            f"{found['unknown']} rows unknown: `mergekit retry{ledger}` resends them "
            "with the same Message-ID",
            err=True,
        )
    if found["failed"] or found["invalid"]:
        click.echo(
            f"see who failed and why: mergekit report{ledger} --state failed --state invalid", err=True
        )


if __name__ == "__main__":
    main()
