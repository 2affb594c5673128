"""Rendering alone: mergekit's builder against ``EmailMessage`` + ``bytes()`` and Jinja alone.

All three start from the same compiled Jinja templates and the same rows (the
sample template and CSV, the rows cycled with a unique address each so no
per-address cache helps), so the differences are message building only.
``python -m benchmarks.rendering [ROWS]`` prints rows/s for each.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

from mergekit.render import Template, make_message_id

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "templates" / "welcome.txt"
RECIPIENTS = ROOT / "sample_data" / "recipients.csv"


def sample_rows(count: int) -> list[dict[str, str]]:
    with RECIPIENTS.open(encoding="utf-8-sig", newline="") as file:
        base = list(csv.DictReader(file))
    rows = []
    for i in range(count):
        row = dict(base[i % len(base)])
        row["email"] = f"r{i}.{row['email']}"
        rows.append(row)
    return rows


def build_mergekit(template: Template, rows: list[dict[str, str]]) -> None:
    for i, row in enumerate(rows, start=1):
        template.render(row, row=i, key=row["email"])


def build_email_message(template: Template, rows: list[dict[str, str]]) -> None:
    """What a script on the standard library does: Jinja, then EmailMessage and bytes()."""
    headers, body = template._headers, template._body
    for row in rows:
        message = EmailMessage()
        for line in headers.render(row).splitlines():
            if line.strip():
                name, _, value = line.partition(":")
                message[name.strip()] = value.strip()
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = make_message_id("bench", row["email"], "example.com")
        message.set_content(body.render(row))
        bytes(message)


def jinja_only(template: Template, rows: list[dict[str, str]]) -> None:
    headers, body = template._headers, template._body
    for row in rows:
        headers.render(row)
        body.render(row)


def rate(
    fn: Callable[[Template, list[dict[str, str]]], None],
    template: Template,
    rows: list[dict[str, str]],
    repeats: int = 3,
) -> float:
    """Best of ``repeats`` runs, rows per second (best-of filters out other processes' bursts)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn(template, rows)
        best = min(best, time.perf_counter() - started)
    return len(rows) / best


def measure(rows: int = 20_000) -> dict[str, float]:
    template = Template.from_path(TEMPLATE, campaign="bench")
    data = sample_rows(rows)
    return {
        "mergekit builder": rate(build_mergekit, template, data),
        "EmailMessage + bytes()": rate(build_email_message, template, data[: max(1, rows // 8)]),
        "Jinja alone": rate(jinja_only, template, data),
    }


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    found = measure(rows)
    reference = found["EmailMessage + bytes()"]
    for name, value in found.items():
        print(f"{name:26} {value:10.0f} rows/s  {value / reference:6.1f}x EmailMessage")


if __name__ == "__main__":
    main()
