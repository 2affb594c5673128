"""Crash trials: SIGKILL ``mergekit send`` at random moments, resume, and count what was lost.

``python -m benchmarks.crash_trials [--trials 30] [--rows 200] [--seed 1]``

Each trial writes a campaign, starts a recording SMTP server (aiosmtpd, in this
process) and runs ``mergekit send`` as a user would, in a subprocess, killing it
with SIGKILL one to three times, each time at a moment chosen by one of:

- ``random``: after a random delay since the process started (import, ingest,
  claim, render, send or commit: wherever it happens to be);
- ``commit``: the n-th time the ledger's write-ahead log changes, i.e. while or
  just after SQLite writes a transaction (a watcher thread polls the -wal file);
- ``mid-data``: when the server has sent the 354 for the n-th message and its
  content is on its way;
- ``after-data``: when the server has taken the n-th message but before its
  250 goes out (the reply the client never reads).

Then ``mergekit send`` runs once more, unkilled, to completion. The trial
counts the server's copies against the ledger: **lost** (a row not ``sent``, or
a recipient with no copy) must be 0, and every **duplicate** (a second copy)
must belong to a row the ledger counted ``unknown`` and carry the same
Message-ID as the first copy. The table at the end sums the trials.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.faultsmtpd import Faults, FaultServer
from tests.helpers import write_campaign

MODES = ("random", "commit", "mid-data", "after-data")
RUN_TIMEOUT = 120.0  # seconds for the final, unkilled run


@dataclass
class Trial:
    """One trial's figures."""

    mode: str
    kills: int = 0
    rows: int = 0
    copies: int = 0
    unknown: int = 0  # rows the ledger counted unknown at least once
    duplicates: int = 0  # copies beyond the first
    lost: int = 0
    bad_duplicates: int = 0  # duplicates not explained by an unknown row with the same Message-ID
    kill_points: list[str] = field(default_factory=list)


class Killer:
    """Kills the current ``mergekit send`` when the chosen moment comes."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.target: tuple[str, int] | None = None  # (server event, message number)
        self.killed_at = ""

    def kill(self, why: str) -> None:
        with self.lock:
            process = self.process
            if process is not None and process.poll() is None and not self.killed_at:
                os.kill(process.pid, signal.SIGKILL)
                self.killed_at = why

    def on_data(self, event: str, number: int) -> None:
        # ">=": with several connections the numbers seen at the 354 can skip the target.
        if self.target and event == self.target[0] and number >= self.target[1]:
            self.kill(f"{event} of message {number}")


def mergekit(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mergekit", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def watch_wal(path: Path, changes: int, killer: Killer, stop: threading.Event) -> None:
    """Kill at the ``changes``-th change of the -wal file's size or time: inside a commit."""
    seen = 0
    last: tuple[int, int] | None = None
    while not stop.is_set():
        try:
            st = os.stat(path)
            now = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            now = None
        if now is not None and now != last:
            if last is not None:
                seen += 1
                if seen >= changes:
                    killer.kill(f"commit (wal change {seen})")
                    return
            last = now


def run_trial(
    number: int, mode: str, rows: int, rng: random.Random, folder: Path, duration: float = 2.0
) -> Trial:
    """One campaign, killed one to three times by ``mode``, then resumed; ``duration`` bounds random kills."""
    trial = Trial(mode, rows=rows)
    killer = Killer()
    server = FaultServer(Faults(data_delay=0.002, on_data=killer.on_data)).start()
    try:
        recipients, template = write_campaign(folder, rows)
        ledger = folder / "ledger.db"
        args = [
            "send",
            str(recipients),
            str(template),
            "--transport",
            f"smtp://127.0.0.1:{server.port}",
            "--ledger",
            str(ledger),
            "--concurrency",
            "4",
            "--batch-size",
            "20",
            "--json",
        ]
        for _ in range(rng.randint(1, 3)):
            killer.killed_at = ""
            killer.target = None
            stop = threading.Event()
            before = len(server.messages)
            left = rows - before
            if mode in ("mid-data", "after-data"):
                killer.target = (
                    "during-data" if mode == "mid-data" else "after-data",
                    before + rng.randint(1, max(1, min(left, rows // 2))),
                )
            process = mergekit(args, folder)
            killer.process = process
            watcher = None
            if mode == "commit":
                watcher = threading.Thread(
                    target=watch_wal,
                    args=(Path(f"{ledger}-wal"), rng.randint(1, 12), killer, stop),
                    daemon=True,
                )
                watcher.start()
            elif mode == "random":
                delay = rng.uniform(0.05, duration)
                timer = threading.Timer(delay, killer.kill, args=(f"random {delay:.2f}s",))
                timer.daemon = True
                timer.start()
            try:
                process.communicate(timeout=RUN_TIMEOUT)
            finally:
                stop.set()
                if watcher is not None:
                    watcher.join()
            if killer.killed_at:
                trial.kills += 1
                trial.kill_points.append(killer.killed_at)
        killer.target = None
        killer.process = None
        final = mergekit(args, folder)
        _out, err = final.communicate(timeout=RUN_TIMEOUT)
        if final.returncode != 0:
            raise RuntimeError(f"trial {number}: the final run exited {final.returncode}: {err.decode()}")
        report = subprocess.run(
            [sys.executable, "-m", "mergekit", "report", "--ledger", str(ledger), "--format", "json"],
            capture_output=True,
            check=True,
            cwd=folder,
        )
        ledger_rows = {row["email"]: row for row in json.loads(report.stdout)}
        received = server.handler.by_recipient()
        trial.copies = len(server.messages)
        trial.unknown = sum(1 for row in ledger_rows.values() if row["unknown_count"] > 0)
        for email, row in ledger_rows.items():
            copies = received.get(email, [])
            if row["state"] != "sent" or not copies:
                trial.lost += 1
            if len(copies) > 1:
                trial.duplicates += len(copies) - 1
                ids = {copy.parsed()["Message-ID"] for copy in copies}
                if row["unknown_count"] < 1 or ids != {row["message_id"]}:
                    trial.bad_duplicates += len(copies) - 1
        return trial
    finally:
        server.stop()


def calibrate(rows: int) -> float:
    """Seconds an unkilled ``mergekit send`` of ``rows`` takes here, start-up included."""
    with tempfile.TemporaryDirectory(prefix="mergekit-crash-") as folder:
        server = FaultServer(Faults(data_delay=0.002)).start()
        try:
            recipients, template = write_campaign(Path(folder), rows)
            started = time.monotonic()
            args = ["send", str(recipients), str(template), "--transport", f"smtp://127.0.0.1:{server.port}"]
            mergekit([*args, "--concurrency", "4", "--batch-size", "20"], Path(folder)).communicate()
            return time.monotonic() - started
        finally:
            server.stop()


def run_trials(trials: int, rows: int, seed: int) -> list[Trial]:
    """``trials`` trials, the kill modes in turn; random kills fall within a calibrated run's time."""
    rng = random.Random(seed)
    duration = calibrate(rows)
    results = []
    for number in range(1, trials + 1):
        mode = MODES[(number - 1) % len(MODES)]
        with tempfile.TemporaryDirectory(prefix="mergekit-crash-") as folder:
            results.append(run_trial(number, mode, rows, rng, Path(folder), duration))
    return results


def table(results: list[Trial]) -> str:
    """The summary table: one line per kill mode and a total."""
    lines = [
        f"{'mode':<11} {'trials':>6} {'kills':>5} {'rows':>6} {'copies sent':>11} "
        f"{'unknown':>7} {'duplicates':>10} {'lost':>4} {'bad dup':>7}"
    ]
    groups: dict[str, list[Trial]] = {}
    for trial in results:
        groups.setdefault(trial.mode, []).append(trial)
    groups["total"] = results
    for name, group in groups.items():
        total = Counter[str]()
        for trial in group:
            total.update({k: v for k, v in asdict(trial).items() if isinstance(v, int)})
        lines.append(
            f"{name:<11} {len(group):>6} {total['kills']:>5} {total['rows']:>6} {total['copies']:>11} "
            f"{total['unknown']:>7} {total['duplicates']:>10} {total['lost']:>4} {total['bad_duplicates']:>7}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="also print every trial as JSON")
    options = parser.parse_args()
    started = time.monotonic()
    results = run_trials(options.trials, options.rows, options.seed)
    if options.json:
        for trial in results:
            print(json.dumps(asdict(trial)))
    print(table(results))
    print(f"{time.monotonic() - started:.0f} s, seed {options.seed}")
    if any(t.lost or t.bad_duplicates for t in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
