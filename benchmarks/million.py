"""Children of the million-row benchmark: each runs alone in its own process so its peak RSS is its own.

``python -m benchmarks.million write PATH ROWS [IDN_EVERY]``   write a recipients CSV like the
                                                  sample's (every IDN_EVERY-th address at bücher.example)
``python -m benchmarks.million pandas PATH``       ``pandas.read_csv`` alone (all text, as ingest reads)
``python -m benchmarks.million ingest PATH LEDGER`` mergekit's ingest into a fresh SQLite ledger

Each prints one JSON object with ``seconds`` (timed inside the process, after imports).
"""

from __future__ import annotations

import csv
import json
import sys
import time

from benchmarks.rendering import sample_rows


def write(path: str, rows: int, idn_every: int = 0) -> None:
    base = sample_rows(36)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(list(base[0]))
        for i in range(rows):
            row = base[i % len(base)]
            writer.writerow(
                [
                    f"m{i}.{row['email'].split('.', 1)[1]}"
                    if not idn_every or i % idn_every
                    else f"m{i}@bücher.example",
                    row["name"],
                    f"{i:07d}",
                    row["city"],
                    row["zip"],
                    row["plan"],
                ]
            )


def pandas_alone(path: str) -> float:
    import pandas as pd

    started = time.perf_counter()
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    elapsed = time.perf_counter() - started
    assert len(frame) > 0
    return elapsed


def ingest(path: str, ledger_path: str) -> float:
    # What mergekit imports when it reads a file: imports, timed by neither child
    import pyarrow.compute
    import pyarrow.csv  # noqa: F401

    from mergekit.ledger import SqliteLedger
    from mergekit.source import read_rows

    ledger = SqliteLedger(ledger_path)
    campaign = ledger.open_campaign(
        "million",
        template_path="t",
        template_source="",
        fingerprint="f",
        transport="null://",
        allow_template_change=False,
    )
    started = time.perf_counter()
    counts = ledger.ingest(campaign, read_rows(path))
    elapsed = time.perf_counter() - started
    assert counts.added > 0
    ledger.close()
    return elapsed


def main() -> None:
    command = sys.argv[1]
    if command == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
        print(json.dumps({"ok": True}))
    elif command == "pandas":
        print(json.dumps({"seconds": pandas_alone(sys.argv[2])}))
    elif command == "ingest":
        print(json.dumps({"seconds": ingest(sys.argv[2], sys.argv[3])}))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
