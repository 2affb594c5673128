"""The ledger on both engines, and what only the PostgreSQL ledger does: leases, fencing, shared rate."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from unittest.mock import patch

import psycopg
import pytest
from click.testing import CliRunner

from mergekit.cli import main
from mergekit.errors import ConfigError, LedgerError
from mergekit.ledger import Campaign, Ledger, RowUpdate, open_ledger
from mergekit.ledger_postgres import PostgresLedger
from mergekit.source import SourceRow

TEMPLATE = "From: a@example.com\nTo: {{ email }}\nSubject: hi {{ name }}\n\nHello {{ name }}\n"


def start(ledger: Ledger, name: str = "c", fingerprint: str = "f1") -> Campaign:
    return ledger.open_campaign(
        name,
        template_path="t.txt",
        template_source=TEMPLATE,
        fingerprint=fingerprint,
        transport="null://",
        allow_template_change=False,
        settings={"unknown": "resend"},
    )


def rows(count: int, first: int = 1) -> list[SourceRow]:
    return [
        SourceRow(i, f"r{i}@example.com", 0, f"r{i}@example.com", {"email": f"r{i}@example.com"}, "pending")
        for i in range(first, first + count)
    ]


# -- both engines --------------------------------------------------------------


def test_ingest_claim_record_counts(ledger: Ledger) -> None:
    campaign = start(ledger)
    bad = SourceRow(11, "bad", 0, "bad", {"email": "bad"}, "invalid", "not an address")
    first = ledger.ingest(campaign, [rows(10), [bad]])
    assert (first.added, first.known) == (11, 0)
    counts = ledger.ingest(campaign, [rows(12)])
    assert (counts.added, counts.known) == (2, 10)

    claimed = ledger.claim(campaign, 4, states=("unknown", "deferred", "pending"), due_before=time.time())
    assert [c.row for c in claimed] == [1, 2, 3, 4]
    assert {c.previous for c in claimed} == {"pending"}
    later = time.time() + 3600
    ledger.record(
        campaign,
        [
            RowUpdate(claimed[0].id, "sent", provider_id="p1", message_id="<m1@x>"),
            RowUpdate(claimed[1].id, "deferred", code=451, text="later", next_attempt_at=later),
            RowUpdate(claimed[2].id, "failed", code=550, text="no such user"),
        ],
    )
    counts_now = ledger.counts(campaign)
    assert counts_now["sent"] == 1 and counts_now["deferred"] == 1 and counts_now["failed"] == 1
    assert counts_now["sending"] == 1 and counts_now["invalid"] == 1 and counts_now["pending"] == 8
    assert ledger.next_due(campaign) == pytest.approx(later)

    # a deferred row is claimed only when due, unless due_before is None
    again = ledger.claim(campaign, 100, states=("deferred",), due_before=time.time())
    assert again == []
    again = ledger.claim(campaign, 100, states=("deferred",), due_before=None)
    assert [(c.row, c.previous, c.attempts) for c in again] == [(2, "deferred", 1)]

    report = list(ledger.rows(campaign, ["sent", "failed"]))
    assert [(r.row, r.state, r.message_id, r.last_code) for r in report] == [
        (1, "sent", "<m1@x>", None),
        (3, "failed", "", 550),
    ]
    assert len(list(ledger.rows(campaign))) == 13


def test_template_change_refused_and_campaigns_found(ledger: Ledger) -> None:
    first = start(ledger, "one")
    with pytest.raises(LedgerError, match="template changed"):
        start(ledger, "one", fingerprint="f2")
    changed = ledger.open_campaign(
        "one",
        template_path="t.txt",
        template_source=TEMPLATE,
        fingerprint="f2",
        transport="null://",
        allow_template_change=True,
    )
    assert changed.id == first.id and changed.settings == {"unknown": "resend"}
    start(ledger, "two")
    assert ledger.find_campaign(None).name == "two"
    assert ledger.find_campaign("one").id == first.id
    with pytest.raises(LedgerError, match="no campaign 'three'; it holds 'one', 'two'"):
        ledger.find_campaign("three")


def test_newer_schema_refused(ledger_location: str) -> None:
    open_ledger(ledger_location).close()
    if ledger_location.startswith("postgresql://"):
        with psycopg.connect(ledger_location, autocommit=True) as db:
            db.execute("UPDATE mergekit_schema SET version = 99")
    else:
        with sqlite3.connect(ledger_location) as db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match=r"written by a newer mergekit \(schema 99, this one reads \d+\)"):
        open_ledger(ledger_location)


# -- PostgreSQL only -------------------------------------------------------------


def test_claims_never_overlap(postgres_url: str) -> None:
    setup = PostgresLedger(postgres_url)
    campaign = start(setup)
    setup.ingest(campaign, [rows(2000)])
    setup.close()
    taken: dict[str, list[int]] = {}

    def claimer(name: str) -> None:
        ledger = PostgresLedger(postgres_url, worker_id=name)
        mine = taken.setdefault(name, [])
        while batch := ledger.claim(campaign, 50, states=("pending",), due_before=None):
            mine.extend(row.id for row in batch)
            ledger.record(campaign, [RowUpdate(row.id, "sent") for row in batch])
        ledger.close()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [row for mine in taken.values() for row in mine]
    assert len(every) == len(set(every)) == 2000
    assert sum(1 for mine in taken.values() if mine) >= 2


def test_expired_lease_turns_unknown_and_is_resent(postgres_url: str) -> None:
    dead = PostgresLedger(postgres_url + "?lease=0.5", worker_id="dead")
    campaign = start(dead)
    dead.ingest(campaign, [rows(8)])
    held = dead.claim(campaign, 5, states=("pending",), due_before=None)
    dead.close()  # dies holding 5 rows: nothing renews their lease any more

    other = PostgresLedger(postgres_url + "?lease=0.5", worker_id="other")
    assert other.recover(campaign) == 0  # the lease still runs
    assert other.is_locked(campaign)
    time.sleep(0.7)
    assert not other.is_locked(campaign)
    claimed = other.claim(campaign, 10, states=("unknown", "pending"), due_before=None)
    assert [c.id for c in claimed if c.previous == "unknown"] == [row.id for row in held]
    assert len(claimed) == 8
    assert other.recovered_unknown(campaign) == 5
    other.close()


def test_lease_renewed_while_rows_are_held(postgres_url: str) -> None:
    holder = PostgresLedger(postgres_url + "?lease=0.6", worker_id="holder")
    campaign = start(holder)
    holder.ingest(campaign, [rows(3)])
    held = holder.claim(campaign, 3, states=("pending",), due_before=None)
    other = PostgresLedger(postgres_url, worker_id="other")
    time.sleep(1.5)  # more than two leases: only renewals keep the rows
    assert other.recover(campaign) == 0
    assert other.counts(campaign)["sending"] == 3
    holder.record(campaign, [RowUpdate(row.id, "sent") for row in held])
    assert other.counts(campaign)["sent"] == 3
    holder.close()
    other.close()


def test_late_outcomes_are_fenced(postgres_url: str) -> None:
    """A worker whose lease lapsed never writes over a row another worker took or settled; a late
    delivery is still written where the row was recovered and nobody has claimed it since."""
    slow = PostgresLedger(postgres_url, worker_id="slow")
    campaign = start(slow)
    slow.ingest(campaign, [rows(4)])
    held = slow.claim(campaign, 4, states=("pending",), due_before=None)
    # The slow worker loses the server (or is paused) for longer than its lease:
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE mergekit_recipients SET lease_expires_at = now() - interval '1 second'")
    fast = PostgresLedger(postgres_url, worker_id="fast")
    taken = fast.claim(campaign, 2, states=("unknown",), due_before=None)  # recovers all four
    assert [row.id for row in taken] == [held[0].id, held[1].id]
    slow.record(
        campaign,
        [
            RowUpdate(held[0].id, "deferred", next_attempt_at=time.time()),  # fast holds it
            RowUpdate(held[1].id, "sent", message_id="<m1@x>"),  # fast holds it
            RowUpdate(held[2].id, "sent", message_id="<m2@x>"),  # recovered, not taken: its delivery
            RowUpdate(held[3].id, "deferred", next_attempt_at=time.time()),  # stays unknown
        ],
    )
    assert {s: n for s, n in fast.counts(campaign).items() if n} == {"sending": 2, "sent": 1, "unknown": 1}
    fast.record(campaign, [RowUpdate(held[0].id, "sent"), RowUpdate(held[1].id, "failed", code=550)])
    slow.record(campaign, [RowUpdate(held[0].id, "failed", code=550)])  # settled by fast: no
    final = {row.row: (row.state, row.unknown_count) for row in fast.rows(campaign)}
    assert final == {1: ("sent", 1), 2: ("failed", 1), 3: ("sent", 1), 4: ("unknown", 1)}
    slow.close()
    fast.close()


def test_a_paused_worker_sends_only_rows_it_still_holds(postgres_url: str) -> None:
    """After a pause longer than its lease (the clock jumps), a worker asks the database which of
    its claimed rows are still its own before sending them; those are renewed."""
    slow = PostgresLedger(postgres_url + "?lease=2", worker_id="slow")
    campaign = start(slow)
    slow.ingest(campaign, [rows(4)])
    held = slow.claim(campaign, 4, states=("pending",), due_before=None)
    assert slow.still_held(held) == held  # just claimed: no question asked
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE mergekit_recipients SET lease_expires_at = now() - interval '1 second'")
    fast = PostgresLedger(postgres_url, worker_id="fast")
    taken = fast.claim(campaign, 2, states=("unknown",), due_before=None)
    with psycopg.connect(postgres_url, autocommit=True) as db:  # two rows still 'sending' as slow's
        db.execute("UPDATE mergekit_recipients SET state = 'sending' WHERE worker_id = 'slow'")
    later = time.monotonic() + 60
    with patch("mergekit.ledger_postgres.time.monotonic", return_value=later):
        kept = slow.still_held(held)
    assert [row.id for row in kept] == [row.id for row in held if row.id not in {t.id for t in taken}]
    with psycopg.connect(postgres_url, autocommit=True) as db:  # the kept rows' leases run again
        live = db.execute(
            "SELECT count(*) FROM mergekit_recipients WHERE worker_id = 'slow' AND lease_expires_at > now()"
        ).fetchone()
    assert live == (2,)
    slow.close()
    fast.close()


def test_an_outcome_written_twice_counts_once(postgres_url: str) -> None:
    """``record`` run again after a lost connection (its first COMMIT may have landed) is a no-op."""
    ledger = PostgresLedger(postgres_url, worker_id="w")
    campaign = start(ledger)
    ledger.ingest(campaign, [rows(1)])
    (row,) = ledger.claim(campaign, 1, states=("pending",), due_before=None)
    update = [RowUpdate(row.id, "unknown", message_id="<m@x>")]
    with patch("time.time", return_value=1_000_000.0):  # the two calls of one record share a time
        ledger.record(campaign, update)
        ledger.record(campaign, update)
    (found,) = ledger.rows(campaign)
    assert (found.state, found.attempts, found.unknown_count) == ("unknown", 1, 1)
    ledger.close()


def test_rate_is_shared_by_every_worker(postgres_url: str) -> None:
    ledgers = [PostgresLedger(postgres_url, worker_id=f"w{i}") for i in range(2)]
    campaign = start(ledgers[0])
    limiters = [ledger.rate_limiter(campaign, 200.0) for ledger in ledgers]
    assert None not in limiters

    async def run() -> float:
        async def take(limiter: object) -> None:
            for _ in range(10):
                await limiter.acquire(10)  # type: ignore[attr-defined]

        started = time.monotonic()
        await asyncio.gather(*(take(limiter) for limiter in limiters))
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    # 200 messages at 200/s: the first batch goes at once, the last starts 0.95 s later
    assert 0.85 <= elapsed <= 1.6
    assert ledgers[0].rate_limiter(campaign, None) is None
    for ledger in ledgers:
        ledger.close()


def test_bad_urls_say_what_is_wrong(postgres_url: str) -> None:
    with pytest.raises(ConfigError, match=r"\?lease='soon'.*not a positive number"):
        open_ledger(postgres_url + "?lease=soon")
    with pytest.raises(LedgerError, match="cannot open the PostgreSQL ledger") as caught:
        open_ledger("postgresql://someone:hunter2@127.0.0.1:1/nowhere")
    assert "hunter2" not in str(caught.value)
    assert "someone:***@127.0.0.1:1" in str(caught.value)


def test_commands_run_unchanged_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    recipients = tmp_path / "people.csv"
    recipients.write_text("email,name\n" + "".join(f"p{i}@example.com,P {i}\n" for i in range(30)))
    template = tmp_path / "hello.txt"
    template.write_text(TEMPLATE)
    runner = CliRunner()
    ledger = postgres_url + "?lease=5"
    sent = runner.invoke(
        main, ["send", str(recipients), str(template), "--transport", "null://", "--ledger", ledger, "--json"]
    )
    assert sent.exit_code == 0, sent.output
    assert json.loads(sent.stdout)["sent"] == 30

    status = runner.invoke(main, ["status", "--ledger", ledger, "--json"])
    found = json.loads(status.stdout)
    assert (status.exit_code, found["campaign"], found["sent"], found["total"]) == (0, "people-hello", 30, 30)

    report = runner.invoke(main, ["report", "--ledger", ledger, "--format", "json"])
    records = json.loads(report.stdout)
    assert [r["row"] for r in records] == list(range(1, 31))
    assert all(r["state"] == "sent" and r["message_id"].startswith("<") for r in records)

    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE mergekit_recipients SET state = 'unknown' WHERE row <= 3")
        stored = db.execute("SELECT transport, settings FROM mergekit_campaigns").fetchone()
    assert stored is not None and stored[0] == "null://"
    assert json.loads(stored[1]) == {
        "unknown": "resend",
        "max_attempts": 3,
        "rate": None,
        "attachments_dir": None,
        "unsubscribe_url": None,
        "unsubscribe_mailto": None,
    }
    retried = runner.invoke(main, ["retry", "--ledger", ledger, "--json"])
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout)["sent"] == 30

    joined = runner.invoke(main, ["worker", "--ledger", ledger, "--json"])
    assert joined.exit_code == 0, joined.output
    assert json.loads(joined.stdout)["this_run"] == {}
