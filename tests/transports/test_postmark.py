"""postmark: a 1,000-row campaign into the fake API, and what is particular to postmark."""

from __future__ import annotations

from pathlib import Path

import pytest

import mergekit
from mergekit.transports import transport_from_url
from tests.transports.api_campaign import FAST, TEMPLATE, make_campaign, run_campaign, url_for
from tests.transports.fakeapi import FakeApi


def test_campaign(api: FakeApi, keys_in_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_campaign("postmark", api, tmp_path, caplog)


def test_request_level_422_fails_the_batch(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    api.fail(1, 422, body={"ErrorCode": 300, "Message": "Invalid email request"})
    campaign = make_campaign(tmp_path, 20)
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("postmark", api),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    assert report.run.counts["failed"] == 20
    _, rows = mergekit.report(ledger_path=str(campaign.ledger))
    assert {row.last_text for row in rows} == {"postmark: HTTP 422: Invalid email request"}


def test_fields_as_postmark_documents_them(api: FakeApi, keys_in_env: None, tmp_path: Path) -> None:
    campaign = make_campaign(tmp_path, 3)
    mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for("postmark", api, "message_stream=broadcast"),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    first = api.deliveries[0]
    assert first.headers["X-Campaign"] == "spring"
    assert first.headers["Message-ID"].startswith("<")


def test_a_batch_over_50_mb_is_split(keys_in_env: None, tmp_path: Path) -> None:
    from dataclasses import replace

    from mergekit.render import Template, TemplateSource
    from mergekit.transports.base import Attachment

    compiled = Template(TemplateSource.parse(TEMPLATE), campaign="c")
    big = Attachment("big.bin", "application/octet-stream", b"\0" * (15 * 1024 * 1024))
    row = {"email": "a@example.org", "name": "A", "code": "1", "city": "X"}
    messages = [replace(compiled.render(row, row=i, key=str(i)), attachments=(big,)) for i in range(4)]
    transport = transport_from_url("postmark://")
    requests = transport.build_requests(messages)  # type: ignore[attr-defined]
    # 15 MB is 20 MB of base64: two per request under the 50 MB cap.
    assert [r.indexes for r in requests] == [[0, 1], [2, 3]]
