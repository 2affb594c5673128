"""Several sending processes on one SQLite campaign: every row once, stops and crashes included."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mergekit.dispatch import Rate, SendOptions
from mergekit.ledger import SqliteLedger
from mergekit.senders import sending_processes
from mergekit.workers import MIN_ROWS_FOR_WORKERS
from tests.helpers import send_command, signal_when_received, wait_until_received, write_campaign
from tests.smtpd import SmtpServer

SHARED = ("--processes", "2", "--concurrency", "4", "--batch-size", "20")


def _report(folder: Path) -> dict[str, dict[str, object]]:
    found = subprocess.run(
        [sys.executable, "-m", "mergekit", "report", "--format", "json"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    return {row["email"]: row for row in json.loads(found.stdout)}


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def _assert_each_row_once_or_unknown(folder: Path, server: SmtpServer, rows: int) -> None:
    """Every row sent and received; a second copy only of a row once ``unknown``, same Message-ID."""
    ledger = _report(folder)
    received = server.handler.by_recipient()
    assert len(ledger) == rows
    for email, row in ledger.items():
        copies = received.get(email, [])
        assert row["state"] == "sent" and copies, f"{email} lost: {row}"
        if len(copies) > 1:
            assert row["unknown_count"], f"{email} sent {len(copies)} times, never unknown"
            assert {copy.parsed()["Message-ID"] for copy in copies} == {row["message_id"]}


def test_two_processes_send_every_row_once(tmp_path: Path) -> None:
    server = SmtpServer().start()
    try:
        recipients, template = write_campaign(tmp_path, 600)
        args = send_command(recipients, template, server.url, *SHARED, "--json")
        run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "sending up to 600 rows from 2 processes" in run.stderr
        assert json.loads(run.stdout)["sent"] == 600
        received = server.handler.by_recipient()
        assert len(received) == 600 and all(len(copies) == 1 for copies in received.values())
        assert server.stats.most_at_once <= 4  # --concurrency is shared, not given to each
    finally:
        server.stop()


def _start_shared_send(
    folder: Path, server: SmtpServer, rows: int
) -> tuple[subprocess.Popen[str], list[str]]:
    """A two-process ``mergekit send --json`` of ``rows`` rows under way, and its command."""
    recipients, template = write_campaign(folder, rows)
    args = send_command(recipients, template, server.url, *SHARED, "--json")
    process = subprocess.Popen(args, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, args


def test_sigterm_stops_every_process_and_the_next_run_finishes(tmp_path: Path) -> None:
    server = SmtpServer(data_delay=0.002).start()
    try:
        first, args = _start_shared_send(tmp_path, server, 1500)
        signal_when_received(first, server, 200, signal.SIGTERM)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 3, err  # stopped: resumable
        stopped = json.loads(out)
        assert stopped["sending"] == 0  # both processes committed what they had sent
        assert 200 <= stopped["sent"] < 1500
        assert stopped["sent"] == len(server.messages)
        second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        received = server.handler.by_recipient()
        assert len(received) == 1500 and all(len(copies) == 1 for copies in received.values())
    finally:
        server.stop()


def test_a_killed_sending_process_loses_no_row(tmp_path: Path) -> None:
    server = SmtpServer(data_delay=0.002).start()
    try:
        first, args = _start_shared_send(tmp_path, server, 1500)
        wait_until_received(first, server, 200)
        children = _children(first.pid)
        assert len(children) == 1, f"expected one forked sending process, found {children}"
        subprocess.run(["kill", "-KILL", str(children[0])], check=True)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 3, err  # the rows the child held stay sending: resumable
        assert f"sending process {children[0]} ended with exit code -9" in err
        assert json.loads(out)["sending"] > 0
        second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["recovered_unknown"] > 0
        _assert_each_row_once_or_unknown(tmp_path, server, 1500)
    finally:
        server.stop()


def test_processes_with_a_rate_is_refused_before_sending(tmp_path: Path) -> None:
    server = SmtpServer().start()
    try:
        recipients, template = write_campaign(tmp_path, 10)
        args = send_command(recipients, template, server.url, "--processes", "2", "--rate", "10/s")
        run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2
        refusal = "Error: option --processes: a --rate needs one sending process. Drop --processes\n"
        assert run.stderr == refusal
        assert server.messages == []
    finally:
        server.stop()


def test_one_process_for_small_runs_dry_runs_and_rates(tmp_path: Path) -> None:
    ledger = SqliteLedger(str(tmp_path / "l.db"))
    try:
        many = SendOptions(concurrency=16)
        assert sending_processes(ledger, many, MIN_ROWS_FOR_WORKERS - 1) == 1
        assert sending_processes(ledger, SendOptions(concurrency=16, dry_run=True), 10**6) == 1
        assert sending_processes(ledger, SendOptions(concurrency=16, rate=Rate.parse("50/s")), 10**6) == 1
        assert sending_processes(ledger, SendOptions(concurrency=1, processes=2), 10**6) == 1
        # A fork would copy other threads' locks: a process running threads sends alone.
        alone = threading.active_count() > 1
        assert sending_processes(ledger, SendOptions(concurrency=4, processes=3), 10) == (1 if alone else 3)
    finally:
        ledger.close()
