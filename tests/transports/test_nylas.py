"""nylas: a 1,000-row campaign into the fake API, and what is particular to nylas."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from mergekit.ledger import RowUpdate, open_ledger
from tests.transports.api_campaign import FAST, make_campaign, run_campaign, url_for
from tests.transports.fakeapi import FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("nylas", api, tmp_path, caplog)


def test_replayed_request_is_not_sent_twice(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    campaign = make_campaign(tmp_path, 4)
    url = url_for("nylas", api)
    mergekit.send(
        campaign.csv, campaign.template, transport=url, ledger_path=str(campaign.ledger), options=FAST
    )
    # Its rows sent again as after a lost reply (unknown, then resent): same Message-IDs, same keys.
    ledger = open_ledger(str(campaign.ledger))
    record = ledger.find_campaign(None)
    sent = ledger.claim(record, 10, states=["sent"], due_before=None)
    ledger.record(record, [RowUpdate(row.id, "unknown", attempted=False) for row in sent])
    ledger.close()
    mergekit.retry(ledger_path=str(campaign.ledger), transport=url, options=FAST)
    assert api.requests["nylas"] == 8
    assert len(api.deliveries) == 4
