"""Fixtures for the HTTP transports: the fake API server, keys in the environment, a summary table."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.transports.api_campaign import ENV, SUMMARY
from tests.transports.fakeapi import FakeApi


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
    if not SUMMARY:
        return
    columns = list(SUMMARY[0])
    terminalreporter.section("HTTP transports: campaigns")
    terminalreporter.write_line("| " + " | ".join(columns) + " |")
    terminalreporter.write_line("|" + "---|" * len(columns))
    for line in SUMMARY:
        terminalreporter.write_line("| " + " | ".join(str(line[c]) for c in columns) + " |")
