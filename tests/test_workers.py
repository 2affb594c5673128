"""Rendering in worker processes: same results as in-process, and a dead worker is survived."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from pathlib import Path

import pytest

from mergekit import SendOptions, send
from mergekit.render import Template, TemplateSource
from mergekit.unsubscribe import Unsubscribe
from mergekit.workers import MIN_ROWS_FOR_WORKERS, Renderer, default_processes
from tests.helpers import TEMPLATE, write_campaign
from tests.smtpd import SmtpServer


def test_small_runs_render_in_process() -> None:
    assert default_processes(MIN_ROWS_FOR_WORKERS - 1) == 0


def test_send_with_a_render_worker_matches_in_process(smtp_server: SmtpServer, tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 60)
    text = recipients.read_text().replace("user7@example.org", "user7@localhost")  # invalid at render
    recipients.write_text(text)
    report = send(
        recipients,
        template,
        transport=f"smtp://127.0.0.1:{smtp_server.port}",
        ledger_path=str(tmp_path / "l.db"),
        options=SendOptions(concurrency=3, batch_size=7, render_processes=1),
    )
    assert report.run.counts["sent"] == 59 and report.run.counts["invalid"] == 1
    assert len(smtp_server.messages) == 59


def test_a_killed_worker_falls_back_to_this_process(caplog: pytest.LogCaptureFixture) -> None:
    template = Template(TemplateSource.parse(TEMPLATE), campaign="w")
    rows = [
        (i, f"u{i}@example.org", {"email": f"u{i}@example.org", "name": "N", "number": "1"})
        for i in range(1, 4)
    ]

    async def main() -> list[object]:
        renderer = Renderer(template, 1)
        await renderer.start()
        try:
            first = await renderer.render(rows)
            assert renderer._pool is not None
            for pid in list(renderer._pool._processes):
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.2)
            return [first, await renderer.render(rows)]
        finally:
            renderer.close()

    first, second = asyncio.run(main())

    def strip_date(raw: bytes) -> bytes:
        return b"\r\n".join(line for line in raw.split(b"\r\n") if not line.startswith(b"Date: "))

    assert [strip_date(m.raw) for m in first] == [strip_date(m.raw) for m in second]  # type: ignore[attr-defined]
    assert "rendering in this process" in caplog.text


def test_a_template_travels_to_a_worker_with_its_options(tmp_path: Path) -> None:
    """A render worker gets the template pickled: attachments folder and unsubscribe survive."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.pdf").write_bytes(b"%PDF-1.4 tiny")
    source = TemplateSource.parse(
        "From: a@example.com\nTo: {{ email }}\nSubject: s\nAttachment: a.pdf\n\n{{ unsubscribe_url }}\n",
        path=str(tmp_path / "t.txt"),
    )
    unsubscribe = Unsubscribe(url="https://example.com/u/{token}", mailto=None, secret=b"k" * 32)
    template = Template(source, campaign="c", attachments_dir=files, unsubscribe=unsubscribe)
    copy = pickle.loads(pickle.dumps(template))
    here = template.render({"email": "b@example.org"}, row=1, key="b@example.org")
    there = copy.render({"email": "b@example.org"}, row=1, key="b@example.org")
    assert there.attachments == here.attachments and there.attachments[0].filename == "a.pdf"
    assert there.header("List-Unsubscribe") == here.header("List-Unsubscribe") != ""
    assert there.text == here.text and "https://example.com/u/" in (there.text or "")
