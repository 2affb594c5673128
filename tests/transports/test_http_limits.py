"""HTTP limits (issue 13): ``?timeout=`` bounds a whole exchange, and a reply is read up to a cap.

Against the real stand-in server: a reply whose body trickles one byte at a
time (each read is quick, the whole never comes) and a reply that floods far
more bytes than any provider's answer. Judged by the run's time, its memory
and what ``status --json`` says of the rows.
"""

from __future__ import annotations

import json
import subprocess
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

import mergekit
from mergekit.transports.base import OUTCOME_TEXT_LIMIT
from mergekit.transports.http import MAX_REPLY_BYTES
from tests.conftest import run_cli
from tests.transports.api_campaign import ENV, FAST, make_campaign, url_for
from tests.transports.fakeapi import FakeApi

# The CLI in a subprocess runs this tree's mergekit, as in-process calls do.
CLI_ENV = {**ENV, "PYTHONPATH": str(Path(mergekit.__file__).resolve().parents[1])}
OUTER_LIMIT = 30.0  # seconds: a run still going by then has hung (before the fix it waited for ever)


@pytest.mark.parametrize(("status", "state"), [(200, "unknown"), (503, "deferred")])
def test_trickled_body_is_given_up_at_the_timeout(
    status: int, state: str, api: FakeApi, tmp_path: Path
) -> None:
    """A body written one byte every 0.2 s: each read takes 0.2 s, the whole 20 minutes.

    ``?timeout=1`` ends the exchange after a second: after a 2xx the rows are
    ``unknown`` (the provider took the request), after a 503 they are retried
    (here ``--max-attempts 1``, so ``deferred``).
    """
    api.stream(status, 6000, chunk=1, interval=0.2)
    campaign = make_campaign(tmp_path, 3)
    started = time.monotonic()
    try:
        result = run_cli(
            "send", str(campaign.csv), str(campaign.template),
            "--transport", url_for("postmark", api, "timeout=1"),
            "--ledger", str(campaign.ledger), "--max-attempts", "1", "--unknown", "skip", "--json",
            cwd=tmp_path, env=CLI_ENV, timeout=OUTER_LIMIT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"send still waiting after {OUTER_LIMIT:g} s")
    elapsed = time.monotonic() - started
    assert result.returncode in {1, 3}, result.stderr
    summary = json.loads(result.stdout)
    assert summary[state] == 3, summary
    assert summary["sent"] == 0
    assert elapsed < 15, elapsed  # ~1 s of timeout; the rest is the CLI starting under load
    print(f"trickle {status}: gave up, run took {elapsed:.1f} s")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
@pytest.mark.parametrize(("status", "state"), [(200, "unknown"), (500, "deferred")])
def test_flooding_body_is_not_read_past_the_cap(
    status: int, state: str, declared: bool, api: FakeApi, tmp_path: Path, keys_in_env: None
) -> None:
    """A 64 MB body (the issue's was 400 MB: 1 GB of memory) costs at most the cap in memory,
    whether its length is declared (refused at once) or not (read up to the cap)."""
    flood = 64 * 1024 * 1024
    api.stream(status, flood, chunk=1 << 20, declared=declared)
    campaign = make_campaign(tmp_path, 3)
    tracemalloc.start()
    try:
        report = mergekit.send(
            campaign.csv, campaign.template, transport=url_for("postmark", api),
            ledger_path=str(campaign.ledger), options=replace(FAST, max_attempts=1, unknown="skip"),
        )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"flood {status} {declared=}: peak traced memory {peak / 2**20:.1f} MB")
    assert report.run.counts[state] == 3, report.run.counts
    assert peak < 3 * MAX_REPLY_BYTES + 16 * 2**20, peak
    _, rows = mergekit.report(ledger_path=str(campaign.ledger))
    assert all("larger than" in row.last_text for row in rows), rows[0].last_text


def test_stored_reply_text_and_provider_id_are_bounded(
    api: FakeApi, tmp_path: Path, keys_in_env: None
) -> None:
    """A 2xx answer whose error text and id are 200,000 characters each: the ledger keeps 1,000."""
    huge = "why " * 50_000
    api.fail(
        1, 200, body={"results": [{"status": "permanent", "error": huge}, {"status": "sent", "id": huge}]}
    )
    campaign = make_campaign(tmp_path, 2)
    mergekit.send(
        campaign.csv, campaign.template, transport=url_for("webhook", api),
        ledger_path=str(campaign.ledger), options=FAST,
    )  # fmt: skip
    _, rows = mergekit.report(ledger_path=str(campaign.ledger))
    failed, sent = sorted(rows, key=lambda row: row.state)
    assert (failed.state, sent.state) == ("failed", "sent")
    assert failed.last_text.startswith("webhook: why why") and failed.last_text.endswith("…")
    assert len(failed.last_text) == OUTCOME_TEXT_LIMIT + 1
    assert sent.provider_id is not None and len(sent.provider_id) == OUTCOME_TEXT_LIMIT + 1
    assert sum(p.stat().st_size for p in tmp_path.glob("ledger.db*")) < 200_000
