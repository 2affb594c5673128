"""Dispatch: the rate limiter (with a mock clock), graceful stop, and retries' bookkeeping."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from mergekit import SendOptions, send
from mergekit.dispatch import Rate, RateLimiter, campaign_exit_code
from mergekit.errors import ConfigError
from tests.helpers import send_command, signal_when_received, write_campaign
from tests.smtpd import SmtpServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("text, per_second", [("50/s", 50), ("300/m", 5), ("7200/h", 2), ("2.5/sec", 2.5)])
def test_rate_parse(text: str, per_second: float) -> None:
    assert Rate.parse(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["fast", "0/s", "-1/s", "10/d", "10"])
def test_bad_rate_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--rate"):
        Rate.parse(text)


def test_token_bucket_spaces_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    limiter = RateLimiter(Rate.parse("10/s"), clock=clock)

    async def take() -> None:
        for _ in range(5):
            await limiter.acquire(10)

    asyncio.run(take())
    assert clock.slept == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert clock.now == pytest.approx(1004.0)  # 50 messages in 4 s after the first burst: 10/s


def test_throttle_pauses_and_slows(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    limiter = RateLimiter(Rate.parse("10/s"), clock=clock)
    limiter.throttle(5.0)
    asyncio.run(limiter.acquire(8))
    assert clock.slept == pytest.approx([5.0])
    assert limiter.per_second == pytest.approx(8.0)


def test_unlimited_limiter_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    limiter = RateLimiter(None, clock=clock)
    asyncio.run(limiter.acquire(10_000))
    assert clock.slept == []


def test_exit_codes() -> None:
    assert campaign_exit_code({"sent": 3, "duplicate": 1, "suppressed": 1}) == 0
    assert campaign_exit_code({"sent": 3, "invalid": 1}) == 1
    assert campaign_exit_code({"sent": 3, "failed": 1, "deferred": 1}) == 3
    assert campaign_exit_code({"unknown": 1}) == 3


def test_sigterm_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    server = SmtpServer(data_delay=0.005).start()
    try:
        recipients, template = write_campaign(tmp_path, 1000)
        args = send_command(
            recipients, template, server.url, "--concurrency", "2", "--batch-size", "10", "--json"
        )
        process = subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        signal_when_received(process, server, 100, signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 3, err
        stopped = json.loads(out)
        assert "stopped: run the same command again to resume" in err
        assert stopped["sending"] == 0 and stopped["unknown"] == 0
        assert stopped["sent"] == len(server.messages) < 1000
        resumed = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0
        received = server.handler.by_recipient()
        assert len(received) == 1000 and all(len(m) == 1 for m in received.values())
    finally:
        server.stop()


def test_transport_failure_mid_batch_is_not_lost(smtp_server: SmtpServer, tmp_path: Path) -> None:
    """The server goes away for good mid-campaign: rows end deferred, none sending or lost."""
    recipients, template = write_campaign(tmp_path, 40)
    smtp_server.handler.defer_data_times = 10_000  # every DATA refused with 451
    report = send(
        recipients,
        template,
        transport=f"smtp://127.0.0.1:{smtp_server.port}",
        ledger_path=str(tmp_path / "l.db"),
        options=SendOptions(concurrency=2, max_attempts=2, backoff_initial=0.01, backoff_max=0.02),
    )
    assert report.run.counts["deferred"] == 40 and report.exit_code == 3
    assert report.run.this_run["deferred"] == 40


def crash_mid_batch(ledger_path: Path, recipients: Path, template: Path, rows: int) -> None:
    """Leave ``rows`` rows in ``sending``, as a run killed mid-batch does."""
    from mergekit.campaign import default_campaign_name
    from mergekit.ledger import SqliteLedger
    from mergekit.render import TemplateSource
    from mergekit.source import read_rows

    source = TemplateSource.read(template)
    ledger = SqliteLedger(str(ledger_path))
    campaign = ledger.open_campaign(
        default_campaign_name(recipients, template),
        template_path=str(template.resolve()),
        template_source=source.text,
        fingerprint=source.fingerprint,
        transport="null://",
        allow_template_change=False,
    )
    ledger.ingest(campaign, read_rows(recipients))
    ledger.claim(campaign, rows, states=["pending"], due_before=None)
    ledger.close()


@pytest.mark.parametrize("policy", ["resend", "skip"])
def test_unknown_rows_follow_the_policy(smtp_server: SmtpServer, tmp_path: Path, policy: str) -> None:
    recipients, template = write_campaign(tmp_path, 5)
    crash_mid_batch(tmp_path / "l.db", recipients, template, 2)
    result = send(
        recipients,
        template,
        transport=f"smtp://127.0.0.1:{smtp_server.port}",
        ledger_path=str(tmp_path / "l.db"),
        options=SendOptions(unknown=policy),
    )
    assert result.run.recovered_unknown == 2
    received = smtp_server.handler.by_recipient()
    if policy == "resend":
        assert result.exit_code == 0 and len(received) == 5
        assert result.run.counts["sent"] == 5
    else:
        assert result.exit_code == 3 and result.run.counts["unknown"] == 2
        assert "user1@example.org" not in received and len(received) == 3
        from mergekit import retry

        assert retry(ledger_path=str(tmp_path / "l.db")).exit_code == 0
        assert len(smtp_server.handler.by_recipient()) == 5


def test_an_early_throttle_pauses_without_setting_a_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 429 among the first requests must not set the run's rate from a handful of messages."""
    clock = FakeClock()
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    limiter = RateLimiter(None, clock=clock)
    limiter.accepted(2)
    clock.now += 0.2
    limiter.throttle(1.0, "429 Rate limit exceeded")
    assert limiter.per_second is None
    asyncio.run(limiter.acquire(1))
    assert clock.slept == pytest.approx([1.0])  # the Retry-After is still honoured
    clock.now += 2.0
    limiter.accepted(300)
    limiter.throttle(None, "429 Rate limit exceeded")
    assert limiter.per_second == pytest.approx(0.8 * 302 / 3.2)


def test_a_run_freezes_the_heap_it_starts_with_and_unfreezes_it(tmp_path: Path) -> None:
    """Startup objects stay out of the collector's passes during a run (issue 6), and only then."""
    import gc

    recipients, template = write_campaign(tmp_path, 5)
    frozen_during: list[int] = []
    before = gc.get_freeze_count()
    result = send(
        recipients,
        template,
        transport="null://",
        ledger_path=str(tmp_path / "l.db"),
        on_progress=lambda counts: frozen_during.append(gc.get_freeze_count()),
    )
    assert result.run.counts["sent"] == 5
    assert frozen_during and min(frozen_during) > before
    assert gc.get_freeze_count() == before
