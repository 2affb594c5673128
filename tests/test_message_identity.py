"""Message identity: a Message-ID belongs to one campaign (a random identity the ledger keeps), not to
a campaign name; campaigns from before keep theirs; List-Id beside List-Unsubscribe (RFC 2919)."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import psycopg

from mergekit import send
from mergekit.dispatch import SendOptions
from mergekit.ledger import Campaign, Ledger, RowUpdate, SqliteLedger, open_ledger
from mergekit.render import TemplateSource
from mergekit.source import read_rows
from tests.conftest import run_cli
from tests.helpers import write_campaign
from tests.smtpd import SmtpServer

# RFC 2919 2: List-Id: [phrase] "<" list-label "." list-id-namespace ">", the label a dot-atom.
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
LIST_ID = re.compile(rf"^(?:[^<>]* )?<({ATOM}(?:\.{ATOM})*)\.example\.com>$")


def _name_derived(campaign: str, key: str) -> str:
    """The Message-ID every campaign had before it had an identity: a hash of its name and key."""
    digest = hashlib.sha256(f"{campaign}\x00{key}".encode()).hexdigest()[:32]
    return f"<{digest}@example.com>"


def _ids(server: SmtpServer) -> dict[str, list[str]]:
    return {rcpt: [m.message_id for m in copies] for rcpt, copies in server.handler.by_recipient().items()}


def _report(folder: Path, *args: str) -> dict[str, dict[str, object]]:
    found = run_cli("report", "--format", "json", *args, cwd=folder)
    assert found.returncode == 0, found.stderr
    return {row["email"]: row for row in json.loads(found.stdout)}


def test_one_campaign_name_in_two_ledgers_gives_two_message_ids(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Next month's newsletter from the same file names, or the campaign again in a fresh ledger."""
    write_campaign(tmp_path, 3)
    for ledger in ("may.db", "june.db"):
        sent = run_cli("send", "recipients.csv", "template.txt", "--transport", smtp_server.url,
                       "--ledger", ledger, cwd=tmp_path)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    received = _ids(smtp_server)
    assert len(received) == 3
    for rcpt, ids in received.items():
        assert len(ids) == 2 and ids[0] != ids[1], (rcpt, ids)
        assert _name_derived("recipients-template", rcpt) not in ids
    for ledger, index in (("may.db", 0), ("june.db", 1)):
        report = _report(tmp_path, "--ledger", ledger)
        assert {email: row["message_id"] for email, row in report.items()} == {
            rcpt: ids[index] for rcpt, ids in received.items()
        }


def test_every_copy_of_a_campaign_keeps_its_message_id(tmp_path: Path, smtp_server: SmtpServer) -> None:
    """Rows deferred after their data went out, sent again by later runs (retry), keep one id."""
    write_campaign(tmp_path, 2)
    smtp_server.handler.defer_data_times = 2
    once = ("--transport", smtp_server.url, "--max-attempts", "1")
    first = run_cli("send", "recipients.csv", "template.txt", *once, cwd=tmp_path)
    assert first.returncode == 3, first.stderr
    recorded = {email: row["message_id"] for email, row in _report(tmp_path).items()}
    assert all(recorded.values()) and smtp_server.messages == []
    smtp_server.handler.defer_data_times = 1
    for expected in (3, 0):
        retried = run_cli("retry", *once, cwd=tmp_path)
        assert retried.returncode == expected, retried.stderr
    assert _ids(smtp_server) == {email: [message_id] for email, message_id in recorded.items()}


def _ledger_from_before(path: Path, folder: Path) -> None:
    """A ledger as mergekit wrote it before campaigns had an identity (schema 2), holding a
    campaign whose three rows are ``unknown`` with the Message-IDs of that time."""
    recipients, template = write_campaign(folder, 3)
    source = TemplateSource.read(template)
    ledger = SqliteLedger(str(path))
    try:
        record = ledger.open_campaign("news", template_path=str(template), template_source=source.text,
                                      fingerprint=source.fingerprint, transport="smtp://127.0.0.1:1",
                                      allow_template_change=False)  # fmt: skip
        ledger.ingest(record, read_rows(recipients))
        claimed = ledger.claim(record, 10, states=["pending"], due_before=None)
        ledger.record(
            record, [RowUpdate(r.id, "unknown", message_id=_name_derived("news", r.key)) for r in claimed]
        )
    finally:
        ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE campaigns DROP COLUMN identity")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()


def test_a_campaign_from_before_keeps_its_message_ids(tmp_path: Path, smtp_server: SmtpServer) -> None:
    _ledger_from_before(tmp_path / "mergekit.db", tmp_path)
    resent = run_cli("retry", "--campaign", "news", "--transport", smtp_server.url, cwd=tmp_path)
    assert resent.returncode == 0, resent.stderr
    received = _ids(smtp_server)
    assert received == {
        f"user{i}@example.org": [_name_derived("news", f"user{i}@example.org")] for i in (1, 2, 3)
    }
    assert {email: row["message_id"] for email, row in _report(tmp_path, "--campaign", "news").items()} == {
        rcpt: ids[0] for rcpt, ids in received.items()
    }
    # A campaign started in the migrated ledger gets an identity of its own.
    fresh = run_cli("send", "recipients.csv", "template.txt", "--campaign", "fresh",
                    "--transport", smtp_server.url, cwd=tmp_path)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    for rcpt, ids in _ids(smtp_server).items():
        assert len(ids) == 2 and ids[1] not in (_name_derived("fresh", rcpt), ids[0])


def test_list_id_beside_list_unsubscribe(tmp_path: Path, smtp_server: SmtpServer) -> None:
    write_campaign(tmp_path, 2)
    env = {"MERGEKIT_UNSUBSCRIBE_SECRET": "s3cret"}
    for campaign in ("news-2026", "Lettre d'été / juin"):
        sent = run_cli("send", "recipients.csv", "template.txt", "--campaign", campaign, "--transport",
                       smtp_server.url, "--unsubscribe-url", "https://example.com/u/{token}", cwd=tmp_path,
                       env=env)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    plain = run_cli("send", "recipients.csv", "template.txt", "--campaign", "plain", "--transport",
                    smtp_server.url, cwd=tmp_path)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    headers = [(m.parsed(strict=True)["List-Id"], m.data) for m in smtp_server.messages]
    assert len(headers) == 6
    assert [value for value, _ in headers[4:]] == [None, None]  # no unsubscribe: no List-Id
    assert {value for value, _ in headers[:2]} == {"news-2026 <news-2026.example.com>"}
    assert b"\r\nList-Id: news-2026 <news-2026.example.com>\r\n" in headers[0][1]
    accented = {value for value, _ in headers[2:4]}
    assert len(accented) == 1
    (value,) = accented
    assert value.startswith("Lettre d'été / juin <Lettre-d-t-juin-")  # the phrase decoded, the label ASCII
    for _, raw in headers[:4]:
        line = re.search(rb"\r\nList-Id: ([^\r\n]*(?:\r\n [^\r\n]*)*)", raw)
        assert line is not None and line.group(1).isascii()
        assert LIST_ID.match(line.group(1).decode().replace("\r\n", ""))


def _start(ledger: Ledger, name: str) -> Campaign:
    return ledger.open_campaign(name, template_path="t.txt", template_source="x", fingerprint="f",
                                transport="null://", allow_template_change=False)  # fmt: skip


def _downgrade(location: str) -> None:
    """Make the ledger at ``location`` what the schema before identities was (its campaigns kept)."""
    if location.startswith("postgresql://"):
        with psycopg.connect(location, autocommit=True) as db:
            db.execute("ALTER TABLE mergekit_campaigns DROP COLUMN identity")
            db.execute("UPDATE mergekit_schema SET version = 1")
        return
    with sqlite3.connect(location) as lite:
        lite.execute("ALTER TABLE campaigns DROP COLUMN identity")
        lite.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    lite.close()


def test_identity_is_made_once_and_migrated_on_both_engines(ledger_location: str) -> None:
    ledger = open_ledger(ledger_location)
    try:
        old = _start(ledger, "old")
    finally:
        ledger.close()
    _downgrade(ledger_location)
    ledger = open_ledger(ledger_location)  # migrates: the campaign from before keeps its name as identity
    try:
        assert ledger.find_campaign("old").identity == "old"
        assert _start(ledger, "old").identity == "old"  # resumed, not re-made
        new, again = _start(ledger, "new"), _start(ledger, "new")
        assert new.identity == again.identity and new.identity not in ("new", "old", old.identity)
        assert re.fullmatch(r"campaign:[0-9a-f]{32}", new.identity)
    finally:
        ledger.close()
    reopened = open_ledger(ledger_location)
    try:
        assert reopened.find_campaign("new").identity == new.identity
    finally:
        reopened.close()


def test_render_processes_use_the_campaign_identity(tmp_path: Path, smtp_server: SmtpServer) -> None:
    """Templates cross to render processes pickled: the identity goes with them."""
    recipients, template = write_campaign(tmp_path, 6)
    options = SendOptions(render_processes=2, concurrency=2, batch_size=1)
    report = send(recipients, template, transport=smtp_server.url, ledger_path=str(tmp_path / "l.db"),
                  options=options)  # fmt: skip
    assert report.exit_code == 0
    received = _ids(smtp_server)
    assert len(received) == 6
    for rcpt, ids in received.items():
        assert ids != [_name_derived("recipients-template", rcpt)]
