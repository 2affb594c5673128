"""One mailbox is one recipient (issue 13, item 1): spellings, suppression, --key, old ledgers.

Judged by what reached a real SMTP server on 127.0.0.1 and by ``status --json`` /
``report``, on both ledger engines where the ledger is involved.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from mergekit.addresses import _canonical, canonical_address
from mergekit.cli import main
from mergekit.ledger import AddressClaim, open_ledger
from mergekit.render import TemplateSource
from mergekit.source import read_rows
from tests.faultsmtpd import Faults, FaultServer
from tests.smtpd import SmtpServer

MAILBOX = "a@xn--bcher-kva.example"  # what every spelling below reaches on the wire
SPELLINGS = [
    "a@bücher.example",  # U-label
    MAILBOX,  # A-label
    unicodedata.normalize("NFD", "a@bücher.example"),  # the same text decomposed
    "a@\uff42ücher.example",  # a full-width b
]
TEMPLATE = "From: n@example.com\nTo: {{ email }}\nSubject: s\n\nHi {{ name }}\n"
DATA = Path(__file__).parent / "data"


def campaign_files(folder: Path, rows: list[str], *, header: str = "email,name") -> Path:
    (folder / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    (folder / "r.csv").write_text(header + "\n" + "".join(f"{r}\n" for r in rows), encoding="utf-8")
    return folder


def cli(folder: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def send(folder: Path, url: str, ledger: str, *options: str) -> int:
    args = ["send", str(folder / "r.csv"), str(folder / "t.txt"), "--transport", url, "--ledger", ledger]
    return cli(folder, *args, "--campaign", "c", "--concurrency", "1", *options)[0]


def status(folder: Path, ledger: str, campaign: str = "c") -> dict[str, Any]:
    code, out = cli(folder, "status", "--ledger", ledger, "--campaign", campaign, "--json")
    assert code in (0, 1, 3)
    return dict(json.loads(out))


def report(folder: Path, ledger: str, campaign: str = "c") -> list[dict[str, Any]]:
    code, out = cli(folder, "report", "--ledger", ledger, "--campaign", campaign, "--format", "json")
    assert code == 0
    return list(json.loads(out))


# -- the canonical form -----------------------------------------------------------------------


def test_every_spelling_has_one_canonical_form_and_the_wire_agrees() -> None:
    from mergekit.addresses import wire_address

    assert {canonical_address(s) for s in SPELLINGS} == {MAILBOX}
    assert {wire_address(s) for s in SPELLINGS} == {MAILBOX}
    assert canonical_address("Jo.Doe@Bücher.Example") == "jo.doe@xn--bcher-kva.example"
    # A full-width letter in the local part is not folded: that row cannot go out (SMTPUTF8).
    assert canonical_address("\uff41@example.com") != canonical_address("a@example.com")


ASCII_LABEL = st.from_regex(r"(xn--)?[A-Za-z0-9_-]{1,12}", fullmatch=True)


@given(
    local=st.from_regex(r"[A-Za-z0-9.+_-]{1,10}", fullmatch=True),
    labels=st.lists(
        ASCII_LABEL | st.sampled_from(["XN--BCHER-KVA", "xn--", "xn--a", "-a-", "a_b"]),
        min_size=1,
        max_size=4,
    ),
)
def test_an_ascii_address_is_canonical_lower_cased(local: str, labels: list[str]) -> None:
    """The column path of ingest (Arrow's lower-case of ASCII addresses) gives what the full
    normalisation gives, xn-- labels and domains IDNA refuses included."""
    address = f"{local}@{'.'.join(labels)}"
    assert _canonical(address) == address.lower()


# -- four spellings, one message --------------------------------------------------------------


def test_four_spellings_one_message(tmp_path: Path, ledger_location: str, smtp_server: SmtpServer) -> None:
    folder = campaign_files(tmp_path, [f"{s},N{i}" for i, s in enumerate(SPELLINGS, 1)])
    assert send(folder, smtp_server.url, ledger_location) == 0
    assert [m.rcpt_tos for m in smtp_server.messages] == [[MAILBOX]]
    counts = status(folder, ledger_location)
    assert (counts["sent"], counts["duplicate"], counts["total"]) == (1, 3, 4)
    rows = report(folder, ledger_location)
    assert [r["email"] for r in rows] == SPELLINGS and {r["address"] for r in rows} == {MAILBOX}
    assert [r["last_text"] for r in rows[1:]] == [f"same recipient as row 1 ({MAILBOX})"] * 3


@pytest.mark.parametrize("spelling", range(len(SPELLINGS)))
def test_a_suppression_in_any_spelling_suppresses_every_spelling(
    tmp_path: Path, ledger_location: str, spelling: int
) -> None:
    """At ingest, and re-applied on resume to rows the ledger holds as ``deferred``."""
    server = FaultServer(Faults()).start()
    try:
        rows = [*(f"{s},N{i}" for i, s in enumerate(SPELLINGS, 1)), "z@example.com,Z"]
        folder = campaign_files(tmp_path, rows)
        (folder / "stop.txt").write_text(SPELLINGS[spelling] + "\n", encoding="utf-8")
        url = f"smtp://127.0.0.1:{server.port}"
        send(folder, url, ledger_location, "--suppress", str(folder / "stop.txt"))
        assert [m.rcpt_tos for m in server.messages] == [["z@example.com"]]
        counts = status(folder, ledger_location)
        assert (counts["suppressed"], counts["duplicate"]) == (1, 3)
        # Campaign d: its rows are deferred first, then a run brings the list in this spelling.
        server.handler.faults.rcpt_transient_rate = 1.0
        assert send(folder, url, ledger_location, "--max-attempts", "1", "--campaign", "d") == 3
        assert status(folder, ledger_location, "d")["deferred"] == 2
        server.handler.faults.clear()
        send(folder, url, ledger_location, "--campaign", "d", "--suppress", str(folder / "stop.txt"))
        counts = status(folder, ledger_location, "d")
        assert (counts["suppressed"], counts["deferred"]) == (1, 1)
        assert (
            cli(folder, "retry", "--ledger", ledger_location, "--campaign", "d", "--transport", url)[0] == 0
        )
        assert [m.rcpt_tos for m in server.messages] == [["z@example.com"], ["z@example.com"]]
        # Campaign e: ingested by an earlier run that sent nothing (SQLite keeps such rows in blocks).
        ledger = open_ledger(ledger_location)
        source = TemplateSource.read(folder / "t.txt")
        record = ledger.open_campaign(
            "e", template_path=str((folder / "t.txt").resolve()), template_source=source.text,
            fingerprint=source.fingerprint, transport=url, allow_template_change=False,
        )  # fmt: skip
        ledger.ingest(record, read_rows(folder / "r.csv"))
        ledger.close()
        send(folder, url, ledger_location, "--campaign", "e", "--suppress", str(folder / "stop.txt"))
        assert [m.rcpt_tos for m in server.messages] == [["z@example.com"]] * 3
        assert status(folder, ledger_location, "e")["suppressed"] == 1
    finally:
        server.stop()


# -- routes the key did not foresee: claimed at render ----------------------------------------


def test_key_column_rows_reaching_one_address_send_once(
    tmp_path: Path, ledger_location: str, smtp_server: SmtpServer
) -> None:
    folder = campaign_files(
        tmp_path,
        [
            "k1,X@Example.com,One",
            f"k2,{SPELLINGS[0]},Two",
            "k3,x@example.COM,Three",
            f"k4,{SPELLINGS[3]},Four",
        ],
        header="id,email,name",
    )
    assert send(folder, smtp_server.url, ledger_location, "--key", "id") == 0
    assert sorted(m.rcpt_tos[0].lower() for m in smtp_server.messages) == [MAILBOX, "x@example.com"]
    rows = report(folder, ledger_location)
    assert [r["state"] for r in rows] == ["sent", "sent", "duplicate", "duplicate"]
    assert rows[2]["last_text"] == "same address as row 1 (x@example.com)"
    assert rows[3]["last_text"] == f"same address as row 2 ({MAILBOX})"
    # A resumed run sends none of them again.
    assert send(folder, smtp_server.url, ledger_location, "--key", "id") == 0
    assert len(smtp_server.messages) == 2


def test_a_to_header_from_another_column_is_claimed(tmp_path: Path, smtp_server: SmtpServer) -> None:
    folder = campaign_files(tmp_path, ["a@example.com,Boss@Example.com", "b@example.com,boss@example.com"],
                            header="email,contact")  # fmt: skip
    (folder / "t.txt").write_text("From: n@example.com\nTo: {{ contact }}\nSubject: s\n\nHi\n")
    ledger = str(tmp_path / "l.db")
    assert send(folder, smtp_server.url, ledger) == 0
    assert len(smtp_server.messages) == 1
    assert report(folder, ledger)[1]["last_text"] == "same address as row 1 (boss@example.com)"


def test_an_unknown_row_resends_to_its_own_address(tmp_path: Path, ledger_location: str) -> None:
    """A reply lost after the data: the row is ``unknown`` and holds its address; resent, it is
    not a duplicate of itself (one Message-ID for both copies)."""
    server = FaultServer(Faults(drop={MAILBOX: "after-data"})).start()
    try:
        folder = campaign_files(tmp_path, [f"{SPELLINGS[0]},A", "z@example.com,Z"])
        url = f"smtp://127.0.0.1:{server.port}"
        assert send(folder, url, ledger_location) == 3
        assert status(folder, ledger_location)["unknown"] == 1
        server.handler.faults.clear()
        assert send(folder, url, ledger_location) == 0
        copies = [m for m in server.messages if m.rcpt_tos == [MAILBOX]]
        assert len(copies) == 2 and len({m.message_id for m in copies}) == 1
        assert status(folder, ledger_location)["sent"] == 2
    finally:
        server.stop()


def test_concurrent_claims_give_each_address_one_holder(ledger_location: str) -> None:
    """Two connections (two workers) claim overlapping addresses in opposite orders at once: the
    unique constraint gives each address exactly one row, and neither waits for ever."""
    first, second = open_ledger(ledger_location), open_ledger(ledger_location)
    try:
        source = TemplateSource.parse(TEMPLATE)
        campaign = first.open_campaign(
            "c", template_path="t", template_source=source.text, fingerprint=source.fingerprint,
            transport="null://", allow_template_change=False,
        )  # fmt: skip
        addresses = [f"p{i}@example.com" for i in range(200)]
        lost: list[dict[int, int]] = [{}, {}]

        def claim(ledger: Any, slot: int, ids: list[int]) -> None:
            order = addresses if slot == 0 else addresses[::-1]
            lost[slot] = ledger.claim_addresses(
                campaign, [AddressClaim(i, i, a) for i, a in zip(ids, order, strict=True)]
            )

        ids = [list(range(1000, 1200)), list(range(5000, 5200))]
        threads = [threading.Thread(target=claim, args=(ledger, slot, ids[slot]))
                   for slot, ledger in enumerate((first, second))]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        # Address i is row 1000 + i's claim, and row 5199 - i's: exactly one of them holds it.
        for i in range(len(addresses)):
            assert (1000 + i in lost[0]) != (5199 - i in lost[1]), addresses[i]
        holders = first.claim_addresses(
            campaign, [AddressClaim(9000 + i, 1, a) for i, a in enumerate(addresses)]
        )
        assert all(holders[9000 + i] in (1000 + i, 5199 - i) for i in range(len(addresses)))
    finally:
        first.close()
        second.close()


# -- ledgers written before this change ------------------------------------------------------


def old_ledger(tmp_path: Path) -> str:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript((DATA / "ledger-schema2.sql").read_text(encoding="utf-8"))
    return str(path)


@pytest.mark.parametrize(
    ("campaign", "sent_now", "states"),
    [
        ("blocks", [[MAILBOX], ["z@example.com"]], ["sent", "duplicate", "duplicate", "duplicate", "sent"]),
        ("one-sent", [["z@example.com"]], ["sent", "duplicate", "duplicate", "duplicate", "sent"]),
        ("two-sent", [], ["duplicate", "sent", "sent", "duplicate", "suppressed"]),
    ],
)
def test_an_old_ledger_is_re_keyed_on_resume(
    tmp_path: Path, smtp_server: SmtpServer, campaign: str, sent_now: list[list[str]], states: list[str]
) -> None:
    ledger = old_ledger(tmp_path)
    rows = [*(f"{s},N{i}" for i, s in enumerate(SPELLINGS)), "z@example.com,Z"]
    folder = campaign_files(tmp_path, rows)
    assert send(folder, smtp_server.url, ledger, "--campaign", campaign) in (0, 3)
    assert [m.rcpt_tos for m in smtp_server.messages] == sent_now
    found = report(folder, ledger, campaign)
    assert [r["state"] for r in found] == states
    keeper = 2 if campaign == "two-sent" else 1
    assert all(r["last_text"] == f"same recipient as row {keeper} ({MAILBOX})"
               for r in found if r["state"] == "duplicate")  # fmt: skip
    assert status(folder, ledger, campaign)["total"] == 5  # the re-ingest added no row
    assert send(folder, smtp_server.url, ledger, "--campaign", campaign) in (0, 3)
    assert len(smtp_server.messages) == len(sent_now)


def test_an_old_postgres_ledger_is_re_keyed_on_open(
    tmp_path: Path, postgres_url: str, smtp_server: SmtpServer
) -> None:
    """Schema 1 (before this change): rows keyed by the lower-cased address, two spellings sent,
    one unknown, and a ``--key`` row for the same mailbox; no addresses claimed."""
    import psycopg

    source = TemplateSource.parse(TEMPLATE)
    ledger = open_ledger(postgres_url)
    record = ledger.open_campaign(
        "c", template_path="t", template_source=source.text, fingerprint=source.fingerprint,
        transport="null://", allow_template_change=False,
    )  # fmt: skip
    ledger.close()
    old = [  # row, key, email, state
        (1, SPELLINGS[0], SPELLINGS[0], "pending"),
        (2, MAILBOX, MAILBOX, "sent"),
        (3, SPELLINGS[2], SPELLINGS[2], "sent"),
        (4, SPELLINGS[3], SPELLINGS[3], "unknown"),
        (5, "z@example.com", "z@example.com", "pending"),
        (6, "k6", SPELLINGS[0], "pending"),  # a row of an earlier run keyed by --key
    ]
    with psycopg.connect(postgres_url, autocommit=True) as db:
        for row, key, email, state in old:
            db.execute(
                "INSERT INTO mergekit_recipients (campaign_id, row, key, occurrence, email, data, state)"
                " VALUES (%s, %s, %s, 0, %s, %s, %s)",
                (record.id, row, key, email, json.dumps({"email": email, "name": "N"}), state),
            )
        db.execute("UPDATE mergekit_schema SET version = 1")
    folder = campaign_files(tmp_path, [f"{s},N" for s in SPELLINGS] + ["z@example.com,Z"])
    assert send(folder, smtp_server.url, postgres_url) == 0
    assert [m.rcpt_tos for m in smtp_server.messages] == [["z@example.com"]]
    found = report(folder, postgres_url)
    assert [r["state"] for r in found] == ["duplicate", "sent", "sent", "duplicate", "sent", "duplicate"]
    assert [r["last_text"] for r in found if r["state"] == "duplicate"] == [
        f"same recipient as row 2 ({MAILBOX})",
        f"same recipient as row 2 ({MAILBOX})",
        f"same address as row 2 ({MAILBOX})",
    ]
    assert status(folder, postgres_url)["total"] == 6
