"""Property-based stateful test of the ledger and dispatch (issue 13, "Tests").

A hypothesis ``RuleBasedStateMachine`` interleaves what users and servers do to a
campaign: CSV edits between runs (rows added, removed, reordered, an address
respelled), ``mergekit send`` and ``retry`` runs, the server answering a person
sent / transient / permanent / unknown (a real aiosmtpd server on 127.0.0.1),
crashes (a claim abandoned with its rows left ``sending``, or a subprocess
``mergekit send`` SIGKILLed while the server takes a message), suppression
lists growing (``--suppress FILE``) and the template changing (refused without
``--allow-template-change``, accepted with it). After every step it checks, by
what the server received and by ``mergekit status --json`` / ``report``:

- each canonical mailbox was received at most once, plus one copy per time its
  row was counted ``unknown``, every copy with one Message-ID, and at most one of
  its rows is ``sent``;
- no copy went to an address after a ``send`` was given a list that names it;
- every row is in exactly one known state, ``status --json`` counts equal the
  report's rows (``sending`` shows as ``unknown`` while no run holds the
  campaign), and the ledger holds one row per mailbox and occurrence any
  accepted CSV gave it;
- at the end, after the server recovers and a clean ``send`` and
  ``retry --failed``, nothing is left open and every mailbox not suppressed was
  received and has a ``sent`` row (no row lost).

Addresses are written in ASCII case and whitespace spellings, and one mailbox
in Unicode spellings too (NFC, the IDNA A-label, NFD, a full-width letter). A
``send`` while another holds the ledger is typed as the same path, through a
symlink, through a hard link or as ``dir/../``: it must be refused and change
nothing (not even the template).

Budget (environment):

- ``MERGEKIT_STATEFUL_EXAMPLES`` / ``MERGEKIT_STATEFUL_STEPS`` override the
  budget of the ``mergekit-stateful-<engine>`` settings profiles.

The figures of a run (examples, steps, seconds) print in the terminal summary.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mergekit.ledger import OPEN_STATES, STATES, open_ledger
from tests.stateful_world import OUTCOMES, World, canonical, people, spelling

PROFILE = "mergekit-stateful"
# Each step is a real run against a real server. 50 examples of up to 20 steps: ~60 examples,
# ~800 steps in 27 s on SQLite with 2 cores at load 3 (~50 s at load 7). A PostgreSQL example
# costs ~4x (a new database, leases to wait out), so that engine runs 12: ~230 steps, 26 s.
EXAMPLES = {"sqlite": 50, "postgresql": 12}
STEPS = int(os.environ.get("MERGEKIT_STATEFUL_STEPS", "20"))
for _engine, _examples in EXAMPLES.items():
    settings.register_profile(
        f"{PROFILE}-{_engine}",
        max_examples=int(os.environ.get("MERGEKIT_STATEFUL_EXAMPLES", _examples)),
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
STATS: Counter[str] = Counter()  # examples and steps run, for the terminal summary
PEOPLE = people()


class LedgerMachine(RuleBasedStateMachine):
    """One campaign in one ledger, driven by random steps; the model is what users did."""

    lease = 0.0  # seconds a dead run's rows stay claimed (SQLite: none, the lock dies with it)
    one_send_per_file = True  # a second send is refused (PostgreSQL: workers share a campaign)

    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.folder = Path(tempfile.mkdtemp(prefix="mergekit-stateful-"))
        self.world = World(self.folder, self.new_ledger())
        self.rows: list[tuple[str, str]] = []
        self.ingested: Counter[str] = Counter()  # mailbox -> most rows an accepted CSV gave it
        self.steered: set[str] = set()
        self.listed: set[str] = set()  # mailboxes in the suppression file no send has read yet
        self.suppressed_from: dict[str, int] = {}  # mailbox -> first copy index it may not have
        self.template = 0
        self.stored: int | None = None  # the template version the campaign holds
        self.world.write_template(0)

    def new_ledger(self) -> str:
        """Where this example's ledger lives: a new SQLite file."""
        return str(self.folder / "ledger.db")

    def drop_ledger(self) -> None:
        """Nothing to do: the SQLite file goes with the folder."""

    def _step(self) -> None:
        STATS["steps"] += 1

    def _write(self) -> None:
        self.world.write_csv(self.rows)

    @initialize(data=st.data(), count=st.integers(1, 4))
    def first_csv(self, data: st.DataObject, count: int) -> None:
        for _ in range(count):
            self._add(data)
        self._write()

    def _add(self, data: st.DataObject) -> None:
        person = data.draw(st.sampled_from(PEOPLE), label="person")
        self.rows.append((data.draw(spelling(person), label="spelling"), f"Name {len(self.rows)}"))

    # CSV edits between runs
    @rule(data=st.data())
    def add_row(self, data: st.DataObject) -> None:
        self._step()
        self._add(data)
        self._write()

    @precondition(lambda self: len(self.rows) > 1)
    @rule(data=st.data())
    def remove_row(self, data: st.DataObject) -> None:
        self._step()
        del self.rows[data.draw(st.integers(0, len(self.rows) - 1), label="index")]
        self._write()

    @precondition(lambda self: len(self.rows) > 1)
    @rule(data=st.data())
    def reorder(self, data: st.DataObject) -> None:
        self._step()
        self.rows = data.draw(st.permutations(self.rows), label="order")
        self._write()

    @rule(data=st.data())
    def respell(self, data: st.DataObject) -> None:
        self._step()
        index = data.draw(st.integers(0, len(self.rows) - 1), label="index")
        address, name = self.rows[index]
        person = next(p for p in PEOPLE if canonical(p) == canonical(address))
        self.rows[index] = (data.draw(spelling(person), label="spelling"), name)
        self._write()

    # the server, the suppression list and the template
    @rule(person=st.sampled_from(PEOPLE), outcome=st.sampled_from(OUTCOMES))
    def steer(self, person: str, outcome: str) -> None:
        self._step()
        self.world.steer(person, outcome)
        self.steered.add(person)

    @rule(data=st.data())
    def suppress(self, data: st.DataObject) -> None:
        self._step()
        person = data.draw(st.sampled_from(PEOPLE), label="person")
        written = data.draw(spelling(person), label="spelling")
        with self.world.suppress_file.open("a", encoding="utf-8") as file:
            file.write(written + "\n")
        self.listed.add(canonical(person))

    @rule(version=st.integers(0, 2))
    def change_template(self, version: int) -> None:
        self._step()
        self.template = version
        self.world.write_template(version)

    # runs
    def _accepted(self, first_copy: int) -> None:
        """A send got past its checks: it recorded the template, the CSV and the lists."""
        self.stored = self.template
        for mailbox in self.listed:
            self.suppressed_from.setdefault(mailbox, first_copy)
        self.listed.clear()
        for mailbox, count in Counter(canonical(address) for address, _ in self.rows).items():
            self.ingested[mailbox] = max(self.ingested[mailbox], count)

    @rule(allow_template_change=st.booleans())
    def send(self, allow_template_change: bool) -> None:
        self._step()
        before = len(self.world.received())
        report = self.world.report() if self.stored is not None else None
        run = self.world.cli(*self.world.send_args(allow_template_change))
        if allow_template_change or self.stored in (None, self.template):
            assert run.code in (0, 1, 3), run.stderr
            self._accepted(before)
            return
        assert run.code == 2 and "template changed" in run.stderr, (
            f"send without --allow-template-change after the template went from version {self.stored} "
            f"to {self.template}: exit {run.code}, {run.stderr.strip()!r}"
        )
        assert len(self.world.received()) == before, "a refused send mailed someone"
        assert self.world.report() == report, "a refused send changed the ledger"

    @precondition(lambda self: self.stored is not None and self.one_send_per_file)
    @rule(
        path=st.sampled_from(["same", "symlink", "hardlink", "dotdot"]),
        allow_template_change=st.booleans(),
    )
    def send_while_another_runs(self, path: str, allow_template_change: bool) -> None:
        """A second ``send`` while another holds the ledger (SQLite: one send per file)."""
        self._step()
        before = len(self.world.received())
        report = self.world.report()
        holder = open_ledger(self.world.ledger)
        try:
            holder.lock_for_send(holder.find_campaign(None).name)
            args = self.world.send_args(allow_template_change, self.world.ledger_spelled(path))
            run = self.world.cli(*args)
        finally:
            holder.close()
            self.world.unlink_spellings()
        assert run.code not in (0, 3), f"a send ran beside another through {path}: {run.stderr}"
        assert len(self.world.received()) == before, f"a refused send ({path}) mailed someone"
        assert self.world.report() == report, f"a refused send ({path}) changed the ledger"

    @precondition(lambda self: self.stored is not None)
    @rule(include_failed=st.booleans())
    def retry(self, include_failed: bool) -> None:
        self._step()
        run = self.world.cli(*self.world.retry_args(include_failed))
        assert run.code in (0, 1, 3), run.stderr

    @rule(stage=st.sampled_from(["during-data", "after-data"]), nth=st.integers(1, 3))
    def send_killed(self, stage: str, nth: int) -> None:
        """A subprocess ``mergekit send`` SIGKILLed while the server takes its nth message."""
        self._step()
        before = len(self.world.received())
        allow = self.stored not in (None, self.template)
        run = self.world.send_killed_at(self.world.send_args(allow), stage, nth)
        assert run.killed or run.code in (0, 1, 3), run.stderr
        self._accepted(before)

    @precondition(lambda self: self.stored is not None)
    @rule(count=st.integers(1, 3))
    def abandon_claim(self, count: int) -> None:
        """A run that died right after claiming rows: they stay ``sending``, nothing sent."""
        self._step()
        ledger = open_ledger(self.world.ledger)
        try:
            campaign = ledger.find_campaign(None)
            ledger.claim(campaign, count, states=("pending", "deferred", "unknown"), due_before=None)
        finally:
            ledger.close()

    # what must hold after every step
    @invariant()
    def promises_hold(self) -> None:
        received = self.world.received()
        if self.stored is None:
            assert not received
            return
        report = self.world.report()
        self._check_states(report)
        self._check_copies(received, report)
        for mailbox, first in self.suppressed_from.items():
            late = [i for i, (to, _) in enumerate(received) if to == mailbox and i >= first]
            assert not late, f"{mailbox} was mailed after a --suppress list named it"

    def _check_states(self, report: list[dict[str, Any]]) -> None:
        states = Counter(row["state"] for row in report)
        assert set(states) <= set(STATES), states
        status = self.world.status()
        if not status["sending"]:  # no live run (or lease) holds the campaign: its rows are unknown
            states["unknown"] += states.pop("sending", 0)
        assert {s: status[s] for s in STATES} == {s: states[s] for s in STATES}, (status, states)
        assert status["total"] == len(report)
        rows = Counter(canonical(row["email"]) for row in report)
        assert rows == self.ingested, (
            f"ledger rows per mailbox {dict(rows)} != CSV rows {dict(self.ingested)}"
        )

    def _check_copies(self, received: list[tuple[str, str]], report: list[dict[str, Any]]) -> None:
        copies: dict[str, list[str]] = {}
        for mailbox, message_id in received:
            copies.setdefault(mailbox, []).append(message_id)
        for mailbox, ids in copies.items():
            rows = [row for row in report if canonical(row["email"]) == mailbox]
            assert len(set(ids)) == 1, f"{mailbox} got {len(ids)} copies with Message-IDs {sorted(set(ids))}"
            sent = [row["row"] for row in rows if row["state"] == "sent"]
            assert len(sent) <= 1, f"{mailbox}: rows {sent} are all sent"
            counted = max((row["unknown_count"] for row in rows), default=0)
            assert len(ids) <= 1 + counted, f"{mailbox} got {len(ids)} copies, {counted} counted unknown"

    def teardown(self) -> None:
        try:
            if sys.exc_info()[1] is None:  # a step failed: report that, not a consequence
                self._finish()
        finally:
            self.world.stop()
            self.drop_ledger()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _finish(self) -> None:
        """The server recovers; a clean ``send`` then ``retry --failed`` leave nothing lost."""
        for person in self.steered:
            self.world.steer(person, "sent")
        time.sleep(self.lease)  # rows a crash left ``sending`` are a dead run's once their lease ends
        before = len(self.world.received())
        assert self.world.cli(*self.world.send_args(True)).code in (0, 1, 3)
        self._accepted(before)
        assert self.world.cli(*self.world.retry_args(include_failed=True)).code in (0, 1)
        self.promises_hold()
        status = self.world.status()
        assert not any(status[state] for state in OPEN_STATES), status
        received = {mailbox for mailbox, _ in self.world.received()}
        report = self.world.report()
        for mailbox in set(self.ingested) - set(self.suppressed_from):
            assert mailbox in received, f"{mailbox} was never mailed"
            states = [row["state"] for row in report if canonical(row["email"]) == mailbox]
            assert "sent" in states, f"{mailbox}'s rows are {states}, none sent"


class PostgresLedgerMachine(LedgerMachine):
    """The same machine on a PostgreSQL ledger: a new database per example, short leases."""

    server = ""  # the PostgreSQL server URL, set by the test
    lease = 1.0
    one_send_per_file = False

    def new_ledger(self) -> str:
        import psycopg

        self.database = f"mergekit_stateful_{secrets.token_hex(4)}"
        with psycopg.connect(self.server, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {self.database}")
        parts = urlsplit(self.server)
        return urlunsplit((parts.scheme, parts.netloc, f"/{self.database}", f"lease={self.lease}", ""))

    def drop_ledger(self) -> None:
        import psycopg

        with psycopg.connect(self.server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")


@pytest.mark.timeout(900)  # past hypothesis's own 5-minute cap on shrinking a failure
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_ledger_and_dispatch_keep_their_promises(
    engine: str, request: pytest.FixtureRequest, record_property: Any
) -> None:
    machine: type[LedgerMachine] = LedgerMachine
    if engine == "postgresql":
        PostgresLedgerMachine.server = request.getfixturevalue("postgres_server")  # skips without one
        machine = PostgresLedgerMachine
    STATS.clear()
    started = time.monotonic()
    try:
        run_state_machine_as_test(machine, settings=settings.get_profile(f"{PROFILE}-{engine}"))
    finally:
        record_property(
            "stateful",
            f"{STATS['examples']} examples, {STATS['steps']} steps in {time.monotonic() - started:.0f} s "
            f"({engine} ledger)",
        )
