"""Small builders for test campaigns: a CSV and a template in a folder."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mergekit.campaign import campaign_settings
from mergekit.dispatch import Rate, SendOptions
from mergekit.ledger import open_ledger
from mergekit.render import TemplateSource
from mergekit.source import read_rows
from tests.smtpd import SmtpServer

TEMPLATE = """\
From: Campaign <news@example.com>
To: {{ name }} <{{ email }}>
Subject: Hello {{ name }}

Hi {{ name }}, your number is {{ number }}.
"""


def write_campaign(
    folder: Path, count: int, *, template: str = TEMPLATE, name: str = "recipients"
) -> tuple[Path, Path]:
    """``count`` rows ``user{i}@example.org`` and the template; returns (csv, template) paths."""
    recipients = folder / f"{name}.csv"
    with recipients.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "name", "number"])
        for i in range(1, count + 1):
            writer.writerow([f"user{i}@example.org", f"User {i}", f"{i:05d}"])
    template_path = folder / "template.txt"
    template_path.write_text(template, encoding="utf-8")
    return recipients, template_path


def send_command(recipients: Path, template: Path, transport: str, *options: str) -> list[str]:
    """``mergekit send`` as a user runs it, for a subprocess."""
    return [sys.executable, "-m", "mergekit", "send", str(recipients), str(template),
            "--transport", transport, *options]  # fmt: skip


def ingest_for_workers(
    ledger: str,
    folder: Path,
    count: int,
    *,
    template: str,
    campaign: str,
    transport: str,
    rate: Rate | None = None,
) -> int:
    """``count`` rows ``p{i}@example.com`` ingested into ``campaign`` as ``mergekit send`` would,
    nothing sent: the campaign ``mergekit worker`` processes then share. Returns the rows added."""
    recipients = folder / f"people-{count}.csv"
    if not recipients.exists():
        rows = "".join(f"p{i}@example.com,P {i},{i}\n" for i in range(count))
        recipients.write_text("email,name,n\n" + rows)
    template_path = folder / "note.txt"
    template_path.write_text(template)
    source = TemplateSource.read(template_path)
    opened = open_ledger(ledger)
    try:
        record = opened.open_campaign(
            campaign,
            template_path=str(template_path),
            template_source=source.text,
            fingerprint=source.fingerprint,
            transport=transport,
            allow_template_change=False,
            settings=campaign_settings(SendOptions(rate=rate)),
        )
        return opened.ingest(record, read_rows(recipients)).added
    finally:
        opened.close()


def start_worker(
    ledger: str, campaign: str, folder: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``mergekit worker --json`` on ``campaign`` as a subprocess, its output captured."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mergekit.cli",
            "worker",
            "--ledger",
            ledger,
            "--campaign",
            campaign,
            "--json",
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
        env={**os.environ, **(env or {})},
    )


def wait_until_received(process: subprocess.Popen[Any], server: SmtpServer, count: int) -> None:
    """Return once ``server`` holds ``count`` messages, or the process ended, or a minute passed."""
    deadline = time.monotonic() + 60
    while len(server.messages) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def signal_when_received(
    process: subprocess.Popen[Any], server: SmtpServer, count: int, sig: signal.Signals
) -> None:
    """Send ``sig`` to ``process`` once ``server`` holds ``count`` messages (or the process ended,
    or a minute passed): a run interrupted mid-campaign, at a moment the test knows."""
    wait_until_received(process, server, count)
    process.send_signal(sig)
