"""The preview gallery, opened from disk in a real headless Chromium (Debian's ``chromium``).

Skips, saying why, only where no Chromium binary or no Playwright is installed
(``.ci/run`` installs Chromium with apt; Playwright comes from the test extras
and drives that binary: it never downloads a browser). Set
``MERGEKIT_GALLERY_SCREENSHOT=docs/gallery.png`` to keep the screenshot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit.cli import main

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

TEMPLATE = """From: Ada from Example Co <ada@example.com>
To: {{ name }} <{{ email }}>
Subject: Spring news for {{ name }}
Attachment: {{ doc }}

<html><head><link rel="stylesheet" href="style.css"></head>
<body><h1>Hello {{ name }}</h1><p class="lead">Our spring programme is attached. {{ note }}</p>
<p><a href="https://example.com/events">See all events</a></p></body></html>
"""
CSV = """email,name,doc,note
ada@example.com,Ada Lovelace,programme.pdf,<script>document.title='owned'</script>
bob@example.com,Bob Smith,../../etc/passwd,
carol@example.com,Carol Jones,programme.pdf,
not-an-address,Dan,programme.pdf,
"""


def _chromium() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("no Chromium binary: install Debian's chromium (apt-get install chromium; .ci/run does)")
    return found


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    (tmp_path / "news.html").write_text(TEMPLATE, encoding="utf-8")
    (tmp_path / "style.css").write_text(
        "h1 { color: rgb(26, 77, 143) } .lead { font-size: 20px }", encoding="utf-8"
    )
    (tmp_path / "programme.pdf").write_bytes(b"%PDF-1.4 " + b"x" * 2000)
    (tmp_path / "people.csv").write_text(CSV, encoding="utf-8")
    (tmp_path / "stop.txt").write_text("carol@example.com\n", encoding="utf-8")
    out = tmp_path / "gallery"
    result = CliRunner().invoke(
        main,
        [
            "preview", str(tmp_path / "people.csv"), str(tmp_path / "news.html"), "--html", str(out),
            "--suppress", str(tmp_path / "stop.txt"),
        ],
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # row 2 is invalid
    assert "4 rows, 1 ready to send, 3 not sendable" in result.output
    return out


def test_gallery_files(gallery: Path) -> None:
    index = (gallery / "index.html").read_text(encoding="utf-8")
    assert "Spring news for Ada Lovelace" in index
    assert "&#x27;../../etc/passwd&#x27; is outside the attachments folder" in index
    assert "suppressed" in index and "stop.txt" in index
    page = (gallery / "message-000001.html").read_text(encoding="utf-8")
    assert 'sandbox=""' in page and "srcdoc=" in page
    assert "<script>" not in page  # the row's markup is escaped twice: in the message, and in srcdoc


def test_gallery_in_headless_chromium(gallery: Path) -> None:
    executable = _chromium()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    screenshot = gallery / "message.png"
    with (
        tempfile.TemporaryDirectory(prefix="mergekit-chromium-") as profile,
        sync_api.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 1300},
        )
        try:
            page = browser.new_page()
            page.goto((gallery / "index.html").as_uri())
            rows = page.locator("tr.row")
            assert rows.count() == 4
            assert "outside the attachments folder" in rows.nth(1).locator(".reason").inner_text()
            assert rows.nth(2).locator(".state").inner_text() == "suppressed"
            assert rows.nth(3).locator(".state").inner_text() == "invalid"
            page.get_by_role("link", name="Spring news for Ada Lovelace").click()
            page.wait_for_url("**/message-000001.html")
            assert page.locator("#subject").inner_text() == "Spring news for Ada Lovelace"
            frame = page.frame_locator("#html-part")
            heading = frame.locator("h1")
            assert heading.inner_text() == "Hello Ada Lovelace"
            assert heading.evaluate("e => getComputedStyle(e).color") == "rgb(26, 77, 143)"  # inlined CSS
            assert "<script>document.title='owned'</script>" in frame.locator("p.lead").inner_text()
            assert page.title() != "owned"
            assert "programme.pdf" in page.locator("#attachments").inner_text()
            assert "2.0 KiB (2,009 bytes)" in page.locator("#attachments").inner_text()
            assert "See all events (https://example.com/events)" in page.locator("#text-part").inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    keep = os.environ.get("MERGEKIT_GALLERY_SCREENSHOT")
    if keep:
        shutil.copyfile(screenshot, keep)
