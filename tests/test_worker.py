"""``mergekit worker`` processes sharing one PostgreSQL campaign, sending into a real SMTP server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from mergekit.dispatch import Rate
from tests.helpers import ingest_for_workers
from tests.helpers import start_worker as start_worker_process

if TYPE_CHECKING:
    from tests.smtpd import SmtpServer

TEMPLATE = "From: a@example.com\nTo: {{ name }} <{{ email }}>\nSubject: note {{ n }}\n\nHello {{ name }}\n"
CAMPAIGN = "people-note"


def make_campaign(url: str, tmp_path: Path, count: int, port: int, rate: Rate | None = None) -> None:
    transport = f"smtp://127.0.0.1:{port}"
    added = ingest_for_workers(
        url, tmp_path, count, template=TEMPLATE, campaign=CAMPAIGN, transport=transport, rate=rate
    )
    assert added == count


def start_worker(url: str, port: int, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """A worker that takes its transport from the environment, as a deployment would."""
    return start_worker_process(
        url, CAMPAIGN, tmp_path, *extra, env={"MERGEKIT_TRANSPORT": f"smtp://127.0.0.1:{port}"}
    )


def finish(worker: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def by_recipient(sink: SmtpServer) -> dict[str, list[str]]:
    """Message-IDs received per recipient address."""
    found: dict[str, list[str]] = defaultdict(list)
    for _, recipient, message_id in sink.snapshot():
        found[recipient].append(message_id)
    return found


def test_three_workers_send_every_row_once(
    postgres_url: str, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    rows = 3000
    make_campaign(postgres_url, tmp_path, rows, smtp_server.port)
    smtp_server.handler.data_delay = 0.002  # a little server time per message, so no worker drains it alone
    workers = [start_worker(postgres_url, smtp_server.port, tmp_path, "--concurrency", "2") for _ in range(3)]
    results = [finish(worker) for worker in workers]

    received = by_recipient(smtp_server)
    assert len(received) == rows
    assert all(len(ids) == 1 for ids in received.values())
    assert results[-1]["sent"] == rows and results[-1]["unknown"] == 0
    shares = [result["this_run"].get("sent", 0) for result in results]
    assert sum(shares) == rows
    assert all(share > 0 for share in shares), shares
    assert len({result["worker"] for result in results}) == 3


def test_a_killed_workers_rows_are_resent_by_the_others(
    postgres_url: str, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    rows = 3000
    make_campaign(postgres_url, tmp_path, rows, smtp_server.port)
    smtp_server.handler.data_delay = 0.002
    leased = postgres_url + "?lease=2"
    victim = start_worker(leased, smtp_server.port, tmp_path, "--concurrency", "2")
    others = [start_worker(leased, smtp_server.port, tmp_path, "--concurrency", "2") for _ in range(2)]
    mine = f"%:{victim.pid}:%"
    held: list[str] = []
    with psycopg.connect(postgres_url, autocommit=True) as db:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            holding = db.execute(
                "SELECT count(*) FROM mergekit_recipients WHERE state = 'sending' AND worker_id LIKE %s",
                (mine,),
            ).fetchone()
            if holding and holding[0] and len(smtp_server.snapshot()) >= 300:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                break
            time.sleep(0.01)
        # What the dead worker held: nobody touches it until its lease expires.
        held = [
            key
            for (key,) in db.execute(
                "SELECT key FROM mergekit_recipients WHERE state = 'sending' AND worker_id LIKE %s",
                (mine,),
            )
        ]
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert held, "the victim held no rows when it was killed"
    results = [finish(worker) for worker in others]

    received = by_recipient(smtp_server)
    final = results[-1]
    assert (final["sent"], final["unknown"], final["sending"], final["pending"]) == (rows, 0, 0, 0)
    lost = rows - len(received)
    duplicates = {key for key, ids in received.items() if len(ids) > 1}
    assert lost == 0
    assert duplicates <= set(held)
    assert all(len(set(received[key])) == 1 for key in duplicates)  # same Message-ID every time
    with psycopg.connect(postgres_url, autocommit=True) as db:
        recovered = db.execute(
            "SELECT key FROM mergekit_recipients WHERE unknown_count > 0 ORDER BY key"
        ).fetchall()
    assert sorted(key for (key,) in recovered) == sorted(held)
    print(
        f"kill trial: rows={rows} kills=1 unknown={len(held)} duplicates={len(duplicates)} lost={lost}",
        file=sys.stderr,
    )


def test_campaign_rate_holds_across_three_workers(
    postgres_url: str, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    rows, rate = 2000, 200.0
    make_campaign(postgres_url, tmp_path, rows, smtp_server.port, rate=Rate(rate, 1.0))
    workers = [start_worker(postgres_url, smtp_server.port, tmp_path, "--batch-size", "20") for _ in range(3)]
    results = [finish(worker) for worker in workers]

    times = sorted(at for at, _, _ in smtp_server.snapshot())
    assert len(times) == rows
    # Over the run: the first batch of 20 leaves at once, each later one 20/rate after the last.
    measured = (rows - 20) / (times[-1] - times[0])
    assert rate * 0.9 <= measured <= rate * 1.1, measured
    shares = Counter({result["worker"]: result["this_run"].get("sent", 0) for result in results})
    assert sum(shares.values()) == rows
    assert all(shares.values()), shares
    print(
        f"rate trial: {measured:.1f} msg/s over {times[-1] - times[0]:.2f}s, {dict(shares)}", file=sys.stderr
    )


pytestmark = pytest.mark.timeout(180)
