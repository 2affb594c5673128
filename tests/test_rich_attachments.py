"""Attachment paths: only regular files inside the attachments folder; anything else is the row's reason."""

from __future__ import annotations

import email
import email.policy
import os
from pathlib import Path

import pytest

from mergekit import campaign
from mergekit.errors import RenderError
from mergekit.render import Template

TEMPLATE = "From: a@example.com\nTo: {{ email }}\nSubject: Your file\nAttachment: {{ file }}\n\nHi\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    (templates / "ok.pdf").write_bytes(b"%PDF ok")
    (templates / "sub").mkdir()
    (templates / "sub" / "deep.txt").write_bytes(b"deep")
    (tmp_path / "secret.txt").write_bytes(b"secret outside")
    (templates / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    (templates / "link-in.pdf").symlink_to(templates / "ok.pdf")
    (templates / "dir-link").symlink_to(tmp_path)
    return templates


def _render(folder: Path, value: str, **kwargs: object) -> bytes:
    template = Template.from_path(folder / "t.txt", campaign="c", **kwargs)  # type: ignore[arg-type]
    return template.render({"email": "r@example.com", "file": value}, row=7, key="r@example.com").raw


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("../../etc/passwd", "is outside the attachments folder"),
        ("../secret.txt", "is outside the attachments folder"),
        ("/etc/passwd", "is outside the attachments folder"),
        ("link-out.txt", "is outside the attachments folder"),
        ("dir-link/secret.txt", "is outside the attachments folder"),
        ("sub/../../secret.txt", "is outside the attachments folder"),
        ("missing.pdf", "not found"),
        ("sub", "is not a regular file"),
        ("  ", "the Attachment: header is empty"),
    ],
)
def test_refused_paths_name_the_reason(folder: Path, value: str, reason: str) -> None:
    with pytest.raises(RenderError) as caught:
        _render(folder, value)
    assert reason in caught.value.message
    assert caught.value.row == 7 and caught.value.header == "Attachment"


def test_unreadable_file_is_refused(folder: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    (folder / "locked.pdf").write_bytes(b"x")
    (folder / "locked.pdf").chmod(0)
    with pytest.raises(RenderError, match="cannot be read"):
        _render(folder, "locked.pdf")


def test_allowed_paths(folder: Path) -> None:
    for value, content in [("ok.pdf", b"%PDF ok"), ("link-in.pdf", b"%PDF ok"), ("sub/deep.txt", b"deep")]:
        message = email.message_from_bytes(_render(folder, value), policy=email.policy.strict)
        (attachment,) = message.iter_attachments()  # type: ignore[attr-defined]
        assert attachment.get_payload(decode=True) == content


def test_attachments_dir_moves_the_folder(folder: Path, tmp_path: Path) -> None:
    raw = _render(folder, "secret.txt", attachments_dir=tmp_path)
    assert b"c2VjcmV0IG91dHNpZGU=" in raw  # base64 of the file, now inside the chosen folder
    with pytest.raises(RenderError, match="outside"):
        _render(folder, "../x", attachments_dir=tmp_path)


def test_long_non_ascii_name_uses_rfc2231_continuations(folder: Path) -> None:
    name = "Rechnung für Ångström und Überlänge " * 3 + "€.pdf"
    (folder / name).write_bytes(b"%PDF long")
    raw = _render(folder, name)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    message = email.message_from_bytes(raw, policy=email.policy.strict)
    (attachment,) = message.iter_attachments()  # type: ignore[attr-defined]
    assert attachment.get_filename() == name
    assert attachment.get_content_type() == "application/pdf"


def test_bad_rows_are_invalid_and_the_campaign_goes_on(folder: Path, tmp_path: Path) -> None:
    csv = tmp_path / "people.csv"
    csv.write_text(
        "email,file\nok@example.com,ok.pdf\nevil@example.com,../../etc/passwd\nabs@example.com,/etc/passwd\n"
        "link@example.com,link-out.txt\n",
        encoding="utf-8",
    )
    outbox = tmp_path / "outbox"
    report = campaign.send(
        csv, folder / "t.txt", transport=f"maildir://{outbox}", ledger_path=str(tmp_path / "l.db")
    )
    assert (report.run.counts["sent"], report.run.counts["invalid"]) == (1, 3)
    _, rows = campaign.report(ledger_path=str(tmp_path / "l.db"), states=["invalid"])
    reasons = {row.key: row.last_text for row in rows}
    assert "outside the attachments folder" in reasons["evil@example.com"]
    assert "'/etc/passwd' is outside" in reasons["abs@example.com"]
    assert "'link-out.txt' is outside" in reasons["link@example.com"]
    sent = [p.read_bytes() for p in (outbox / "new").iterdir()]
    assert len(sent) == 1 and b"secret" not in b"".join(sent) and b"root:" not in b"".join(sent)
