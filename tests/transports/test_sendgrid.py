"""sendgrid: a 1,000-row campaign into the fake API, and what is particular to sendgrid."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from mergekit.campaign import ContentOptions
from tests.transports.api_campaign import FAST, TEMPLATE, make_campaign, run_campaign, url_for
from tests.transports.fakeapi import FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("sendgrid", api, tmp_path, caplog, bad=0)


def test_one_message_per_request_without_substitution(
    api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_campaign("sendgrid", api, tmp_path, caplog, bad=0, extra="substitution=false", per_request=1)


def test_template_with_tags_falls_back_to_one_per_request(
    api: FakeApi, keys_in_env: None, tmp_path: Path
) -> None:
    template = TEMPLATE.replace("{{ city }}.", "{{ city | upper }}.")
    campaign = make_campaign(tmp_path, 30, template=template)
    mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("sendgrid", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert api.requests["sendgrid"] == 30
    expected = campaign.expected()
    for delivery in api.deliveries:
        assert (delivery.subject, delivery.text) == expected[delivery.to[0]]


def test_refused_shared_request_is_resent_one_by_one(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    campaign = make_campaign(tmp_path, 40, bad=1)
    api.bad |= campaign.bad
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("sendgrid", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["sent"] == 39 and report.run.counts["failed"] == 1
    assert api.requests["sendgrid"] == 1 + 40  # the shared request, then one per message
    _, rows = mergekit.report(ledger_path=str(campaign.ledger), states=["failed"])
    assert [row.last_text for row in rows] == [
        'sendgrid: HTTP 400: [{"message": "Does not contain a valid address.", "field": "personalizations.0.to.0.email"}]'  # noqa: E501
    ]


def test_message_id_per_personalization(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    campaign = make_campaign(tmp_path, 5)
    mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("sendgrid", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert api.requests["sendgrid"] == 1
    assert len({d.headers["Message-ID"] for d in api.deliveries}) == 5
    assert all(d.headers["X-Campaign"] == "spring" for d in api.deliveries)


def test_per_row_list_unsubscribe_still_shares_a_request(
    api: FakeApi, keys_in_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGEKIT_UNSUBSCRIBE_SECRET", "unsub-secret")
    template = TEMPLATE + "Leave: {{ unsubscribe_url }}\n"
    campaign = make_campaign(tmp_path, 50, template=template)
    content = ContentOptions(unsubscribe_url="https://example.com/u?e={email}")
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url_for("sendgrid", api),
        ledger_path=str(campaign.ledger), options=FAST, content=content,
    )  # fmt: skip
    assert report.run.counts["sent"] == 50
    assert api.requests["sendgrid"] == 1
    unsubscribes = {d.headers["List-Unsubscribe"] for d in api.deliveries}
    assert len(unsubscribes) == 50
    for delivery in api.deliveries:
        assert delivery.text is not None
        assert delivery.headers["List-Unsubscribe"].strip("<>") in delivery.text


def test_markdown_template_goes_one_per_request_intact(
    api: FakeApi, keys_in_env: None, tmp_path: Path
) -> None:
    markdown = TEMPLATE.replace("X-Campaign: spring\n", "X-Campaign: spring\nContent-Type: text/markdown\n")
    campaign = make_campaign(tmp_path, 8, template=markdown + "\n**bold** {{ name }}\n")
    mergekit.send(
        campaign.csv, campaign.template, transport=url_for("sendgrid", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    assert api.requests["sendgrid"] == 8
    for delivery in api.deliveries:
        assert delivery.html is not None and "<strong>bold</strong>" in delivery.html


@pytest.mark.parametrize("extra", ["", "substitution=false"])
def test_empty_subject_or_body_fails_without_a_request(
    api: FakeApi, keys_in_env: None, tmp_path: Path, extra: str
) -> None:
    # SendGrid's document gives subject and content values minLength 1: no request can carry them.
    template = "From: ada@example.com\nTo: {{ email }}\nSubject: {{ subject }}\n\n{{ body }}"
    rows = "email,subject,body\na@example.org,,text\nb@example.org,Hi,\nc@example.org,Hi,text\n"
    (tmp_path / "people.csv").write_text(rows, encoding="utf-8")
    (tmp_path / "t.txt").write_text(template, encoding="utf-8")
    ledger = str(tmp_path / "ledger.db")
    report = mergekit.send(
        tmp_path / "people.csv",
        tmp_path / "t.txt",
        transport=url_for("sendgrid", api, extra),
        ledger_path=ledger,
    )
    assert (report.run.counts["sent"], report.run.counts["failed"]) == (1, 2)
    assert api.requests["sendgrid"] == 1
    assert [d.to for d in api.deliveries] == [["c@example.org"]]
    _, ledger_rows = mergekit.report(ledger_path=ledger)
    reasons = {row.email: row.last_text for row in ledger_rows if row.state == "failed"}
    assert "empty Subject" in reasons["a@example.org"]
    assert "empty body" in reasons["b@example.org"]
