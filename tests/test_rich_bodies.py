"""Body kinds over a real SMTP server: text, HTML, Markdown, mailmerge multipart, attachments.

Every message is sent with ``mergekit.send`` to aiosmtpd and parsed back with
the standard library's parser, under ``email.policy.strict`` as well.
"""

from __future__ import annotations

import os
from email.message import EmailMessage
from pathlib import Path

from mergekit import campaign
from mergekit.bodies import html_to_text
from mergekit.dispatch import SendOptions
from mergekit.render import Template, TemplateSource
from tests.smtpd import SmtpServer

CSV = (
    "email,name,note,city,doc\n"
    "ada@example.com,Ada Lovelace,Ada,København,report.pdf\n"
    "bob@example.com,Bob Smith,Bob <b>,Paris,report.pdf\n"
)
HEADERS = (
    "From: Ünïcode Sender <sender@example.com>\n"
    "To: {{ name }} <{{ email }}>\n"
    "Subject: Nyheder fra {{ city }}\n"
)

# One connection, one batch: messages reach the server in row order, as these tests index them.
IN_ROW_ORDER = SendOptions(concurrency=1, batch_size=100)


def _text(part: EmailMessage) -> str:
    """A text part's content with the wire's CRLF line ends read as newlines."""
    return str(part.get_content()).replace("\r\n", "\n")


def _send(
    tmp_path: Path, smtp_server: SmtpServer, name: str, template: str, csv: str = CSV, **content: object
) -> None:
    (tmp_path / name).write_text(template, encoding="utf-8")
    (tmp_path / "people.csv").write_text(csv, encoding="utf-8")
    report = campaign.send(
        tmp_path / "people.csv",
        tmp_path / name,
        transport=smtp_server.url,
        ledger_path=str(tmp_path / "ledger.db"),
        content=campaign.ContentOptions(**content),  # type: ignore[arg-type]
        options=IN_ROW_ORDER,
    )
    assert report.run.counts["sent"] == csv.count("\n") - 1, report.run.counts


def test_plain_text_body(tmp_path: Path, smtp_server: SmtpServer) -> None:
    _send(tmp_path, smtp_server, "plain.txt", HEADERS + "\nHej {{ name }}, vi ses i {{ city }}.\n")
    message = smtp_server.messages[0].parsed(strict=True)
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert message["Subject"] == "Nyheder fra København"
    assert message["From"].addresses[0].display_name == "Ünïcode Sender"
    assert _text(message) == "Hej Ada Lovelace, vi ses i København.\n"
    assert not message.defects


def test_html_body_is_alternative_with_derived_text(tmp_path: Path, smtp_server: SmtpServer) -> None:
    template = HEADERS + (
        "Content-Type: text/html\n\n<html><body><h1>Hej {{ note }}</h1>"
        '<p>Read <a href="https://example.com/n?c={{ city|urlencode }}">the news</a> from {{ city }}.</p>'
        "<ul><li>one</li><li>two</li></ul></body></html>\n"
    )
    _send(tmp_path, smtp_server, "news.txt", template)
    bob = next(r for r in smtp_server.messages if r.rcpt_tos == ["bob@example.com"]).parsed(strict=True)
    assert bob.get_content_type() == "multipart/alternative"
    text, html = bob.get_payload()
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert text.get_content_charset() == html.get_content_charset() == "utf-8"
    assert "Bob &lt;b&gt;" in html.get_content()
    assert "<b>" not in html.get_content()
    assert "Bob <b>" in _text(text)  # the text part is text: no escaping needed
    assert "the news (https://example.com/n?c=Paris)" in _text(text)
    assert "- one\n- two" in _text(text)
    ada = smtp_server.messages[0].parsed(strict=True)
    assert "København" in ada.get_body(("html",)).get_content()
    for part in bob.walk():
        assert not part.defects


def test_markdown_body_by_extension_and_by_header(tmp_path: Path, smtp_server: SmtpServer) -> None:
    body = "\n# Hello {{ note }}\n\nSee [our site](https://example.com) or *not*.\n\n- a\n- b\n"
    _send(tmp_path, smtp_server, "news.md", HEADERS + body)
    (tmp_path / "second").mkdir()
    _send(tmp_path / "second", smtp_server, "other.txt", HEADERS + "Content-Type: text/markdown\n" + body)
    assert len(smtp_server.messages) == 4
    for received in (smtp_server.messages[1], smtp_server.messages[3]):
        message = received.parsed(strict=True)
        assert message.get_content_type() == "multipart/alternative"
        text = _text(message.get_body(("plain",)))
        html = message.get_body(("html",)).get_content()
        assert text.startswith("# Hello Bob <b>")  # the Markdown source is the text part
        assert "<h1>Hello Bob &lt;b&gt;</h1>" in html
        assert '<a href="https://example.com">our site</a>' in html
        assert "<em>not</em>" in html


def test_attachments_wrap_alternative_in_mixed_byte_identical(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    payload = os.urandom(70_000) + bytes(range(256))
    (tmp_path / "report.pdf").write_bytes(payload)
    (tmp_path / "Übersicht été.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    template = HEADERS + (
        "Attachment: {{ doc }}\nATTACHMENT: Übersicht été.png\nContent-Type: text/html\n\n"
        "<p>Hi {{ name }}</p>\n"
    )
    _send(tmp_path, smtp_server, "invoice.txt", template)
    message = smtp_server.messages[0].parsed(strict=True)
    assert message.get_content_type() == "multipart/mixed"
    parts = message.get_payload()
    assert parts[0].get_content_type() == "multipart/alternative"
    attachments = list(message.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["report.pdf", "Übersicht été.png"]
    assert [a.get_content_type() for a in attachments] == ["application/pdf", "image/png"]
    assert attachments[0].get_content() == payload
    assert attachments[1].get_content() == (tmp_path / "Übersicht été.png").read_bytes()
    assert "Attachment" not in message and "ATTACHMENT" not in message
    raw_lines = smtp_server.messages[0].data.split(b"\r\n")
    assert max(len(line) for line in raw_lines) <= 78


def test_text_with_attachment_is_mixed(tmp_path: Path, smtp_server: SmtpServer) -> None:
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 tiny")
    _send(
        tmp_path, smtp_server, "plain.txt", HEADERS + "Attachment: {{ doc }}\n\nSee attached, {{ note }}.\n"
    )
    message = smtp_server.messages[1].parsed(strict=True)
    assert message.get_content_type() == "multipart/mixed"
    assert _text(message.get_body(("plain",))) == "See attached, Bob <b>.\n"
    (attachment,) = message.iter_attachments()
    assert attachment.get_content() == b"%PDF-1.4 tiny"


def test_shared_attachment_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "brochure.pdf").write_bytes(os.urandom(200_000))
    (tmp_path / "t.txt").write_text(HEADERS + "Attachment: brochure.pdf\n\nHi\n", encoding="utf-8")
    template = Template.from_path(tmp_path / "t.txt", campaign="c")
    for row in range(1, 201):
        template.render({"name": "N", "email": f"n{row}@example.com", "city": "X"}, row=row, key=str(row))
    assert template.attachments.reads == 1


def test_css_inlined_once_for_the_template(tmp_path: Path) -> None:
    (tmp_path / "s.css").write_text("p.x { color: #123456 }\n", encoding="utf-8")
    body = (
        '<html><head><link rel="stylesheet" href="s.css"><style>td { padding: 3px }</style></head><body>'
        '<p class="x">{{ name }}</p><table>{% for i in range(2) %}<tr><td>{{ i }}</td></tr>{% endfor %}'
        "</table></body></html>\n"
    )
    (tmp_path / "t.html").write_text(HEADERS + "\n" + body, encoding="utf-8")
    template = Template.from_path(tmp_path / "t.html", campaign="c")
    assert template.css is not None and not template.css.per_row
    assert "{{ name }}" in template.css.source and "color: #123456" in template.css.source
    html = template.render({"name": "A", "email": "a@example.com", "city": "X"}, row=1, key="a").html
    assert html is not None
    assert '<p class="x" style="color: #123456;">A</p>' in html
    assert html.count('style="padding: 3px;"') == 2
    assert "<style" not in html and "<link" not in html


def test_css_falls_back_to_per_row_when_style_is_templated(tmp_path: Path) -> None:
    body = (
        "<html><head><style>p { color: {{ colour }} }</style></head><body><p>{{ name }}</p></body></html>\n"
    )
    source = TemplateSource.parse(
        HEADERS + "Content-Type: text/html\n\n" + body, path=str(tmp_path / "t.txt")
    )
    template = Template(source, campaign="c")
    assert template.css is not None and template.css.per_row
    data = {"name": "A", "email": "a@example.com", "city": "X", "colour": "red"}
    html = template.render(data, row=1, key="a").html
    assert html is not None and '<p style="color: red;">A</p>' in html


def test_html_to_text_keeps_links() -> None:
    text = html_to_text(
        '<p>Go <a href="https://e.com/x">there</a> or <a href="https://e.com/y">https://e.com/y</a>.</p>'
        '<p>Mail <a href="mailto:a@e.com">a@e.com</a><br>bye</p><style>p{}</style>'
    )
    assert text == "Go there (https://e.com/x) or https://e.com/y.\n\nMail a@e.com\nbye\n"
