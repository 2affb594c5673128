"""resend: a 1,000-row campaign into the fake API, and what is particular to resend."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from tests.transports.api_campaign import FAST, make_campaign, run_campaign, url_for
from tests.transports.fakeapi import FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("resend", api, tmp_path, caplog)


def test_retried_batch_carries_the_same_idempotency_key(
    api: FakeApi, keys_in_env: None, tmp_path: Path
) -> None:
    api.fail(2, 503)
    campaign = make_campaign(tmp_path, 150)
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("resend", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["sent"] == 150
    # Two batches (100 + 50); the two failed requests were retried with their keys.
    assert len(api.keys_seen) == 4 and len(set(api.keys_seen)) == 2


def test_concurrent_idempotent_request_409_is_transient(
    api: FakeApi, keys_in_env: None, tmp_path: Path
) -> None:
    api.fail(
        1, 409, body={"statusCode": 409, "name": "concurrent_idempotent_requests", "message": "in progress"}
    )
    campaign = make_campaign(tmp_path, 10)
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("resend", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["sent"] == 10
    assert api.requests["resend"] == 2
