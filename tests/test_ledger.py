"""The ledger interface: ingest, claim, record, recover, counts, campaigns. Engine-agnostic."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from mergekit.errors import InputError, LedgerBusyError, LedgerError
from mergekit.ledger import (
    STATES,
    Campaign,
    ClaimedRow,
    IngestCounts,
    Ledger,
    RowUpdate,
    SqliteLedger,
    open_ledger,
)
from mergekit.source import SourceRow, read_rows


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
        first.lock_for_send(campaign.name)
        assert second.is_locked(second.find_campaign("c"))
        with pytest.raises(LedgerBusyError, match="another mergekit"):
            second.lock_for_send("another campaign")  # one send per ledger file
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


# -- rows from a file: a first ingest keeps pending rows in blocks (SQLite) ----------------


def write_recipients(path: Path, count: int, extra: str = "") -> Path:
    path.write_text("email,n\n" + "".join(f"u{i}@example.org,{i}\n" for i in range(1, count + 1)) + extra)
    return path


def claim_all(ledger: Ledger, campaign: Campaign, step: int) -> list[ClaimedRow]:
    claimed: list[ClaimedRow] = []
    while found := ledger.claim(campaign, step, states=["pending"], due_before=None):
        claimed += found
    return claimed


def test_file_rows_are_claimed_once_in_file_order_with_their_data(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 4)
    path = write_recipients(tmp_path / "r.csv", 10, "U3@example.org,dup\nnot-an-address,bad\n")
    campaign = open_campaign(ledger)
    assert ledger.ingest(campaign, read_rows(path)).added == 12
    counts = ledger.counts(campaign)
    assert (counts["pending"], counts["duplicate"], counts["invalid"]) == (10, 1, 1)
    claimed = claim_all(ledger, campaign, 3)
    assert [r.row for r in claimed] == list(range(1, 11))
    assert [r.data for r in claimed] == [{"email": f"u{i}@example.org", "n": str(i)} for i in range(1, 11)]
    assert [r.key for r in claimed] == [f"u{i}@example.org" for i in range(1, 11)]
    assert len({r.id for r in claimed}) == 10
    assert ledger.counts(campaign)["sending"] == 10 and ledger.counts(campaign)["pending"] == 0


def test_a_file_ingested_again_mid_send_adds_only_new_rows(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 4)
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, read_rows(write_recipients(tmp_path / "r.csv", 10)))
    first = ledger.claim(campaign, 5, states=["pending"], due_before=None)
    ledger.record(campaign, [RowUpdate(r.id, "sent") for r in first])
    again = ledger.ingest(campaign, read_rows(write_recipients(tmp_path / "r.csv", 12)))
    assert (again.added, again.known) == (2, 10)
    assert ledger.counts(campaign)["pending"] == 7
    assert [r.row for r in claim_all(ledger, campaign, 4)] == list(range(6, 13))


def test_suppress_reaches_rows_not_yet_claimed(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 4)
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, read_rows(write_recipients(tmp_path / "r.csv", 10)))
    ledger.claim(campaign, 2, states=["pending"], due_before=None)
    assert ledger.suppress(campaign, {"u5@example.org": "stop.csv", "u1@example.org": "stop.csv"}) == 1
    counts = ledger.counts(campaign)
    assert (counts["pending"], counts["suppressed"], counts["sending"]) == (7, 1, 2)
    listed = list(ledger.rows(campaign))
    assert [(r.row, r.state) for r in listed] == [
        (i, "sending" if i <= 2 else "suppressed" if i == 5 else "pending") for i in range(1, 11)
    ]
    assert "stop.csv" in listed[4].last_text
    assert [r.row for r in claim_all(ledger, campaign, 2)] == [3, 4, 6, 7, 8, 9, 10]
    assert [r.row for r in ledger.rows(campaign, ["pending"])] == []


def test_first_ingest_keeps_pending_rows_in_blocks_until_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 4)
    ledger = SqliteLedger(str(tmp_path / "l.db"))
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, read_rows(write_recipients(tmp_path / "r.csv", 10)))
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT count(*) FROM recipients").fetchone()[0] == 0
        assert db.execute("SELECT count(*), sum(size) FROM source_blocks").fetchone() == (3, 10)
    claim_all(ledger, campaign, 3)
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT count(*) FROM recipients WHERE state = 'sending'").fetchone()[0] == 10
        assert db.execute("SELECT count(*) FROM source_blocks").fetchone()[0] == 0
    ledger.close()


def test_a_bad_row_late_in_a_first_ingest_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 2)
    ledger = SqliteLedger(str(tmp_path / "l.db"))
    campaign = open_campaign(ledger)
    path = write_recipients(tmp_path / "r.csv", 6, "u7@example.org,7,extra\n")
    with pytest.raises(InputError) as caught:
        ledger.ingest(campaign, read_rows(path))
    assert caught.value.row == 7 and caught.value.line == 8
    assert sum(ledger.counts(campaign).values()) == 0
    ledger.close()


def test_rows_in_blocks_are_known_by_key_when_hashes_collide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed ingest matches rows still in blocks by their pair of hashes: a shared first hash
    (forced here for every key) must not make a new row pass for a known one."""
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 4)
    monkeypatch.setattr("mergekit.source._key_hash", lambda key: 0)
    ledger = SqliteLedger(str(tmp_path / "l.db"))
    campaign = open_campaign(ledger)
    ledger.ingest(campaign, read_rows(write_recipients(tmp_path / "r.csv", 6)))
    assert ledger.ingest(campaign, read_rows(write_recipients(tmp_path / "r.csv", 6))) == IngestCounts(0, 6)
    assert ledger.ingest(campaign, read_rows(write_recipients(tmp_path / "r.csv", 9))) == IngestCounts(3, 6)
    assert [r.row for r in claim_all(ledger, campaign, 4)] == list(range(1, 10))
    ledger.close()
