"""Small builders for test campaigns: a CSV and a template in a folder."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def signal_when_received(
    process: subprocess.Popen[Any], server: SmtpServer, count: int, sig: signal.Signals
) -> None:
    """Send ``sig`` to ``process`` once ``server`` holds ``count`` messages (or the process ended,
    or a minute passed): a run interrupted mid-campaign, at a moment the test knows."""
    deadline = time.monotonic() + 60
    while len(server.messages) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
