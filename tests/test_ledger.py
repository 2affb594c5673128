"""The ledger interface: ingest, claim, record, recover, counts, campaigns. Engine-agnostic."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from mergekit.errors import LedgerBusyError, LedgerError
from mergekit.ledger import STATES, Campaign, Ledger, RowUpdate, SqliteLedger, open_ledger
from mergekit.source import SourceRow


def open_campaign(ledger: Ledger, name: str = "c", fingerprint: str = "f1", allow: bool = False) -> Campaign:
    return ledger.open_campaign(
        name,
        template_path="/t.txt",
        template_source="T",
        fingerprint=fingerprint,
        transport="null://",
        allow_template_change=allow,
    )


def rows(count: int, start: int = 1, state: str = "pending") -> list[SourceRow]:
    return [
        SourceRow(i, f"u{i}@example.org", 0, f"u{i}@example.org", {"n": str(i)}, state)
        for i in range(start, start + count)
    ]


def test_ingest_is_idempotent_and_adds_new_rows(ledger: Ledger) -> None:
    campaign = open_campaign(ledger)
    first = ledger.ingest(campaign, [rows(5)])
    again = ledger.ingest(campaign, [rows(7)])
    assert (first.added, first.known) == (5, 0)
    assert (again.added, again.known) == (2, 5)
    assert ledger.counts(campaign)["pending"] == 7
    assert set(ledger.counts(campaign)) == set(STATES)


def test_claim_marks_sending_in_row_order_and_never_twice(ledger: Ledger) -> None:
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, [rows(10)])
    first = ledger.claim(campaign, 4, states=["pending"], due_before=None)
    second = ledger.claim(campaign, 100, states=["pending"], due_before=None)
    assert [r.row for r in first] == [1, 2, 3, 4]
    assert [r.row for r in second] == list(range(5, 11))
    assert first[0].data == {"n": "1"} and first[0].previous == "pending"
    assert ledger.counts(campaign)["sending"] == 10
    assert ledger.claim(campaign, 5, states=["pending"], due_before=None) == []


def test_record_writes_outcomes_and_attempts(ledger: Ledger) -> None:
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, [rows(3)])
    claimed = ledger.claim(campaign, 3, states=["pending"], due_before=None)
    later = time.time() + 60
    ledger.record(
        campaign,
        [
            RowUpdate(claimed[0].id, "sent", code=250, text="ok", provider_id="Q1", message_id="<m1>"),
            RowUpdate(claimed[1].id, "failed", code=550, text="no such user", message_id="<m2>"),
            RowUpdate(claimed[2].id, "deferred", code=451, text="later", next_attempt_at=later),
        ],
    )
    by_row = {r.row: r for r in ledger.rows(campaign)}
    assert (by_row[1].state, by_row[1].provider_id, by_row[1].message_id) == ("sent", "Q1", "<m1>")
    assert (by_row[2].state, by_row[2].last_code, by_row[2].last_text) == ("failed", 550, "no such user")
    assert by_row[3].state == "deferred" and by_row[3].next_attempt_at == pytest.approx(later)
    assert all(r.attempts == 1 for r in by_row.values())
    assert ledger.next_due(campaign) == pytest.approx(later)
    assert [r.row for r in ledger.rows(campaign, ["failed", "deferred"])] == [2, 3]


def test_record_keeps_any_reply_text_readable(tmp_path: Path) -> None:
    """Non-ASCII survives; a byte no codec could decode (a lone surrogate) becomes "?",
    never invalid UTF-8 that every later read of the row would fail on."""
    ledger = SqliteLedger(str(tmp_path / "l.db"))
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, [rows(1)])
    (claimed,) = ledger.claim(campaign, 1, states=["pending"], due_before=None)
    ledger.record(campaign, [RowUpdate(claimed.id, "failed", code=550, text="Ünbekannt \udc80 😀")])
    assert [r.last_text for r in ledger.rows(campaign)] == ["Ünbekannt ? 😀"]
    ledger.close()


def test_deferred_rows_are_claimed_only_when_due(ledger: Ledger) -> None:
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, [rows(2)])
    claimed = ledger.claim(campaign, 2, states=["pending"], due_before=None)
    now = time.time()
    ledger.record(
        campaign,
        [
            RowUpdate(claimed[0].id, "deferred", next_attempt_at=now - 1),
            RowUpdate(claimed[1].id, "deferred", next_attempt_at=now + 600),
        ],
    )
    due = ledger.claim(campaign, 10, states=["deferred"], due_before=now)
    assert [r.row for r in due] == [1]
    assert [r.row for r in ledger.claim(campaign, 10, states=["deferred"], due_before=None)] == [2]


def test_recover_turns_sending_into_unknown_and_counts_it(ledger_location: str) -> None:
    """Rows a dead process held become unknown (PostgreSQL: once their lease has expired)."""
    postgres = ledger_location.startswith("postgresql")
    dying = open_ledger(f"{ledger_location}?lease=0.5" if postgres else ledger_location)
    campaign = open_campaign(dying)
    dying.ingest(campaign, [rows(4)])
    dying.claim(campaign, 3, states=["pending"], due_before=None)
    dying.close()
    if postgres:
        time.sleep(0.8)
    ledger = open_ledger(ledger_location)
    try:
        assert ledger.recover(campaign) == 3
        counts = ledger.counts(campaign)
        assert (counts["unknown"], counts["sending"], counts["pending"]) == (3, 0, 1)
        assert ledger.recovered_unknown(campaign) == 3
        again = ledger.claim(campaign, 10, states=["unknown"], due_before=None)
        assert [r.previous for r in again] == ["unknown"] * 3
    finally:
        ledger.close()


def test_rows_recorded_at_ingest_keep_their_state_and_reason(ledger: Ledger) -> None:
    campaign = open_campaign(ledger)
    bad = SourceRow(1, "x", 0, "x", {}, "invalid", "not an address")
    dup = SourceRow(2, "u1@example.org", 1, "u1@example.org", {}, "duplicate", "same key")
    ledger.ingest(campaign, [[bad, dup]])
    found = list(ledger.rows(campaign))
    assert [(r.state, r.last_text) for r in found] == [
        ("invalid", "not an address"),
        ("duplicate", "same key"),
    ]
    assert ledger.claim(campaign, 10, states=["pending"], due_before=None) == []


def test_changed_template_is_refused_unless_allowed(ledger: Ledger) -> None:
    open_campaign(ledger)
    with pytest.raises(LedgerError, match="--allow-template-change"):
        open_campaign(ledger, fingerprint="f2")
    assert open_campaign(ledger, fingerprint="f2", allow=True).template_fingerprint == "f2"


def test_find_campaign(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no campaign"):
        ledger.find_campaign(None)
    open_campaign(ledger, "first")
    open_campaign(ledger, "second")
    assert ledger.find_campaign(None).name == "second"
    assert ledger.find_campaign("first").name == "first"
    with pytest.raises(LedgerError, match="'first', 'second'"):
        ledger.find_campaign("third")


def test_campaigns_are_separate(ledger: Ledger) -> None:
    one, two = open_campaign(ledger, "one"), open_campaign(ledger, "two")
    ledger.ingest(one, [rows(3)])
    ledger.ingest(two, [rows(2)])
    assert ledger.counts(one)["pending"] == 3 and ledger.counts(two)["pending"] == 2
    assert len(ledger.claim(two, 10, states=["pending"], due_before=None)) == 2
    assert ledger.counts(one)["pending"] == 3


# SQLite only: the file lock, the schema version row and a corrupt file.


def test_send_lock_is_exclusive(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    first, second = SqliteLedger(path), SqliteLedger(path)
    try:
        campaign = open_campaign(first)
        first.lock_for_send(campaign)
        assert second.is_locked(second.find_campaign("c"))
        with pytest.raises(LedgerBusyError, match="another mergekit"):
            second.lock_for_send(second.find_campaign("c"))
    finally:
        first.close()
        second.close()
    reopened = SqliteLedger(path)
    assert not reopened.is_locked(reopened.find_campaign("c"))
    reopened.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "new.db")
    SqliteLedger(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="newer mergekit"):
        SqliteLedger(path)


def test_not_a_ledger_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="--ledger"):
        SqliteLedger(str(path))
