"""Small builders for test campaigns: a CSV and a template in a folder."""

from __future__ import annotations

import csv
from pathlib import Path

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
