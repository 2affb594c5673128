"""ses: a 1,000-row campaign into the fake API, and what is particular to ses."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from mergekit.errors import ConfigError
from mergekit.transports import transport_from_url
from tests.transports.api_campaign import FAST, make_campaign, run_campaign, url_for
from tests.transports.fakeapi import FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("ses", api, tmp_path, caplog)


def test_bad_signature_is_refused(
    api: FakeApi, keys_in_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    campaign = make_campaign(tmp_path, 3)
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("ses", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["failed"] == 3


def test_region_is_required(keys_in_env: None) -> None:
    with pytest.raises(ConfigError, match="AWS_REGION"):
        transport_from_url("ses://")
