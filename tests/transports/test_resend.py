"""resend: a 1,000-row campaign into the fake API, and what is particular to resend."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from mergekit.transports import transport_from_url
from tests.transports.api_campaign import FAST, TEMPLATE, make_campaign, run_campaign, url_for
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


def test_messages_with_attachments_go_one_by_one(api: FakeApi, keys_in_env: None) -> None:
    import asyncio
    from dataclasses import replace

    from mergekit.render import Template, TemplateSource
    from mergekit.transports.base import Attachment, Status

    compiled = Template(TemplateSource.parse(TEMPLATE), campaign="c")
    rows = [{"email": f"u{i}@example.org", "name": "Ünï", "code": str(i), "city": "X"} for i in range(5)]
    messages = [compiled.render(row, row=i, key=row["email"]) for i, row in enumerate(rows)]
    messages[1] = replace(messages[1], attachments=(Attachment("a.txt", "text/plain", b"hi"),))

    async def go() -> list[Status]:
        async with transport_from_url(url_for("resend", api)) as transport:
            return [outcome.status for outcome in await transport.send_batch(messages)]

    assert asyncio.run(go()) == [Status.SENT] * 5
    assert api.requests["resend"] == 2  # one batch of 4, one POST /emails
    assert {d.text for d in api.deliveries} == {m.text for m in messages}
