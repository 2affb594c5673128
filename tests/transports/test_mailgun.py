"""mailgun: a 1,000-row campaign into the fake API, and what is particular to mailgun."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from mergekit.campaign import ContentOptions
from tests.transports.api_campaign import FAST, TEMPLATE, make_campaign, run_campaign, url_for
from tests.transports.fakeapi import FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("mailgun", api, tmp_path, caplog, bad=0)


def test_one_message_per_request_without_substitution(
    api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_campaign("mailgun", api, tmp_path, caplog, bad=0, extra="substitution=false", per_request=1)


def test_refused_shared_request_is_resent_one_by_one(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    campaign = make_campaign(tmp_path, 40, bad=2)
    api.bad |= campaign.bad
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("mailgun", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["sent"] == 38 and report.run.counts["failed"] == 2
    assert api.requests["mailgun"] == 1 + 40


def test_template_text_with_mailgun_syntax_turns_the_path_off(
    api: FakeApi, keys_in_env: None, tmp_path: Path
) -> None:
    campaign = make_campaign(tmp_path, 12, template=TEMPLATE.replace("100% sure", "%recipient.x% sure"))
    mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("mailgun", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert api.requests["mailgun"] == 12


def test_per_row_headers_split_the_shared_request(
    api: FakeApi, keys_in_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mailgun has no per-recipient header in batch form: rows with their own List-Unsubscribe go alone."""
    monkeypatch.setenv("MERGEKIT_UNSUBSCRIBE_SECRET", "unsub-secret")
    campaign = make_campaign(tmp_path, 6)
    content = ContentOptions(unsubscribe_url="https://example.com/u?e={email}")
    mergekit.send(
        campaign.csv, campaign.template, transport=url_for("mailgun", api),
        ledger_path=str(campaign.ledger), options=FAST, content=content,
    )  # fmt: skip
    assert api.requests["mailgun"] == 6
    assert len({d.headers["List-Unsubscribe"] for d in api.deliveries}) == 6
