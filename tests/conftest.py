"""Shared fixtures: real SMTP servers, ledgers on both engines, a fresh PostgreSQL database.

PostgreSQL tests use the server in ``MERGEKIT_TEST_POSTGRES`` (``.ci/run``
starts a throwaway cluster with ``.ci/with-postgres`` and exports it). Without
it they skip and say why; with ``MERGEKIT_REQUIRE_POSTGRES=1`` (set by
``.ci/run``) they fail instead, so CI never passes by skipping them.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trustme

from mergekit.ledger import Ledger, open_ledger
from tests.smtpd import SmtpServer

ROOT = Path(__file__).resolve().parent.parent
# Subprocesses (``python -m mergekit`` run in a test's folder) import this checkout's mergekit,
# not the one an editable install points at (another worktree's).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """aiosmtpd on 127.0.0.1 (plain SMTP, no STARTTLS offered)."""
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def smtps_server(certificate_authority: trustme.CA, tmp_path: Path) -> Iterator[SmtpServer]:
    """aiosmtpd speaking implicit TLS with a throwaway certificate for localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server = SmtpServer(tls_context=context).start()
    yield server
    server.stop()


POSTGRES_ENV = "MERGEKIT_TEST_POSTGRES"
REQUIRE_ENV = "MERGEKIT_REQUIRE_POSTGRES"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server URL the tests may create databases on (a superuser's)."""
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url
    reason = (
        f"needs PostgreSQL: set {POSTGRES_ENV} to a server URL, or run the tests under "
        ".ci/with-postgres (which starts a throwaway cluster)"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but this test {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL to a new, empty database, dropped after the test."""
    import psycopg

    name = f"mergekit_test_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(postgres_server)
    yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh ledger lives: a SQLite file in ``tmp_path``, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def ledger(ledger_location: str) -> Iterator[Ledger]:
    """An open, empty ledger on each engine in turn; closed after the test."""
    opened = open_ledger(ledger_location)
    yield opened
    opened.close()


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``mergekit ARGS`` in a subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mergekit", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the stateful test's figures (``record_property("stateful", ...)``) so CI logs show
    how many examples and steps it ran, pass or fail."""
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", "") != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == "stateful":
                    terminalreporter.write_line(f"stateful: {value}")
