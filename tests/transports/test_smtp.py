"""SMTP transport against a real aiosmtpd server: pool, refusals, retries, TLS."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme

from mergekit import SendOptions, SendReport, report, retry, send, status
from mergekit.errors import ConfigError, TransportError
from mergekit.ledger import LedgerRow
from mergekit.transports import transport_from_url
from tests.helpers import write_campaign
from tests.smtpd import SmtpServer

FAST = SendOptions(concurrency=4, backoff_initial=0.01, backoff_max=0.02)


def send_to(server: SmtpServer, folder: Path, rows: int, options: SendOptions = FAST) -> SendReport:
    """A ``rows``-row campaign from ``folder`` into ``server``, ledger ``folder/l.db``."""
    recipients, template = write_campaign(folder, rows)
    return send(
        recipients,
        template,
        transport=f"smtp://127.0.0.1:{server.port}",
        ledger_path=str(folder / "l.db"),
        options=options,
    )


def rows_in(folder: Path, state: str) -> list[LedgerRow]:
    _, rows = report(ledger_path=str(folder / "l.db"), states=[state])
    return list(rows)


def test_pool_uses_at_most_concurrency_connections(smtp_server: SmtpServer, tmp_path: Path) -> None:
    result = send_to(smtp_server, tmp_path, 500, SendOptions(concurrency=4, batch_size=20))
    received = smtp_server.handler.by_recipient()
    assert result.exit_code == 0
    assert smtp_server.stats.most_at_once <= 4
    assert smtp_server.stats.opened <= 4
    assert len(smtp_server.messages) == 500
    assert all(len(received[f"user{i}@example.org"]) == 1 for i in range(1, 501))
    assert status(ledger_path=str(tmp_path / "l.db"))["sent"] == 500


def test_refused_recipient_fails_and_others_go(smtp_server: SmtpServer, tmp_path: Path) -> None:
    smtp_server.handler.refuse["user3@example.org"] = "550 5.1.1 <user3@example.org>: no such user"
    result = send_to(smtp_server, tmp_path, 6)
    assert result.exit_code == 1
    assert result.run.counts["sent"] == 5 and result.run.counts["failed"] == 1
    failed = rows_in(tmp_path, "failed")
    assert [(r.row, r.last_code) for r in failed] == [(3, 550)]
    assert "no such user" in failed[0].last_text
    assert len(smtp_server.messages) == 5


def test_transient_refusal_is_retried_then_deferred(smtp_server: SmtpServer, tmp_path: Path) -> None:
    smtp_server.handler.defer["user2@example.org"] = "451 4.7.1 greylisted, try later"
    result = send_to(smtp_server, tmp_path, 3)
    assert result.exit_code == 3
    assert result.run.counts["deferred"] == 1 and result.run.counts["sent"] == 2
    (deferred,) = rows_in(tmp_path, "deferred")
    assert deferred.attempts == 3 and deferred.last_code == 451
    assert deferred.next_attempt_at is not None
    # The server lets it through now; `retry` sends it at once.
    del smtp_server.handler.defer["user2@example.org"]
    again = retry(ledger_path=str(tmp_path / "l.db"), options=FAST)
    assert again.exit_code == 0 and again.run.this_run["sent"] == 1
    assert len(smtp_server.handler.by_recipient()["user2@example.org"]) == 1


def test_data_deferred_once_then_accepted(smtp_server: SmtpServer, tmp_path: Path) -> None:
    smtp_server.handler.defer_data_times = 2
    assert send_to(smtp_server, tmp_path, 4).exit_code == 0
    assert len(smtp_server.messages) == 4


def test_implicit_tls_with_verification(
    smtps_server: SmtpServer, tmp_path: Path, certificate_authority: trustme.CA
) -> None:
    recipients, template = write_campaign(tmp_path, 3)
    ca_file = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(ca_file))
    unverified = f"smtps://localhost:{smtps_server.port}"
    with pytest.raises(TransportError, match="certificate"):
        send(recipients, template, transport=unverified, ledger_path=str(tmp_path / "a.db"), options=FAST)
    assert smtps_server.messages == []
    report = send(
        recipients,
        template,
        transport=f"{unverified}?ca_file={ca_file}",
        ledger_path=str(tmp_path / "b.db"),
        options=FAST,
    )
    assert report.exit_code == 0 and len(smtps_server.messages) == 3


def test_tls_verify_false_warns(
    smtps_server: SmtpServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipients, template = write_campaign(tmp_path, 2)
    report = send(
        recipients,
        template,
        transport=f"smtps://localhost:{smtps_server.port}?tls_verify=false",
        ledger_path=str(tmp_path / "l.db"),
        options=FAST,
    )
    assert report.exit_code == 0
    assert "verification is OFF" in caplog.text


def test_password_never_goes_in_clear_text_to_a_remote_host() -> None:
    with pytest.raises(ConfigError, match="clear text"):
        transport_from_url("smtp://user:hunter2@mail.example.com?starttls=never")


def test_unknown_scheme_lists_accepted_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        transport_from_url("carrier-pigeon://coop")
    assert "smtp://" in str(caught.value) and "maildir://" in str(caught.value)
    assert caught.value.option == "--transport"


def test_server_down_is_a_transport_error(tmp_path: Path) -> None:
    from tests.smtpd import free_port

    transport = transport_from_url(f"smtp://127.0.0.1:{free_port()}")
    with pytest.raises(TransportError, match="cannot connect"):
        asyncio.run(transport.open())


def test_starttls_then_login(certificate_authority: trustme.CA, tmp_path: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("localhost").configure_cert(context)
    server = SmtpServer(starttls_context=context, login=("mailer", "pw")).start()
    try:
        recipients, template = write_campaign(tmp_path, 3)
        ca_file = tmp_path / "ca.pem"
        certificate_authority.cert_pem.write_to_path(str(ca_file))
        url = f"smtp://mailer:pw@localhost:{server.port}?starttls=always&ca_file={ca_file}"
        report = send(recipients, template, transport=url, ledger_path=str(tmp_path / "l.db"), options=FAST)
        assert report.exit_code == 0 and len(server.messages) == 3
    finally:
        server.stop()
