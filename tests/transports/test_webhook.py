"""webhook: a 1,000-row campaign into the fake API, and what is particular to webhook."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from mergekit.errors import ConfigError
from mergekit.transports import transport_from_url
from tests.transports.api_campaign import FAST, make_campaign, run_campaign, url_for
from tests.transports.fakeapi import FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("webhook", api, tmp_path, caplog)


def test_unsigned_without_a_secret(
    api: FakeApi, keys_in_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MERGEKIT_WEBHOOK_SECRET")
    campaign = make_campaign(tmp_path, 5)
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("webhook", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["failed"] == 5  # our fake endpoint insists on a signature
    _, rows = mergekit.report(ledger_path=str(campaign.ledger))
    assert {row.last_code for row in rows} == {401}


def test_batch_size_from_the_url(keys_in_env: None) -> None:
    assert transport_from_url("webhook+https://hooks.example.com/x?batch_size=7").max_batch == 7
    with pytest.raises(ConfigError):
        transport_from_url("webhook+https://hooks.example.com/x?batch_size=0")
