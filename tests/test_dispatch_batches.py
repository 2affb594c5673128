"""Dispatch's batches: even shares across workers, and batches with nothing to send."""

from __future__ import annotations

from pathlib import Path

from mergekit import SendOptions, send
from mergekit.dispatch import in_chunks
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


def test_chunks_follow_a_batch_size_that_shrinks_midway() -> None:
    """A throttle shrinks the batch size while a batch goes out in chunks: every row goes, once.

    Stepping by the size read once skipped rows, which a run left ``sending`` (seen once in
    tests/test_postfix.py's throttling run: 119 sent, 1 sending).
    """
    sizes = iter([4, 3, 1, 1, 2])
    chunks = [list(chunk) for chunk in in_chunks(list(range(10)), lambda: next(sizes))]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6], [7], [8], [9]]
