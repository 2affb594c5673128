"""Fixtures for the HTTP transports: the fake API server, keys in the environment, a summary table."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.transports.api_campaign import ENV, SUMMARY
from tests.transports.fakeapi import FakeApi
from tests.transports.specs import SPEC_SUMMARY


@pytest.fixture
def api() -> Iterator[FakeApi]:
    with FakeApi() as server:
        yield server


@pytest.fixture
def keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, table in (
        ("HTTP transports: campaigns", SUMMARY),
        ("HTTP transports: requests against the providers' documents", SPEC_SUMMARY),
    ):
        if not table:
            continue
        columns = list(table[0])
        terminalreporter.section(title)
        terminalreporter.write_line("| " + " | ".join(columns) + " |")
        terminalreporter.write_line("|" + "---|" * len(columns))
        for line in table:
            terminalreporter.write_line("| " + " | ".join(str(line[c]) for c in columns) + " |")
