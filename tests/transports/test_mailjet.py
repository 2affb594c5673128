"""mailjet: a 1,000-row campaign into the fake API, and what is particular to mailjet."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from tests.transports.api_campaign import FAST, make_campaign, run_campaign
from tests.transports.fakeapi import KEYS, FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("mailjet", api, tmp_path, caplog)


def test_key_pair_from_the_url(
    api: FakeApi, keys_in_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MJ_APIKEY_PUBLIC")
    monkeypatch.delenv("MJ_APIKEY_PRIVATE")
    campaign = make_campaign(tmp_path, 60)
    url = f"mailjet://{KEYS['mailjet_public']}:{KEYS['mailjet_private']}@?base_url={api.base_url}"
    report = mergekit.send(
        campaign.csv, campaign.template, transport=url, ledger_path=str(campaign.ledger), options=FAST
    )
    assert report.run.counts["sent"] == 60
    assert api.requests["mailjet"] == 2
    status = mergekit.status(ledger_path=str(campaign.ledger))
    assert KEYS["mailjet_private"] not in repr(status)
