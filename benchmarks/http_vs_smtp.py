"""One campaign through an HTTP bulk API and through SMTP: msg/s and exchanges per message.

``python -m benchmarks.http_vs_smtp [ROWS] [CONCURRENCY]`` (defaults 20000, 16), in one run:

1. ``mergekit send --transport postmark://`` into a local stand-in of the
   Postmark API (benchmarks/http_sink.py, its own process): msg/s, and HTTP
   requests per message as the server counted them;
2. ``mergekit send --transport smtp://`` into Postfix's ``smtp-sink`` (C, its
   own process), same rows, template and ``--concurrency``: msg/s; then the
   same campaign again through a counting relay in front of ``smtp-sink`` for
   the SMTP commands per message (the relay slows that pass, so it is not
   timed);
3. SendGrid and Mailgun: requests per 10,000 rows with and without the
   substitution path (``?substitution=false``), as the stand-in counted them.

Each ``mergekit send`` is a fresh CLI process with its own SQLite ledger, as a
user runs it. Prints Markdown tables.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.helpers import write_campaign
from tests.smtpd import free_port
from tests.transports.api_campaign import ENV

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def start_api() -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "benchmarks.http_sink"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, f"http://127.0.0.1:{process.stdout.readline().strip()}"


def api_stats(base: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base}/stats") as reply:
        return dict(json.loads(reply.read())["requests"])


def start_smtp_sink() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [SMTP_SINK, *user, f"127.0.0.1:{port}", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, port


def send(folder: Path, transport: str, rows: int, concurrency: int, name: str) -> float:
    """``mergekit send`` as a user runs it; returns msg/s (whole command, CSV to ledger)."""
    recipients, template = write_campaign(folder, rows, name=name)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mergekit", "send", str(recipients), str(template), "--transport", transport,
         "--concurrency", str(concurrency), "--ledger", str(folder / f"{name}.db"), "--json"],
        cwd=folder, capture_output=True, text=True, check=False, env={**os.environ, **ENV},
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    found = json.loads(result.stdout)
    assert found["sent"] == rows, (found, result.stderr[-2000:])
    return rows / elapsed


class CommandCounter:
    """A TCP relay that counts SMTP commands from client to server (DATA content excluded)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.commands = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_until_complete(server.serve_forever())

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.create_task(downstream())
        in_data = False
        while line := await reader.readline():
            if in_data:
                in_data = line != b".\r\n"
            else:
                self.commands += 1
                in_data = line.strip().upper() == b"DATA"
            up_writer.write(line)
            await up_writer.drain()
        up_writer.close()
        await task


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    api, base = start_api()
    sink, sink_port = start_smtp_sink()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            http_rate = send(folder, f"postmark://?base_url={base}", rows, concurrency, "postmark")
            http_requests = api_stats(base).get("postmark", 0)
            smtp_rate = send(folder, f"smtp://127.0.0.1:{sink_port}", rows, concurrency, "smtp")
            counter = CommandCounter(sink_port)
            send(folder, f"smtp://127.0.0.1:{counter.port}", rows, concurrency, "smtp_counted")
            substitution = {}
            for provider, url in (("sendgrid", "sendgrid://"), ("mailgun", "mailgun://mg.example.com")):
                for on in (True, False):
                    before = api_stats(base).get(provider, 0)
                    flag = "" if on else "&substitution=false"
                    send(folder, f"{url}?base_url={base}{flag}", 10_000, concurrency, f"{provider}{int(on)}")
                    substitution[(provider, on)] = api_stats(base).get(provider, 0) - before
    finally:
        api.terminate()
        sink.terminate()
        api.wait()
        sink.wait()
    print(f"Same {rows}-row campaign (tests/helpers.py template), --concurrency {concurrency}, one run:\n")
    print("| transport | into | msg/s | exchanges per message |")
    print("|---|---|---|---|")
    print(
        f"| postmark:// (batch of 500) | local stand-in API (Python) | {http_rate:.0f} "
        f"| {http_requests / rows:.4f} HTTP requests ({http_requests} in all) |"
    )
    print(
        f"| smtp:// (pool of {concurrency}) | Postfix smtp-sink | {smtp_rate:.0f} "
        f"| {counter.commands / rows:.2f} SMTP commands ({counter.commands} in all, "
        f"{counter.connections} connections) |"
    )
    print("\nRequests per 10,000 rows (substitution: one shared body, up to 1,000 recipients a request):\n")
    print("| provider | with substitution | without (?substitution=false) |")
    print("|---|---|---|")
    for provider in ("sendgrid", "mailgun"):
        print(f"| {provider} | {substitution[(provider, True)]} | {substitution[(provider, False)]} |")


if __name__ == "__main__":
    main()
