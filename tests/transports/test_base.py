"""Transport URLs: redaction keeps the shape and drops every secret."""

from __future__ import annotations

import pytest

from mergekit.transports.base import redact_url


@pytest.mark.parametrize(
    "url, shown",
    [
        ("null://", "null://"),
        ("maildir://outbox", "maildir://outbox"),
        ("maildir:///var/mail/out", "maildir:///var/mail/out"),
        (
            "smtp://user:hunter2@mail.example.com:587?starttls=always",
            "smtp://user:***@mail.example.com:587?starttls=always",
        ),
        ("smtp://user@mail.example.com", "smtp://user@mail.example.com"),
        (
            "postmark://?token=abc&base_url=http://127.0.0.1:1",
            "postmark://?token=***&base_url=http://127.0.0.1:1",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
