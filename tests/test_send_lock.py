"""One send per ledger file: a second run by any path to the same file is refused and changes nothing.

A first ``send`` is held in DATA by a server that never answers, so it stays
alive holding the ledger; every other run (``send`` with another template and
settings, another campaign, ``retry``, ``worker``) goes through a symlink, a
hard link, a ``dir/../`` path or the same path, to a second server. Judged by
what reached that server and by ``status --json`` / ``report``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mergekit.errors import LedgerBusyError
from mergekit.ledger import SqliteLedger
from tests.conftest import run_cli
from tests.helpers import TEMPLATE, send_command, write_campaign
from tests.smtpd import SmtpServer

CHANGED = TEMPLATE.replace("Subject: Hello", "Subject: Changed")
SECRET = {"MERGEKIT_UNSUBSCRIBE_SECRET": "s3cret"}
ROWS = 5


def _path_form(form: str, ledger: Path, tmp_path: Path) -> str:
    """The ledger file under another name: the same path, a symlink, a hard link, or via ``..``."""
    if form == "symlink":
        link = tmp_path / "elsewhere" / "link.db"
        link.parent.mkdir()
        link.symlink_to(ledger)
        return str(link)
    if form == "hard link":
        link = tmp_path / "hard.db"
        os.link(ledger, link)
        return str(link)
    if form == "dir/..":
        (ledger.parent / "sub").mkdir()
        return str(ledger.parent / "sub" / ".." / ledger.name)
    return str(ledger)


def _snapshot(folder: Path) -> tuple[dict[str, object], list[dict[str, object]]]:
    status = run_cli("status", "--json", "--campaign", "news", cwd=folder)
    report = run_cli("report", "--format", "json", "--campaign", "news", cwd=folder)
    return json.loads(status.stdout), json.loads(report.stdout)


def _start_held_send(folder: Path, held: SmtpServer) -> subprocess.Popen[str]:
    recipients, template = folder / "recipients.csv", folder / "template.txt"
    args = send_command(recipients, template, held.url, "--campaign", "news", "--concurrency", "1",
                        "--batch-size", "1")  # fmt: skip
    first = subprocess.Popen(args, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not held.handler.transactions and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()
    time.sleep(0.5)  # in DATA now, and the next batch claimed: the ledger stands still
    return first


def _second_runs(folder: Path, location: str, spare: SmtpServer) -> list[subprocess.CompletedProcess[str]]:
    """Every command that would write to the ledger, through ``location``, to the spare server."""
    recipients, changed = folder / "recipients.csv", folder / "changed.txt"
    common = ("--ledger", location, "--transport", spare.url)
    changed_send = ("send", str(recipients), str(changed), "--campaign", "news", "--allow-template-change",
                    "--unsubscribe-url", "https://example.com/u/{token}", "--max-attempts", "9")  # fmt: skip
    other_send = ("send", str(recipients), str(folder / "template.txt"), "--campaign", "other")
    return [
        run_cli(*changed_send, *common, cwd=folder, env=SECRET),
        run_cli(*other_send, *common, cwd=folder),
        run_cli("retry", "--campaign", "news", *common, cwd=folder),
        run_cli("worker", "--campaign", "news", *common, cwd=folder),
    ]


@pytest.mark.parametrize("form", ["same path", "symlink", "hard link", "dir/.."])
def test_a_second_run_by_any_path_is_refused_and_changes_nothing(form: str, tmp_path: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    write_campaign(folder, ROWS)
    (folder / "changed.txt").write_text(CHANGED, encoding="utf-8")
    held, spare = SmtpServer(data_delay=600).start(), SmtpServer().start()
    first = _start_held_send(folder, held)
    try:
        before = _snapshot(folder)
        assert before[0]["sending"] >= 1  # the first run holds the ledger: its rows show as sending
        location = _path_form(form, folder / "mergekit.db", tmp_path)
        for run in _second_runs(folder, location, spare):
            assert run.returncode == 2, (run.args, run.stdout, run.stderr)
            assert len(run.stderr.splitlines()) == 1, run.stderr
            if form == "hard link":  # refused before SQLite opens it (see the test below)
                assert "2 names (hard links)" in run.stderr, run.stderr
            else:
                assert f"being sent by another mergekit (pid {first.pid})" in run.stderr, run.stderr
        assert spare.messages == []
        seen = run_cli("status", "--json", "--ledger", location, cwd=folder)
        if form == "hard link":  # while the file has two names, both are refused, readers too
            assert seen.returncode == 2 and "2 names (hard links)" in seen.stderr
            os.unlink(location)
        else:  # status through the other name sees the first run as running
            assert json.loads(seen.stdout)["sending"] == before[0]["sending"]
        assert _snapshot(folder) == before
        first.send_signal(signal.SIGKILL)  # the kernel releases the lock with the process
        first.wait(timeout=30)
        # The run after: the first run's template and settings, none of the refused runs'.
        retried = run_cli("retry", "--campaign", "news", "--transport", spare.url, cwd=folder)
        assert retried.returncode == 0, retried.stderr
        assert len(spare.messages) == ROWS
        for message in spare.messages:
            parsed = message.parsed()
            assert parsed["Subject"].startswith("Hello "), parsed["Subject"]
            assert parsed["List-Unsubscribe"] is None
        status, report = _snapshot(folder)
        assert status["sent"] == ROWS and status["total"] == ROWS
        by_email = {m.rcpt_tos[0]: m.message_id for m in spare.messages}
        assert {row["email"]: row["message_id"] for row in report} == by_email
        other = run_cli("status", "--campaign", "other", cwd=folder)
        assert other.returncode == 2 and "there is no campaign 'other'" in other.stderr
        again = run_cli("send", "recipients.csv", "template.txt", "--campaign", "news",
                        "--transport", spare.url, cwd=folder)  # fmt: skip
        assert again.returncode == 0, again.stderr  # not refused as "the template changed"
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
        held.stop()
        spare.stop()


def _children(pid: int) -> list[int]:
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def _gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_forked_sending_processes_hold_the_lock_until_the_last_one_dies(tmp_path: Path) -> None:
    """The lock is the kernel's: SIGKILL releases it, and the forked senders share it with the parent."""
    write_campaign(tmp_path, 8)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link.db"
    link.symlink_to(tmp_path / "mergekit.db")
    held, spare = SmtpServer(data_delay=600).start(), SmtpServer().start()
    args = send_command(tmp_path / "recipients.csv", tmp_path / "template.txt", held.url,
                        "--processes", "2", "--concurrency", "2", "--batch-size", "1")  # fmt: skip
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while held.handler.transactions < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        children = _children(first.pid)
        assert len(children) == 1 and held.handler.transactions == 2, (children, first.poll())
        first.kill()  # the child, told by the kernel, stops too, but waits for its batch (30 s)
        first.wait(timeout=30)
        again = ("send", "recipients.csv", "template.txt", "--ledger", str(link), "--transport", spare.url)
        refused = run_cli(*again, cwd=tmp_path)
        assert refused.returncode == 2 and "is being sent by another mergekit" in refused.stderr
        os.kill(children[0], signal.SIGKILL)
        _gone(children)
        finished = run_cli(*again, "--json", cwd=tmp_path)
        assert finished.returncode == 0, finished.stderr
        assert json.loads(finished.stdout)["sent"] == 8
        assert len(spare.handler.by_recipient()) == 8 and len(spare.messages) == 8
    finally:
        if first.poll() is None:
            first.kill()
        held.stop()
        spare.stop()


def test_ledgers_of_one_process_on_one_file_share_its_lock(tmp_path: Path, smtp_server: SmtpServer) -> None:
    """Two ledgers of one process (a library caller's) on one file: the second is refused, and
    closing it neither drops the first's lock nor SQLite's own (one descriptor per file)."""
    write_campaign(tmp_path, 3)
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "mergekit.db")
    first = SqliteLedger(str(tmp_path / "mergekit.db"))
    try:
        first.lock_for_send("news")
        second = SqliteLedger(str(link))
        with pytest.raises(LedgerBusyError, match=rf"campaign 'news' .* \(pid {os.getpid()}\)"):
            second.lock_for_send("other")
        second.close()
        again = ("send", "recipients.csv", "template.txt", "--transport", smtp_server.url)
        refused = run_cli(*again, cwd=tmp_path)
        assert refused.returncode == 2 and f"(pid {os.getpid()})" in refused.stderr
    finally:
        first.close()
    assert run_cli(*again, cwd=tmp_path).returncode == 0
    assert len(smtp_server.messages) == 3
