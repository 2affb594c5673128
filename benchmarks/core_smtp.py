"""mergekit's whole pipeline against a plain aiosmtplib loop, both into one aiosmtpd sink.

``python -m benchmarks.core_smtp [ROWS] [CONCURRENCY]`` (defaults 20000, 16):

1. reference: a plain aiosmtplib loop with CONCURRENCY connections sending
   pre-rendered bytes of the same size (no CSV, render or ledger);
2. ``mergekit send`` as a user runs it (CSV ingest, render, SQLite ledger, send)
   at ``--concurrency CONCURRENCY``.

It prints msg/s for each and the ratio mergekit / reference, from one run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

from tests.helpers import send_command, write_campaign
from tests.smtpd import free_port


def start_sink() -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sink", str(port)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process, port


async def plain_loop(port: int, messages: list[bytes], connections: int) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        while not queue.empty():
            data = queue.get_nowait()
            await client.sendmail("news@example.com", ["user@example.org"], data)
        await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return len(messages) / (time.perf_counter() - started)


def mergekit_run(folder: Path, port: int, rows: int, concurrency: int) -> float:
    recipients, template = write_campaign(folder, rows)
    started = time.perf_counter()
    result = subprocess.run(
        send_command(
            recipients, template, f"smtp://127.0.0.1:{port}", "--concurrency", str(concurrency), "--json"
        ),
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    found = json.loads(result.stdout)
    assert found["sent"] == rows, result.stderr
    return rows / elapsed


def sample_bytes(folder: Path) -> bytes:
    from mergekit.render import Template

    _, template = write_campaign(folder, 1)
    row = {"email": "user1@example.org", "name": "User 1", "number": "00001"}
    return Template.from_path(template, campaign="bench").render(row, row=1, key="k").raw


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    sink, port = start_sink()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            message = sample_bytes(folder)
            reference = asyncio.run(plain_loop(port, [message] * rows, concurrency))
            ours = mergekit_run(folder, port, rows, concurrency)
    finally:
        sink.terminate()
        sink.wait()
    print("| run | rows | concurrency | msg/s | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| plain aiosmtplib loop, pre-rendered ({len(message)} B) | {rows} | {concurrency} "
        f"| {reference:.0f} | 1.00 |"
    )
    print(
        f"| mergekit send (CSV, render, ledger, SMTP) | {rows} | {concurrency} | {ours:.0f} "
        f"| {ours / reference:.2f} |"
    )


if __name__ == "__main__":
    main()
