"""``mergekit worker`` processes on a PostgreSQL ledger that fails under them: the server restarted
mid-run, a worker's connections killed, a worker paused past its lease. Nothing may be lost, and
copies may only be counted ``unknown`` rows' with one Message-ID. Judged by what reached the SMTP
server and by ``mergekit report``."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mergekit.errors import LedgerStorageError
from mergekit.ledger_postgres import PostgresLedger
from tests.conftest import REQUIRE_ENV, run_cli
from tests.helpers import wait_until_received
from tests.smtpd import SmtpServer
from tests.test_ledger_postgres import start
from tests.test_worker import by_recipient, make_campaign, start_worker

ROWS = 1500
CTL_ENV = "MERGEKIT_TEST_POSTGRES_CTL"


def outcome(worker: subprocess.Popen[str]) -> tuple[int, list[str]]:
    """The worker's exit code and its error lines (there must be no traceback)."""
    _, err = worker.communicate(timeout=150)
    assert "Traceback" not in err, err
    return worker.returncode, [line for line in err.splitlines() if line.startswith("Error")]


def finish_all(workers: list[subprocess.Popen[str]], url: str, port: int, tmp_path: Path) -> list[int]:
    """Wait for ``workers``; one that stopped on a ledger fault (exit 3, one line) is started again,
    as its operator would. Returns the first exit codes."""
    codes = []
    for worker in workers:
        code, errors = outcome(worker)
        codes.append(code)
        if code != 0:
            assert code == 3 and len(errors) == 1 and errors[0].startswith("Error: ledger "), errors
            again, errors = outcome(start_worker(url, port, tmp_path))
            assert again == 0, errors
    return codes


def assert_nothing_lost(url: str, server: SmtpServer, tmp_path: Path) -> dict[str, int]:
    """Every recipient got its message; every extra copy is a counted unknown row's, one Message-ID."""
    report = run_cli("report", "--ledger", url, "--format", "json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = {row["email"]: row for row in json.loads(report.stdout)}
    assert {row["state"] for row in rows.values()} == {"sent"}
    received = by_recipient(server)
    assert set(received) == set(rows), "a recipient got no message"
    duplicates = uncounted = 0
    for address, ids in received.items():
        duplicates += len(ids) - 1
        row = rows[address]
        if len(ids) > 1 and (row["unknown_count"] == 0 or set(ids) != {row["message_id"]}):
            uncounted += len(ids) - 1
    assert uncounted == 0
    found = {
        "lost": 0,
        "duplicates": duplicates,
        "counted_unknown": sum(row["unknown_count"] > 0 for row in rows.values()),
    }
    print(f"after the fault: {found}", file=sys.stderr)
    return found


def pg_ctl() -> list[str]:
    command = os.environ.get(CTL_ENV)
    if not command:
        reason = f"needs {CTL_ENV} (set by .ci/with-postgres) to restart the server"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return shlex.split(command)


def test_server_restarted_mid_run(postgres_url: str, smtp_server: SmtpServer, tmp_path: Path) -> None:
    ctl = pg_ctl()
    make_campaign(postgres_url, tmp_path, ROWS, smtp_server.port)
    smtp_server.handler.data_delay = 0.002
    url = postgres_url + "?lease=5"
    workers = [start_worker(url, smtp_server.port, tmp_path, "--concurrency", "2") for _ in range(2)]
    wait_until_received(workers[0], smtp_server, 300)
    assert all(worker.poll() is None for worker in workers), "a worker ended before the restart"
    subprocess.run([*ctl, "-w", "-t", "60", "-m", "fast", "restart"], check=True, capture_output=True)
    codes = finish_all(workers, url, smtp_server.port, tmp_path)
    found = assert_nothing_lost(postgres_url, smtp_server, tmp_path)
    print(f"restart: worker exits {codes}, {found}", file=sys.stderr)


def test_a_workers_connections_killed(postgres_url: str, smtp_server: SmtpServer, tmp_path: Path) -> None:
    make_campaign(postgres_url, tmp_path, ROWS, smtp_server.port)
    smtp_server.handler.data_delay = 0.002
    url = postgres_url + "?lease=5"
    victim, other = (start_worker(url, smtp_server.port, tmp_path, "--concurrency", "2") for _ in range(2))
    wait_until_received(victim, smtp_server, 300)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        killed = db.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name LIKE %s",
            (f"mergekit %:{victim.pid}:%",),
        ).fetchone()
    assert killed and killed[0] == 2, "the victim's two connections were not found"
    codes = finish_all([victim, other], url, smtp_server.port, tmp_path)
    found = assert_nothing_lost(postgres_url, smtp_server, tmp_path)
    print(f"terminate: worker exits {codes}, {found}", file=sys.stderr)


def held_by(db: psycopg.Connection[Any], pid: int) -> set[str]:
    return {
        email
        for (email,) in db.execute(
            "SELECT email FROM mergekit_recipients WHERE state = 'sending' AND worker_id LIKE %s",
            (f"%:{pid}:%",),
        )
    }


def test_a_worker_paused_past_its_lease(postgres_url: str, smtp_server: SmtpServer, tmp_path: Path) -> None:
    make_campaign(postgres_url, tmp_path, ROWS, smtp_server.port)
    smtp_server.handler.data_delay = 0.002
    url = postgres_url + "?lease=2"
    victim, other = (start_worker(url, smtp_server.port, tmp_path, "--concurrency", "2") for _ in range(2))
    with psycopg.connect(postgres_url, autocommit=True) as db:
        deadline = time.monotonic() + 60
        while not (held := held_by(db, victim.pid)) or len(smtp_server.snapshot()) < 300:
            assert time.monotonic() < deadline and victim.poll() is None, "the victim never held rows"
            time.sleep(0.01)
        victim.send_signal(signal.SIGSTOP)
        try:
            # Its lease lapses; the other worker recovers its rows and sends them.
            deadline = time.monotonic() + 60
            while held_by(db, victim.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            taken = db.execute(
                "SELECT count(*) FROM mergekit_recipients WHERE email = ANY(%s) AND unknown_count > 0",
                (list(held),),
            ).fetchone()
            assert taken and taken[0] > 0, "nobody took the paused worker's rows over"
        finally:
            victim.send_signal(signal.SIGCONT)
    codes = finish_all([victim, other], url, smtp_server.port, tmp_path)
    found = assert_nothing_lost(postgres_url, smtp_server, tmp_path)
    received = by_recipient(smtp_server)
    assert {address for address, ids in received.items() if len(ids) > 1} <= held
    # Only the batches on the wire went twice, not those it had claimed and rendered next.
    assert found["duplicates"] < len(held), "the paused worker sent rows another worker had taken"
    print(f"pause: worker exits {codes}, held={len(held)}, {found}", file=sys.stderr)


def test_a_server_gone_for_good_is_one_error(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the reconnect window the operation fails as a LedgerStorageError (one line, exit 3)."""
    ctl = pg_ctl()
    ledger = PostgresLedger(postgres_url)
    campaign = start(ledger)
    monkeypatch.setattr("mergekit.ledger_postgres.RECONNECT_WINDOW", 1.0)
    subprocess.run([*ctl, "-w", "-m", "fast", "stop"], check=True, capture_output=True)
    try:
        with pytest.raises(LedgerStorageError) as raised:
            ledger.counts(campaign)
    finally:  # restart reads the options of the last start (postmaster.opts), port included
        subprocess.run([*ctl, "-w", "-t", "60", "restart"], check=True, capture_output=True)
    message = str(raised.value)
    assert message.startswith("ledger postgresql://") and "could not reconnect for 1 s" in message
    assert "\n" not in message and raised.value.exit_code == 3
    assert ledger.counts(campaign)["pending"] == 0  # and back once the server is
    ledger.close()


pytestmark = pytest.mark.timeout(240)
