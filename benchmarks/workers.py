"""Scale-out benchmark: ``mergekit worker`` processes on one PostgreSQL campaign.

Measures, on this machine, in one run:

1. throughput with 1, 2 and 4 workers into the same sink: ``null://`` (the
   ledger and rendering alone) and an aiosmtpd server in a process of its own;
2. the PostgreSQL claim rate on its own: claims per second of 500-row batches
   (each claim followed by recording the batch ``sent``, as a worker does),
   from 1 and from 4 concurrent claimers;
3. a kill-a-worker trial: workers with a 2 s lease, some SIGKILLed mid-batch;
   rows, kills, unknown, duplicates and lost (must be 0), counted at the sink.

Needs a PostgreSQL server where it may create databases::

    MERGEKIT_PG_DURABLE=1 .ci/with-postgres python benchmarks/workers.py

(``MERGEKIT_TEST_POSTGRES`` or ``--postgres URL``). Figures are printed as a
table and, with ``--json FILE``, written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from mergekit.ledger import RowUpdate, open_ledger
from mergekit.ledger_postgres import PostgresLedger
from tests.helpers import ingest_for_workers
from tests.helpers import start_worker as start_worker_process

TEMPLATE = (
    "From: a@example.com\nTo: {{ name }} <{{ email }}>\nSubject: note {{ n }}\n\nHello {{ name }}, #{{ n }}\n"
)
CAMPAIGN = "bench"


# -- fixtures ---------------------------------------------------------------------


def fresh_database(server: str) -> str:
    name = f"mergekit_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))


def drop_database(server: str, url: str) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {urlsplit(url).path.lstrip('/')} WITH (FORCE)")


def make_campaign(url: str, folder: Path, rows: int, transport: str) -> None:
    ingest_for_workers(url, folder, rows, template=TEMPLATE, campaign=CAMPAIGN, transport=transport)


def start_worker(url: str, transport: str, folder: Path, *extra: str) -> subprocess.Popen[str]:
    return start_worker_process(url, CAMPAIGN, folder, "--transport", transport, *extra)


def finish(worker: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = worker.communicate(timeout=600)
    if worker.returncode != 0:
        raise RuntimeError(f"worker exited {worker.returncode}: {err[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


# -- the SMTP sink, in a process of its own ---------------------------------------------


def _sink_main(port_file: str, log_file: str) -> None:
    from aiosmtpd.smtp import SMTP

    class Handler:
        def __init__(self, out: Any) -> None:
            self.out = out

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            content = envelope.content
            start = content.find(b"Message-ID:")
            message_id = (
                content[start + 11 : content.find(b"\r\n", start)].strip().decode() if start >= 0 else ""
            )
            for recipient in envelope.rcpt_tos:
                self.out.write(f"{recipient}\t{message_id}\n")
            return "250 2.0.0 OK"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        with open(log_file, "w") as out:
            handler = Handler(out)
            server = await loop.create_server(
                lambda: SMTP(handler, hostname="localhost", loop=loop), "127.0.0.1", 0
            )
            Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
            await stop.wait()
            server.close()

    asyncio.run(serve())


class Sink:
    """An aiosmtpd server process; ``received()`` maps each recipient to the Message-IDs it got."""

    def __init__(self, folder: Path) -> None:
        self.port_file = folder / f"sink-{secrets.token_hex(3)}.port"
        self.log_file = folder / f"sink-{secrets.token_hex(3)}.log"
        self.process = multiprocessing.get_context("spawn").Process(
            target=_sink_main, args=(str(self.port_file), str(self.log_file)), daemon=True
        )
        self.process.start()
        deadline = time.monotonic() + 30
        while not self.port_file.exists() or not self.port_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the SMTP sink did not start")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())

    def stop(self) -> dict[str, list[str]]:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGTERM)
        self.process.join(30)
        received: dict[str, list[str]] = defaultdict(list)
        for line in self.log_file.read_text().splitlines():
            recipient, _, message_id = line.partition("\t")
            received[recipient].append(message_id)
        return received


# -- the measurements --------------------------------------------------------------


def throughput(server: str, folder: Path, workers: int, rows: int, transport: str) -> dict[str, Any]:
    url = fresh_database(server)
    try:
        make_campaign(url, folder, rows, transport)
        started = time.monotonic()
        processes = [start_worker(url, transport, folder, "--batch-size", "500") for _ in range(workers)]
        results = [finish(p) for p in processes]
        wall = time.monotonic() - started
        with psycopg.connect(url) as db:
            found = db.execute(
                "SELECT count(*), max(updated_at) - min(updated_at),"
                " count(*) FILTER (WHERE updated_at = (SELECT min(updated_at) FROM mergekit_recipients))"
                " FROM mergekit_recipients WHERE state = 'sent'"
            ).fetchone()
        assert found is not None
        # Steady: from the first recorded batch to the last, so interpreter start-up (about a
        # second per worker on this machine) is left out; "wall" includes it.
        sent, span, first_batch = found
        shares = [r["this_run"].get("sent", 0) for r in results]
        return {
            "transport": transport.split(":")[0],
            "workers": workers,
            "rows": rows,
            "sent": sent,
            "wall_s": round(wall, 2),
            "msg_per_s_wall": round(sent / wall, 1),
            "msg_per_s_steady": round((sent - first_batch) / span, 1) if span else None,
            "shares": shares,
        }
    finally:
        drop_database(server, url)


def claim_rate(server: str, folder: Path, claimers: int, batches: int, batch: int = 500) -> dict[str, Any]:
    url = fresh_database(server)
    try:
        make_campaign(url, folder, batches * batch, "null://")
        setup = open_ledger(url)
        campaign = setup.find_campaign(CAMPAIGN)
        setup.close()
        claim_times: list[float] = []
        lock = threading.Lock()

        def run(index: int) -> None:
            ledger = PostgresLedger(url, worker_id=f"bench-{index}")
            mine: list[float] = []
            while True:
                t0 = time.perf_counter()
                claimed = ledger.claim(campaign, batch, states=("pending",), due_before=None)
                mine.append(time.perf_counter() - t0)
                if not claimed:
                    break
                ledger.record(campaign, [RowUpdate(row.id, "sent", message_id="<x@y>") for row in claimed])
            ledger.close()
            with lock:
                claim_times.extend(mine[:-1])

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        claim_times.sort()
        return {
            "claimers": claimers,
            "batch": batch,
            "claims": len(claim_times),
            "claims_per_s_with_record": round(len(claim_times) / elapsed, 1),
            "rows_per_s_with_record": round(len(claim_times) * batch / elapsed, 0),
            "claim_ms_median": round(1000 * claim_times[len(claim_times) // 2], 2),
            "claim_ms_p95": round(1000 * claim_times[int(len(claim_times) * 0.95)], 2),
            "claims_per_s_claim_only": round(len(claim_times) / sum(claim_times) * claimers, 1),
        }
    finally:
        drop_database(server, url)


def kill_trial(server: str, folder: Path, rows: int, workers: int, kills: int) -> dict[str, Any]:
    url = fresh_database(server)
    sink = Sink(folder)
    try:
        transport = f"smtp://127.0.0.1:{sink.port}"
        make_campaign(url, folder, rows, transport)
        leased = url + "?lease=2"
        processes = [start_worker(leased, transport, folder) for _ in range(workers)]
        held: set[str] = set()
        killed = 0
        with psycopg.connect(url, autocommit=True) as db:
            for victim in processes[:kills]:
                mine = f"%:{victim.pid}:%"
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    found = db.execute(
                        "SELECT count(*), (SELECT count(*) FROM mergekit_recipients WHERE state = 'sent')"
                        " FROM mergekit_recipients WHERE state = 'sending' AND worker_id LIKE %s",
                        (mine,),
                    ).fetchone()
                    # Kill each victim mid-batch, spread over the run.
                    if found and found[0] and found[1] >= rows * (killed + 1) // (kills + 2):
                        victim.send_signal(signal.SIGKILL)
                        victim.wait()
                        killed += 1
                        break
                    time.sleep(0.005)
                held.update(
                    key
                    for (key,) in db.execute(
                        "SELECT key FROM mergekit_recipients WHERE state = 'sending' AND worker_id LIKE %s",
                        (mine,),
                    )
                )
        for victim in processes[:kills]:
            victim.communicate()
        results = [finish(p) for p in processes[kills:]]
        received = sink.stop()
        with psycopg.connect(url) as db:
            recovered = db.execute(
                "SELECT count(*) FROM mergekit_recipients WHERE unknown_count > 0"
            ).fetchone()
        duplicates = {key for key, ids in received.items() if len(ids) > 1}
        return {
            "rows": rows,
            "workers": workers,
            "kills": killed,
            "unknown": recovered[0] if recovered else None,
            "held_by_killed": len(held),
            "duplicates": len(duplicates),
            "duplicates_outside_killed_rows": len(duplicates - held),
            "duplicates_with_differing_message_id": sum(1 for k in duplicates if len(set(received[k])) > 1),
            "lost": rows - len(received),
            "final_sent": results[-1]["sent"],
        }
    finally:
        if sink.process.is_alive():
            sink.stop()
        drop_database(server, url)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres", default=os.environ.get("MERGEKIT_TEST_POSTGRES"))
    parser.add_argument("--rows", type=int, default=20000, help="rows per throughput run (SMTP: half)")
    parser.add_argument("--json", dest="json_out", help="also write the figures here")
    args = parser.parse_args()
    if not args.postgres:
        sys.exit("needs --postgres URL or MERGEKIT_TEST_POSTGRES (run under .ci/with-postgres)")
    with psycopg.connect(args.postgres) as db:
        version = db.execute("SHOW server_version").fetchone()
        fsync = db.execute("SHOW fsync").fetchone()
        sync_commit = db.execute("SHOW synchronous_commit").fetchone()
    figures: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "postgres": {
            "version": version and version[0],
            "fsync": fsync and fsync[0],
            "synchronous_commit": sync_commit and sync_commit[0],
        },
        "throughput": [],
        "claim_rate": [],
    }
    print(f"PostgreSQL {figures['postgres']}; {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="mergekit-bench-") as scratch:
        folder = Path(scratch)
        for transport_kind in ("null", "smtp"):
            sink = Sink(folder) if transport_kind == "smtp" else None
            transport = f"smtp://127.0.0.1:{sink.port}" if sink else "null://"
            rows = args.rows if sink is None else args.rows // 2
            for workers in (1, 2, 4):
                figure = throughput(args.postgres, folder, workers, rows, transport)
                figures["throughput"].append(figure)
                print(json.dumps(figure), flush=True)
            if sink:
                sink.stop()
        for claimers in (1, 4):
            figure = claim_rate(args.postgres, folder, claimers, batches=100)
            figures["claim_rate"].append(figure)
            print(json.dumps(figure), flush=True)
        figures["kill_trial"] = kill_trial(args.postgres, folder, rows=10000, workers=4, kills=2)
        print(json.dumps(figures["kill_trial"]), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
