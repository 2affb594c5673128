"""Crash trials in short (the full run is ``python -m benchmarks.crash_trials``), and two sends at once."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.crash_trials import calibrate, run_trial
from tests.conftest import ROOT
from tests.helpers import send_command, write_campaign
from tests.smtpd import SmtpServer

CRASH_OPTIONS = ("--concurrency", "2", "--batch-size", "10")


@pytest.mark.parametrize("mode", ["commit", "mid-data", "after-data", "random"])
def test_sigkill_then_resume_loses_nothing(mode: str, tmp_path: Path) -> None:
    duration = calibrate(100) if mode == "random" else 2.0
    trial = run_trial(1, mode, 100, random.Random(f"{mode}-7"), tmp_path, duration)
    assert trial.lost == 0
    assert trial.bad_duplicates == 0  # every extra copy: an unknown row, the same Message-ID
    assert trial.duplicates <= trial.unknown * 3  # at most one copy per unknown episode (1-3 kills)
    assert trial.copies == trial.rows + trial.duplicates
    if mode != "random":  # the other modes fire at a message number the campaign reaches
        assert trial.kills >= 1


def test_second_send_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    server = SmtpServer(data_delay=0.02).start()  # 4 s or more: the second run starts and ends within
    try:
        recipients, template = write_campaign(tmp_path, 400)
        args = send_command(recipients, template, f"smtp://127.0.0.1:{server.port}", *CRASH_OPTIONS)
        first = subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        while len(server.messages) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = len(server.messages)
        second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert first.poll() is None, "the first send ended before the second started: nothing was tested"
        assert second.returncode == 2
        assert second.stderr == (
            f"Error: ledger mergekit.db: campaign 'recipients-template' is being sent by another "
            f"mergekit (pid {first.pid}). Wait for it to finish (mergekit status shows progress), "
            "or stop it first; one send at a time per ledger file\n"
        )
        assert second.stdout == ""
        _out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert len(server.messages) >= before
        received = server.handler.by_recipient()
        assert len(server.messages) == 400
        assert all(len(copies) == 1 for copies in received.values()) and len(received) == 400
        # status works while and after: the lock does not stop readers.
        status = subprocess.run(
            [sys.executable, "-m", "mergekit", "status", "--json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert json.loads(status.stdout)["sent"] == 400
    finally:
        server.stop()


def test_two_sends_started_together_never_double_send(tmp_path: Path) -> None:
    server = SmtpServer(data_delay=0.003).start()
    try:
        recipients, template = write_campaign(tmp_path, 200)
        args = send_command(recipients, template, f"smtp://127.0.0.1:{server.port}", *CRASH_OPTIONS, "--json")
        both = [
            subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = [(p.wait(timeout=120), *p.communicate()) for p in both]
        codes = sorted(code for code, _, _ in results)
        # One sends everything; the other is refused, or (if it came second) finds nothing left.
        assert codes in ([0, 2], [0, 0]), results
        for code, _out, err in results:
            if code == 2:
                assert "is being sent by another mergekit" in err and len(err.splitlines()) == 1
        received = server.handler.by_recipient()
        assert len(received) == 200 and all(len(copies) == 1 for copies in received.values())
    finally:
        server.stop()


def test_crash_trials_script_runs() -> None:
    """The benchmark's own entry point, as the README quotes it (one short trial)."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.crash_trials", "--trials", "1", "--rows", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout and "lost" in result.stdout
