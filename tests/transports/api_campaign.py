"""HTTP-transport test campaigns: a CSV with awkward values, the template, a checked run."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import mergekit
from mergekit.dispatch import SendOptions
from mergekit.render import Template, TemplateSource
from tests.transports.fakeapi import KEYS, FakeApi

ENV = {
    "POSTMARK_SERVER_TOKEN": KEYS["postmark"],
    "RESEND_API_KEY": KEYS["resend"],
    "MJ_APIKEY_PUBLIC": KEYS["mailjet_public"],
    "MJ_APIKEY_PRIVATE": KEYS["mailjet_private"],
    "SENDGRID_API_KEY": KEYS["sendgrid"],
    "MAILGUN_API_KEY": KEYS["mailgun"],
    "AWS_ACCESS_KEY_ID": KEYS["aws_id"],
    "AWS_SECRET_ACCESS_KEY": KEYS["aws_secret"],
    "NYLAS_API_KEY": KEYS["nylas"],
    "MERGEKIT_WEBHOOK_SECRET": KEYS["webhook"],
}
SECRETS = [value for name, value in KEYS.items() if name not in {"mailjet_public", "aws_id"}]

URLS = {
    "postmark": "postmark://?base_url={base}",
    "resend": "resend://?base_url={base}",
    "mailjet": "mailjet://?base_url={base}",
    "sendgrid": "sendgrid://?base_url={base}",
    "mailgun": "mailgun://mg.example.com?base_url={base}",
    "ses": "ses://eu-west-1?base_url={base}",
    "nylas": "nylas://grant-42?base_url={base}",
    "webhook": "webhook+http://127.0.0.1:{port}/hook?batch_size=250",
}
# Messages per request in a campaign (SendGrid and Mailgun through the substitution path).
PER_REQUEST = {
    "postmark": 500,
    "resend": 100,
    "mailjet": 50,
    "sendgrid": 1000,
    "mailgun": 1000,
    "ses": 1,
    "nylas": 1,
    "webhook": 250,
}

TEMPLATE = """\
From: Ada Ö. from Example <ada@example.com>
To: {{ name }} <{{ email }}>
Subject: Grüße, {{ name }}: your code {{ code }}
Reply-To: help@example.com
X-Campaign: spring

Dear {{ name }},

your code is {{ code }} and your city is {{ city }}.
{{ name }}, see you in {{ city }}! 100% sure.
"""

# Values a substitution engine could trip on: HTML, its own syntax, regex replacement syntax, braces.
NASTY = [
    "Zürich",
    "<b>&amp;\"'</b>",
    "%recipient.t0%",
    "-deadbeeft0-",
    "$1 \\1 \\g<0>",
    "{{ name }}",
    "100% 😀",
    "København",
    "",
    "a,b;c",
]
NAMES = ["Amélie Dubois", "José Álvarez", "Søren K", "Zoë OBrien", "李小龙", "Ada Lovelace", "Ωmega"]


@dataclass
class Campaign:
    csv: Path
    template: Path
    ledger: Path
    rows: list[dict[str, str]]
    bad: set[str] = field(default_factory=set)

    def expected(self) -> dict[str, tuple[str, str]]:
        """address -> (Subject, text) as mergekit's Jinja render gives them."""
        compiled = Template(TemplateSource.read(self.template), campaign="expected")
        result = {}
        for i, row in enumerate(self.rows, 1):
            message = compiled.render(row, row=i, key=row["email"])
            result[row["email"]] = (message.header("Subject"), message.text or "")
        return result


def make_campaign(tmp_path: Path, count: int, *, bad: int = 0, template: str = TEMPLATE) -> Campaign:
    rows = []
    for i in range(count):
        rows.append(
            {
                "email": f"user{i:05d}@example.org" if i >= bad else f"bad{i}@example.org",
                "name": NAMES[i % len(NAMES)],
                "code": f"{i:05d}{NASTY[i % len(NASTY)]}",
                "city": NASTY[(i * 7) % len(NASTY)] or "Köln",
            }
        )
    path = tmp_path / "recipients.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    template_path = tmp_path / "welcome.txt"
    template_path.write_text(template, encoding="utf-8")
    return Campaign(path, template_path, tmp_path / "ledger.db", rows, {r["email"] for r in rows[:bad]})


FAST = SendOptions(concurrency=4, backoff_initial=0.01, backoff_max=0.05)

SUMMARY: list[dict[str, Any]] = []


def url_for(provider: str, api: FakeApi, extra: str = "") -> str:
    url = URLS[provider].format(base=api.base_url, port=api.port)
    return url + (("&" if "?" in url else "?") + extra if extra else "")


def run_campaign(
    provider: str,
    api: FakeApi,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    rows: int = 1000,
    bad: int = 3,
    transient: bool = True,
    extra: str = "",
    per_request: int | None = None,
) -> None:
    """A whole campaign through ``provider``, checked row by row; one line of the summary table."""
    caplog.set_level(logging.INFO)
    campaign = make_campaign(tmp_path, rows, bad=bad)
    for address in campaign.bad:
        api.bad.add(address)
    if transient:
        api.fail(1, 503, body={"message": "Service Unavailable"})
        api.fail(1, 429, headers={"Retry-After": "0"}, body={"message": "Rate limit exceeded"})
    report = mergekit.send(
        campaign.csv,
        campaign.template,
        transport=url_for(provider, api, extra),
        ledger_path=str(campaign.ledger),
        options=FAST,
    )
    counts = report.run.counts
    assert counts["sent"] == rows - bad, counts
    assert counts["failed"] == bad, counts
    assert report.exit_code == (1 if bad else 0)

    # Every row's state, and the refused ones say why.
    _, ledger_rows = mergekit.report(ledger_path=str(campaign.ledger))
    for row in ledger_rows:
        if row.email in campaign.bad:
            assert row.state == "failed" and row.last_text, row
        else:
            assert row.state == "sent", row

    # Request count: ceil(rows / limit) plus the retried requests.
    size = per_request or PER_REQUEST[provider]
    retried = 2 if transient else 0
    # Rows whose values hold Mailgun's own syntax go one per request (substitution.py).
    alone = 0
    if provider == "mailgun" and size > 1:
        alone = sum(any("%recipient." in v for v in row.values()) for row in campaign.rows)
    base_requests = math.ceil((rows - alone) / size) + alone
    assert api.requests[provider] == base_requests + retried, (api.requests, base_requests)

    # What recipients get is what Jinja rendered, non-ASCII and all.
    expected = campaign.expected()
    delivered = {d.to[0].rpartition("<")[2].rstrip(">"): d for d in api.deliveries}
    assert len(api.deliveries) == rows - bad
    for address, (subject, text) in expected.items():
        if address in campaign.bad:
            assert address not in delivered
            continue
        got = delivered[address]
        assert got.subject == subject, (address, got.subject, subject)
        assert got.text == text, (address, got.text, text)

    # No key anywhere: ledger files, logs, outcome texts.
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    for secret in SECRETS:
        assert secret.encode() not in stored
        assert secret not in caplog.text
    SUMMARY.append(
        {
            "provider": provider + (f" ({extra})" if extra else ""),
            "rows": rows,
            "requests": api.requests[provider],
            "sent": counts["sent"],
            "failed": counts["failed"],
            "retried requests": retried,
            "seconds": round(report.run.elapsed, 2),
        }
    )
