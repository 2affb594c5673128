"""Dispatch's batches: even shares across workers, and batches with nothing to send."""

from __future__ import annotations

from pathlib import Path

from mergekit import SendOptions, send
from tests.helpers import write_campaign
from tests.smtpd import SmtpServer


def test_a_batch_of_only_invalid_rows_is_recorded(smtp_server: SmtpServer, tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 4)
    text = recipients.read_text().replace("user2@example.org", "user2@localhost")
    recipients.write_text(text)
    report = send(
        recipients,
        template,
        transport=f"smtp://127.0.0.1:{smtp_server.port}",
        ledger_path=str(tmp_path / "l.db"),
        options=SendOptions(concurrency=2, batch_size=1),
    )
    counts = report.run.counts
    assert (counts["sent"], counts["invalid"], counts["sending"]) == (3, 1, 0)
    assert report.exit_code == 1


def test_every_connection_gets_an_equal_share(smtp_server: SmtpServer, tmp_path: Path) -> None:
    # 130 rows, 4 workers, batches of at most 100: 4 batches of 33 or fewer, not 100 + 30.
    recipients, template = write_campaign(tmp_path, 130)
    report = send(
        recipients,
        template,
        transport=f"smtp://127.0.0.1:{smtp_server.port}",
        ledger_path=str(tmp_path / "l.db"),
        options=SendOptions(concurrency=4),
    )
    assert report.run.counts["sent"] == 130
    assert smtp_server.stats.opened == 4
