"""Fixtures that start real servers and open real ledgers."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mergekit.ledger import Ledger, SqliteLedger
from tests.smtpd import SmtpServer

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A fresh ledger, closed after the test."""
    opened = SqliteLedger(str(tmp_path / "ledger.db"))
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
