"""A SQLite ledger whose storage fails mid-run: a full disk, a deleted or damaged file, a
read-only file system. Each must end the run with one line naming the ledger and what to do
(exit 3 while rows remain), and the same command run again once the fault is gone must finish
the campaign with no recipient lost and no copy beyond a counted ``unknown`` one.

The ledger lives on a small tmpfs this test mounts, so it needs root (CI runs as root) and
says why it skips otherwise. Judged by what reached the SMTP server and by ``status --json``
and ``report``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import send_command, wait_until_received, write_campaign
from tests.smtpd import SmtpServer

ROWS = 300
OPTIONS = ("--concurrency", "2", "--batch-size", "10")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs for the ledger, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the ledger (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    started = SmtpServer(data_delay=0.003).start()  # slow enough that a fault lands mid-run
    yield started
    started.stop()


@dataclass
class Campaign:
    folder: Path
    ledger: Path
    command: list[str]

    def start(self, server: SmtpServer) -> subprocess.Popen[str]:
        """The send, returned once the server holds 60 of its messages."""
        process = subprocess.Popen(
            self.command, cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        wait_until_received(process, server, 60)
        return process

    def send(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command, cwd=self.folder, capture_output=True, text=True, timeout=120)

    def resumes_to_the_end(self, server: SmtpServer) -> None:
        """The same send, run again once the fault is gone, finishes the campaign with nothing lost."""
        rerun = self.send()
        assert rerun.returncode == 0, rerun.stderr
        assert_complete(self, server)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--ledger", str(self.ledger), cwd=self.folder)


def campaign(tmp_path: Path, tmpfs: Path, server: SmtpServer, *extra: str) -> Campaign:
    recipients, template = write_campaign(tmp_path, ROWS)
    ledger = tmpfs / "mergekit.db"
    command = send_command(recipients, template, server.url, "--ledger", str(ledger), *OPTIONS, *extra)
    return Campaign(tmp_path, ledger, command)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("Error", "Traceback"))]


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The run ended with ``code`` and exactly one ``Error: ledger …`` line holding ``words``."""
    lines = error_lines(done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ledger "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert done.returncode == code, done.stderr
    return lines[0]


def finish(run: Campaign, process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(run.command, process.returncode, out, err)


def assert_complete(run: Campaign, server: SmtpServer) -> tuple[int, int]:
    """After the rerun: every recipient has its message, each extra copy is a counted ``unknown``
    row's with one Message-ID. Returns (duplicate copies, rows counted unknown)."""
    status = run.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert counts["sent"] == ROWS and counts["total"] == ROWS, counts
    report = run.cli("report", "--format", "json")
    rows = {row["email"]: row for row in json.loads(report.stdout)}
    received = server.handler.by_recipient()
    assert set(received) == set(rows), "a recipient got no message"
    duplicates = 0
    for address, copies in received.items():
        if len(copies) > 1:
            duplicates += len(copies) - 1
            assert rows[address]["unknown_count"] > 0, f"{address}: an uncounted copy"
            assert {copy.message_id for copy in copies} == {rows[address]["message_id"]}
    counted = sum(row["unknown_count"] > 0 for row in rows.values())
    print(f"after rerun: lost=0 duplicates={duplicates} counted_unknown={counted}", file=sys.stderr)
    return duplicates, counted


@pytest.mark.parametrize("processes", ["1", "2"])
def test_full_disk_mid_run(tmp_path: Path, tmpfs: Path, server: SmtpServer, processes: str) -> None:
    run = campaign(tmp_path, tmpfs, server, "--processes", processes)
    process = run.start(server)
    filler = tmpfs / "filler"
    with filler.open("wb") as file, contextlib.suppress(OSError):  # until the disk is full
        while True:
            file.write(b"\0" * 65536)
            file.flush()
    done = finish(run, process)
    assert len(server.messages) < ROWS, "the run ended before the disk filled: nothing was tested"
    assert_one_line_error(done, 3, str(run.ledger), "disk holding it is full", "Free some space")

    filler.unlink()
    run.resumes_to_the_end(server)


def test_ledger_deleted_mid_run_is_written_back(tmp_path: Path, tmpfs: Path, server: SmtpServer) -> None:
    run = campaign(tmp_path, tmpfs, server)
    process = run.start(server)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{run.ledger}{suffix}").unlink()
    done = finish(run, process)
    assert len(server.messages) < ROWS, "the run ended before the file went: nothing was tested"
    assert_one_line_error(done, 3, "deleted", f"back to {run.ledger}", "run the same command again")
    assert run.ledger.exists()

    run.resumes_to_the_end(server)


def test_read_only_ledger_at_resume(tmp_path: Path, tmpfs: Path, server: SmtpServer) -> None:
    """A file system cannot be remounted read-only under a process writing to it (the kernel
    answers EBUSY), so the read-only ledger meets the run that resumes."""
    run = campaign(tmp_path, tmpfs, server)
    process = run.start(server)
    process.terminate()
    stopped = finish(run, process)
    assert stopped.returncode == 3, stopped.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    before = len(server.messages)
    try:
        done = run.send()
        assert_one_line_error(done, 3, str(run.ledger), "read-only", "Make it writable")
        assert len(server.messages) == before  # nothing left without its row being marked first
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)

    run.resumes_to_the_end(server)


def test_damaged_ledger_is_refused_with_what_to_do(tmp_path: Path, tmpfs: Path, server: SmtpServer) -> None:
    run = campaign(tmp_path, tmpfs, server)
    process = run.start(server)
    process.terminate()
    assert finish(run, process).returncode == 3
    before = len(server.messages)
    size = run.ledger.stat().st_size
    with run.ledger.open("r+b") as file:  # every page after the first: the tables' b-trees
        file.seek(4096)
        file.write(os.urandom(size - 4096))

    done = run.send()
    # Found when the command opens it: exit 2, nothing started (mid-run it would be 3).
    assert_one_line_error(done, 2, str(run.ledger), "damaged", "new ledger", "backup", ".recover")
    assert len(server.messages) == before  # nothing sent from a ledger it cannot trust
    status = run.cli("status")
    assert_one_line_error(status, status.returncode, "damaged")
