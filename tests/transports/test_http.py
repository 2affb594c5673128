"""What every HTTP transport shares (transports/http.py): keys, status classing, timeouts, redaction."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path

import pytest

import mergekit
from mergekit.errors import ConfigError
from mergekit.transports import transport_from_url
from mergekit.transports.http import parse_retry_after
from tests.conftest import run_cli
from tests.transports.api_campaign import ENV, FAST, SECRETS, URLS, make_campaign, url_for
from tests.transports.fakeapi import KEYS, RESET, TRUNCATED, FakeApi

MISSING = {
    "postmark": "POSTMARK_SERVER_TOKEN",
    "resend": "RESEND_API_KEY",
    "mailjet": "MJ_APIKEY_PUBLIC",
    "sendgrid": "SENDGRID_API_KEY",
    "mailgun": "MAILGUN_API_KEY",
    "ses": "AWS_ACCESS_KEY_ID",
    "nylas": "NYLAS_API_KEY",
}


@pytest.mark.parametrize("provider", sorted(MISSING))
def test_missing_key_is_a_config_error_naming_the_variable(
    provider: str, api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [*ENV, "AWS_PROFILE", "AWS_SESSION_TOKEN"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    campaign = make_campaign(tmp_path, 3)
    with pytest.raises(ConfigError, match=MISSING[provider]) as raised:
        mergekit.send(
            campaign.csv,
            campaign.template,
            transport=url_for(provider, api),
            ledger_path=str(campaign.ledger),
            options=FAST,
        )
    assert raised.value.option == "--transport"
    assert sum(api.requests.values()) == 0


@pytest.mark.parametrize("provider", sorted(URLS))
def test_bad_key_401_fails_the_rows_and_never_shows_a_key(
    provider: str, api: FakeApi, keys_in_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = {
        "postmark": "POSTMARK_SERVER_TOKEN",
        "resend": "RESEND_API_KEY",
        "mailjet": "MJ_APIKEY_PRIVATE",
        "sendgrid": "SENDGRID_API_KEY",
        "mailgun": "MAILGUN_API_KEY",
        "ses": "AWS_SECRET_ACCESS_KEY",
        "nylas": "NYLAS_API_KEY",
        "webhook": "MERGEKIT_WEBHOOK_SECRET",
    }[provider]
    monkeypatch.setenv(wrong, "WRONG-KEY-SECRET")
    campaign = make_campaign(tmp_path, 5)
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for(provider, api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["failed"] == 5
    _, rows = mergekit.report(ledger_path=str(campaign.ledger))
    for row in rows:
        assert row.last_code in {401, 403}
        assert "WRONG-KEY-SECRET" not in row.last_text


def test_key_in_the_url_is_redacted_everywhere(api: FakeApi, tmp_path: Path) -> None:
    campaign = make_campaign(tmp_path, 20)
    url = f"postmark://:{KEYS['postmark']}@?base_url={api.base_url}"
    env = {name: "" for name in ENV}
    result = run_cli(
        "send", str(campaign.csv), str(campaign.template), "--transport", url,
        "--ledger", str(campaign.ledger), "--json", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sent"] == 20
    status = run_cli("status", "--ledger", str(campaign.ledger), "--json", cwd=tmp_path, env=env)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr + status.stdout + status.stderr
        assert secret.encode() not in stored
    assert b"postmark://:***@" in stored


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    in_a_minute = parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert in_a_minute is not None and 55 < in_a_minute <= 60
    assert parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None


def test_429_retry_after_is_honoured(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    api.fail(1, 429, headers={"Retry-After": "1"}, body={"ErrorCode": 429, "Message": "Rate limit exceeded"})
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("postmark", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert report.run.counts["sent"] == 10
    (_, first), (_, second) = api.request_times
    assert second - first >= 0.95  # backoff alone would be 0.05 s


def test_sendgrid_rate_limit_reset_header_is_honoured(
    api: FakeApi, keys_in_env: None, tmp_path: Path
) -> None:
    api.fail(1, 429, headers={"X-RateLimit-Reset": str(int(time.time()) + 2)})
    campaign = make_campaign(tmp_path, 5)
    mergekit.send(
        campaign.csv, campaign.template, transport=url_for("sendgrid", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    (_, first), (_, second) = api.request_times
    assert second - first >= 0.9


def test_unreadable_2xx_is_unknown_never_sent(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    api.fail(1, 200, raw=b"<html>proxy says hi</html>")
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("postmark", api),
        ledger_path=str(campaign.ledger), options=replace(FAST, unknown="skip"),
    )  # fmt: skip
    assert report.run.counts["unknown"] == 10, report.run.counts
    assert report.run.counts["sent"] == 0
    assert report.exit_code == 3  # resumable: --unknown resend sends them again, same Message-IDs
    _, rows = mergekit.report(ledger_path=str(campaign.ledger))
    assert all("may have been sent" in row.last_text for row in rows)


def test_5xx_then_success(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    api.fail(2, 503)
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("mailjet", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert report.run.counts["sent"] == 10
    assert api.requests["mailjet"] == 3


def test_5xx_every_time_leaves_rows_deferred(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    api.fail(3, 502)
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("resend", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert report.run.counts["deferred"] == 10
    assert report.exit_code == 3


def test_connection_refused_is_transient(keys_in_env: None, tmp_path: Path) -> None:
    campaign = make_campaign(tmp_path, 5)
    with FakeApi() as closed:
        base = closed.base_url  # the port is free again once the server is gone
    report = mergekit.send(
        campaign.csv, campaign.template, transport=f"postmark://?base_url={base}",
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert report.run.counts["deferred"] == 5


def test_timeout_is_transient(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    api.delay(1.0)
    campaign = make_campaign(tmp_path, 5)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("nylas", api, "timeout=0.3"),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert report.run.counts["sent"] == 5
    _, rows = mergekit.report(ledger_path=str(campaign.ledger))
    assert max(row.attempts for row in rows) == 2


def test_cleartext_base_url_only_to_loopback(keys_in_env: None) -> None:
    with pytest.raises(ConfigError, match="cleartext"):
        transport_from_url("postmark://?base_url=http://api.example.com")
    assert (
        transport_from_url("postmark://?base_url=http://localhost:8080").base_url == "http://localhost:8080"
    )
    eu = transport_from_url("mailgun://mg.example.com?base_url=https://api.eu.mailgun.net")
    assert eu.base_url == "https://api.eu.mailgun.net"


def test_unknown_scheme_lists_the_http_ones() -> None:
    with pytest.raises(ConfigError) as raised:
        transport_from_url("sparkpost://")
    for scheme in (
        "postmark://",
        "resend://",
        "mailjet://",
        "sendgrid://",
        "mailgun://",
        "ses://",
        "nylas://",
    ):
        assert scheme in str(raised.value)


def test_api_recipients_come_from_the_render_not_a_second_parse() -> None:
    """A display name holding "@" and "," from the data adds no recipient on the API path."""
    from mergekit.render import Template, TemplateSource
    from mergekit.transports.http import recipients

    template = Template(
        TemplateSource.parse(
            "From: News <news@example.com>\nTo: {{ name }} <{{ email }}>\nSubject: s\n\nx\n"
        ),
        campaign="c",
    )
    message = template.render({"name": "x@evil.example, Jo", "email": "jo@example.org"}, row=1, key="k")
    people = recipients(message)
    assert people.to == [("x@evil.example, Jo", "jo@example.org")]
    assert people.bcc == [] and people.sender == ("News", "news@example.com")


def test_api_recipients_split_to_cc_bcc_and_reply_to() -> None:
    """Bcc is what the envelope holds beyond To and Cc, compared without regard to case."""
    from mergekit.render import Template, TemplateSource
    from mergekit.transports.http import recipients

    template = Template(
        TemplateSource.parse(
            "From: News <news@example.com>\nTo: {{ name }} <{{ email }}>\nCc: Boss <Boss@Example.org>\n"
            "Bcc: archive@example.net, boss@example.org\nReply-To: help@example.com\nSubject: s\n\nx\n"
        ),
        campaign="c",
    )
    message = template.render({"name": "Jo", "email": "jo@example.org"}, row=1, key="k")
    people = recipients(message)
    assert people.to == [("Jo", "jo@example.org")]
    assert people.cc == [("Boss", "Boss@example.org")]  # the renderer lowers the domain only
    assert people.bcc == [("", "archive@example.net")]
    assert people.reply_to == [("", "help@example.com")]


@pytest.mark.parametrize("codec", ["stdlib", "orjson"])
@pytest.mark.parametrize("provider", ["postmark", "resend", "mailjet"])
def test_each_json_codec_sends_what_was_rendered(
    codec: str,
    provider: str,
    api: FakeApi,
    keys_in_env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """orjson (the fast extra) and the stdlib fallback write the same requests and read the same replies."""
    from mergekit.transports import http, postmark

    if codec == "orjson":
        orjson = pytest.importorskip("orjson")
        dumps, loads = orjson.dumps, orjson.loads
    else:
        dumps, loads = http._stdlib_json_bytes, json.loads
    monkeypatch.setattr(http, "json_bytes", dumps)
    monkeypatch.setattr(http, "json_loads", loads)
    monkeypatch.setattr(postmark, "json_bytes", dumps)
    campaign = make_campaign(tmp_path, 120, bad=2)
    api.bad.update(campaign.bad)
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for(provider, api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert (report.run.counts["sent"], report.run.counts["failed"]) == (118, 2)
    delivered = {d.to[0].rpartition("<")[2].rstrip(">"): d for d in api.deliveries}
    for address, (subject, text) in campaign.expected().items():
        if address not in campaign.bad:
            assert (delivered[address].subject, delivered[address].text) == (subject, text)


def test_429_without_retry_after_is_retried_after_backoff(
    api: FakeApi, keys_in_env: None, tmp_path: Path
) -> None:
    api.fail(1, 429, body={"ErrorCode": 429, "Message": "Rate limit exceeded"})
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("postmark", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert report.run.counts["sent"] == 10 and api.requests["postmark"] == 2


def test_connection_reset_mid_response_is_retried(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    """The server dropped the connection before a status: nothing says the batch was taken or not.

    httpx raises a protocol error; it is retried (a transient network failure), and
    Resend's retry carries the same Idempotency-Key so the provider can collapse it.
    """
    api.fail(1, RESET)
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("resend", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert report.run.counts["sent"] == 10
    assert api.requests["resend"] == 2 and len(set(api.keys_seen)) == 1


def test_truncated_200_is_unknown_never_sent(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    api.fail(1, TRUNCATED)
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("postmark", api),
        ledger_path=str(campaign.ledger), options=replace(FAST, unknown="skip"),
    )  # fmt: skip
    assert report.run.counts["sent"] == 0
    assert report.run.counts["unknown"] + report.run.counts["deferred"] == 10
    assert report.run.counts["unknown"] == 10, report.run.counts
