"""One-click unsubscribe headers and tokens; suppression at ingest and on resume."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit import campaign
from mergekit.cli import main
from mergekit.dispatch import SendOptions
from mergekit.errors import ConfigError
from mergekit.ledger import RowUpdate, open_ledger
from mergekit.render import TemplateSource
from mergekit.source import read_rows
from mergekit.unsubscribe import SECRET_VARIABLE, Unsubscribe, read_suppression
from tests.smtpd import SmtpServer

TEMPLATE = (
    "From: News <news@example.com>\nTo: {{ email }}\nSubject: News\nContent-Type: text/html\n\n"
    '<p>Hi {{ name }}. <a href="{{ unsubscribe_url }}">Unsubscribe</a></p>\n'
)
CSV = "email,name\nada@example.com,Ada\nbob@example.com,Bob\nCarol@Example.com,Carol\n"

# One connection, one batch: messages reach the server in row order, as these tests index them.
IN_ROW_ORDER = SendOptions(concurrency=1, batch_size=100)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "news.txt").write_text(TEMPLATE, encoding="utf-8")
    (tmp_path / "people.csv").write_text(CSV, encoding="utf-8")
    return tmp_path


def _token(secret: str, campaign_name: str, key: str) -> str:
    digest = hmac.new(secret.encode(), f"{campaign_name}\x00{key}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def test_list_unsubscribe_headers_and_token(
    files: Path, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, "s3cret")
    content = campaign.ContentOptions(
        unsubscribe_url="https://example.com/u/{token}?c={campaign}", unsubscribe_mailto="leave@example.com"
    )
    campaign.send(
        files / "people.csv",
        files / "news.txt",
        transport=smtp_server.url,
        ledger_path=str(files / "l.db"),
        content=content,
        options=IN_ROW_ORDER,
    )
    assert len(smtp_server.messages) == 3
    message = smtp_server.messages[0].parsed(strict=True)
    token = _token("s3cret", "people-news", "ada@example.com")
    url = f"https://example.com/u/{token}?c=people-news"
    assert message["List-Unsubscribe"] == f"<{url}>, <mailto:leave@example.com?subject=unsubscribe%20{token}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f'href="{url.replace("&", "&amp;")}"' in str(message.get_body(("html",)).get_content())
    assert "s3cret" not in (files / "l.db").read_bytes().decode("latin-1")


def test_mailto_only_has_no_one_click_post(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, "k")
    unsubscribe = Unsubscribe.from_options(None, "mailto:leave@example.com")
    assert unsubscribe is not None
    headers = dict(unsubscribe.headers("c", "a@example.com", "a@example.com"))
    assert "List-Unsubscribe-Post" not in headers  # RFC 8058 3.1: one-click needs an HTTPS URI
    assert headers["List-Unsubscribe"].startswith("<mailto:leave@example.com?subject=unsubscribe%20")


def test_refused_without_secret_naming_the_variable(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_VARIABLE, raising=False)
    result = CliRunner().invoke(
        main,
        [
            "send", str(files / "people.csv"), str(files / "news.txt"), "--transport", "null://",
            "--ledger", str(files / "l.db"), "--unsubscribe-url", "https://example.com/u/{token}",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert SECRET_VARIABLE in result.output and "--unsubscribe-url" in result.output
    assert not (files / "l.db").exists()


@pytest.mark.parametrize("url", ["http://example.com/u/{token}", "https://example.com/{nope}"])
def test_bad_unsubscribe_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        Unsubscribe.from_options(url, None, environ={SECRET_VARIABLE: "k"})


def test_suppression_file_formats(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("name,EMAIL\nX, Bob@Example.com \n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("# unsubscribed\ncarol@example.com\n\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text("name,phone\nx,1\n", encoding="utf-8")
    found = read_suppression([tmp_path / "a.csv", tmp_path / "b.txt"])
    assert found == {"bob@example.com": str(tmp_path / "a.csv"), "carol@example.com": str(tmp_path / "b.txt")}
    with pytest.raises(Exception, match="no 'email' column"):
        read_suppression([tmp_path / "c.csv"])


def test_a_suppression_csv_with_two_address_columns_is_refused_before_anything(
    files: Path, smtp_server: SmtpServer
) -> None:
    """``email,EMAIL`` in a --suppress CSV: which column lists the addresses is not certain."""
    (files / "stop.csv").write_text("email,EMAIL\nbob@example.com,ada@example.com\n", encoding="utf-8")
    (files / "plain.txt").write_text(
        "From: n@example.com\nTo: {{ email }}\nSubject: s\n\nHi\n", encoding="utf-8"
    )
    runner = CliRunner()
    args = ["send", str(files / "people.csv"), str(files / "plain.txt"), "--transport", smtp_server.url]
    args += ["--ledger", str(files / "l.db"), "--suppress", str(files / "stop.csv")]
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "columns 'email' and 'EMAIL' both match the address column 'email'" in result.output
    assert "stop.csv" in result.output and "Traceback" not in result.output
    assert smtp_server.messages == []
    status = runner.invoke(main, ["status", "--ledger", str(files / "l.db"), "--json"])
    assert status.exit_code == 2 or json.loads(status.stdout)["total"] == 0, status.output


def test_suppressed_at_ingest_counted_and_never_sent(files: Path, smtp_server: SmtpServer) -> None:
    (files / "stop.txt").write_text("bob@example.com\ncarol@example.com\n", encoding="utf-8")
    (files / "plain.txt").write_text(
        "From: n@example.com\nTo: {{ email }}\nSubject: s\n\nHi\n", encoding="utf-8"
    )
    runner = CliRunner()
    args = ["send", str(files / "people.csv"), str(files / "plain.txt"), "--transport", smtp_server.url]
    args += ["--ledger", str(files / "l.db"), "--suppress", str(files / "stop.txt"), "--json"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["suppressed"] == 2
    assert [m.rcpt_tos for m in smtp_server.messages] == [["ada@example.com"]]
    status = runner.invoke(main, ["status", "--ledger", str(files / "l.db"), "--json"])
    assert json.loads(status.stdout)["suppressed"] == 2
    report = runner.invoke(main, ["report", "--ledger", str(files / "l.db"), "--state", "suppressed"])
    assert report.output.count("stop.txt (--suppress)") == 2


def test_resume_reapplies_suppression_even_when_the_csv_changes(files: Path, smtp_server: SmtpServer) -> None:
    (files / "plain.txt").write_text(
        "From: n@example.com\nTo: {{ email }}\nSubject: s\n\nHi\n", encoding="utf-8"
    )
    # A first run that stopped before sending: every row pending, one deferred, one unknown.
    ledger = open_ledger(str(files / "l.db"))
    source = TemplateSource.read(files / "plain.txt")
    record = ledger.open_campaign(
        "people-plain",
        template_path=str((files / "plain.txt").resolve()),
        template_source=source.text,
        fingerprint=source.fingerprint,
        transport="null://",
        allow_template_change=False,
    )
    ledger.ingest(record, read_rows(files / "people.csv"))
    claimed = ledger.claim(record, 2, states=["pending"], due_before=None)
    ledger.record(
        record, [RowUpdate(claimed[0].id, "deferred", next_attempt_at=0), RowUpdate(claimed[1].id, "unknown")]
    )
    ledger.close()
    (files / "stop.txt").write_text("ADA@example.com\nbob@example.com\ncarol@example.com\n", encoding="utf-8")
    report = campaign.send(
        files / "people.csv",
        files / "plain.txt",
        transport=smtp_server.url,
        ledger_path=str(files / "l.db"),
        content=campaign.ContentOptions(suppress=(str(files / "stop.txt"),)),
    )
    assert report.run.counts["suppressed"] == 3 and smtp_server.messages == []
    # The CSV changes (a new row for a suppressed address under another key); the list is not passed again.
    (files / "people.csv").write_text(CSV + "dave@example.com,Dave\n", encoding="utf-8")
    (files / "people2.csv").write_text("email,name,id\nbob@example.com,Bob,new-key\n", encoding="utf-8")
    report = campaign.send(
        files / "people.csv", files / "plain.txt", transport=smtp_server.url, ledger_path=str(files / "l.db")
    )
    assert [m.rcpt_tos for m in smtp_server.messages] == [["dave@example.com"]]
    assert report.run.counts["suppressed"] == 3 and report.run.counts["sent"] == 1
    report = campaign.send(
        files / "people2.csv",
        files / "plain.txt",
        transport=smtp_server.url,
        ledger_path=str(files / "l.db"),
        campaign="people-plain",
        source=campaign.SourceOptions(key_column="id"),
        allow_template_change=True,
    )
    assert len(smtp_server.messages) == 1, "a suppressed address under a new key was sent"
    assert report.run.counts["suppressed"] == 4


def test_retry_renders_with_the_campaigns_content_options(
    files: Path, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, "s3cret")
    assets = files / "assets"
    assets.mkdir()
    (assets / "card.pdf").write_bytes(b"%PDF card")
    (files / "news.txt").write_text(
        TEMPLATE.replace("Subject: News\n", "Subject: News\nAttachment: card.pdf\n")
    )
    content = campaign.ContentOptions(
        attachments_dir=str(assets), unsubscribe_url="https://example.com/u/{token}"
    )
    campaign.send(
        files / "people.csv",
        files / "news.txt",
        transport=smtp_server.url,
        ledger_path=str(files / "l.db"),
        content=content,
    )
    ledger = open_ledger(str(files / "l.db"))
    record = ledger.find_campaign(None)
    (row,) = [
        r for r in ledger.claim(record, 10, states=["sent"], due_before=None) if r.key == "bob@example.com"
    ]
    ledger.record(record, [RowUpdate(row.id, "deferred", next_attempt_at=0)])
    ledger.record(
        record,
        [RowUpdate(r.id, "sent") for r in ledger.claim(record, 10, states=["sending"], due_before=None)],
    )
    ledger.close()
    smtp_server.messages.clear()
    report = campaign.retry(ledger_path=str(files / "l.db"), transport=smtp_server.url)
    assert report.run.this_run["sent"] == 1
    message = smtp_server.messages[0].parsed(strict=True)
    assert (
        message["List-Unsubscribe"]
        == f"<https://example.com/u/{_token('s3cret', 'people-news', 'bob@example.com')}>"
    )
    assert [a.get_filename() for a in message.iter_attachments()] == ["card.pdf"]
