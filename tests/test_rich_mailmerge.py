"""mailmerge compatibility: the examples of mailmerge's README (awdeorio/mailmerge), run unchanged.

Each template and database below is written out as mailmerge's documentation
shows it; the test sends it with mergekit to a real SMTP server and checks
what arrived. Where mergekit refuses on purpose (attachments outside the
template's folder) the test says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit import campaign
from mergekit.dispatch import SendOptions
from tests.smtpd import SmtpServer

DATABASE = """email,name,number
myself@mydomain.com,"Myself",17
bob@bobdomain.com,"Bob",42
"""

SIMPLE = """TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@mydomain.com>

Hi, {{name}},

Your number is {{number}}.
"""

PROGRESS_TEMPLATE = """TO: {{email}}
SUBJECT: EECS 280 Mid-semester Progress Report
FROM: My Self <myself@mydomain.com>

Dear {{name}},

This email contains our record of your grades EECS 280, as well as an estimated letter grade.

Project 1: {{p1}}
Project 2: {{p2}}
Project 3: {{p3}}
Midterm exam: {{midterm}}

At this time, your estimated letter grade is {{grade}}.

{% if grade == "C-" -%}
I am concerned that if the current trend in your scores continues, you will be on the border of the pass/fail line.

I have a few suggestions for the rest of the semester.  First, it is absolutely imperative that you turn in all assignments.  Attend lecture and discussion sections.  Get started early on the programming assignments and ask for help.  Finally, plan a strategy to help you prepare well for the final exam.

The good news is that we have completed about half of the course grade, so there is an opportunity to fix this problem.  The other professors and I are happy to discuss strategies together during office hours.
{% elif grade in ["D+", "D", "D-", "E", "F"] -%}
I am writing because I am concerned about your grade in EECS 280.  My concern is that if the current trend in your scores continues, you will not pass the course.

If you plan to continue in the course, I urge you to see your instructor in office hours to discuss a plan for the remainder of the semester.  Otherwise, if you plan to drop the course, please see your academic advisor.
{% endif -%}
"""  # noqa: E501

PROGRESS_DATABASE = """email,name,p1,p2,p3,midterm,grade
myself@mydomain.com,"My Self",100,100,100,100,A+
borderline@fixme.com,"Borderline Name",50,50,50,50,C-
failing@fixme.com,"Failing Name",0,0,0,0,F
"""

HTML_ONLY = """TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@mydomain.com>
Content-Type: text/html

<html>
<body>

<p>Hi, {{name}},</p>

<p>Your number is {{number}}.</p>

<p>Sent by <a href="https://github.com/awdeorio/mailmerge">mailmerge</a></p>

</body>
</html>
"""

HTML_AND_TEXT = """TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@mydomain.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="boundary"

This is a MIME-encoded message. If you are seeing this, your mail
reader is old.

--boundary
Content-Type: text/plain; charset=us-ascii

Hi, {{name}},

Your number is {{number}}.

Sent by mailmerge https://github.com/awdeorio/mailmerge

--boundary
Content-Type: text/html; charset=us-ascii

<html>
<body>

<p>Hi, {{name}},</p>

<p>Your number is {{number}}.</p>

<p>Sent by <a href="https://github.com/awdeorio/mailmerge">mailmerge</a></p>

</body>
</html>
"""

MARKDOWN = """TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@mydomain.com>
CONTENT-TYPE: text/markdown

You can add:

- Emphasis, aka italics, with *asterisks*.
- Strong emphasis, aka bold, with **asterisks**.
- Combined emphasis with **asterisks and _underscores_**.
- Unordered lists like this one.
- Ordered lists with numbers:
    1. Item 1
    2. Item 2
- Preformatted text with `backticks`.
- How about some [hyperlinks](http://bit.ly/eecs485-wn19-p6)?

# This is a heading.
## And another heading.

Here's an image not attached with the email:
![python logo not attached](http://pluspng.com/img-png/python-logo-png-open-2000.png)
"""

ATTACHMENTS = """TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@mydomain.com>
ATTACHMENT: file1.docx
ATTACHMENT: ../file2.pdf
ATTACHMENT: /z/shared/{{name}}_submission.txt

Hi, {{name}},

This email contains three attachments.
Pro-tip: Use Jinja to customize the attachments based on your database!
"""

INLINE_IMAGE_HTML = """TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@mydomain.com>
Content-Type: text/html
ATTACHMENT: image.jpg
ATTACHMENT: second/image.jpg

<html>
<body>

<p>Hi, {{name}},</p>

<img alt="Sample image" src="image.jpg" />

The second image: <img alt="second" src="second/image.jpg">

<p>Sent by <a href="https://github.com/awdeorio/mailmerge">mailmerge</a></p>

</body>
</html>
"""

INLINE_IMAGE_MARKDOWN = """TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@mydomain.com>
ATTACHMENT: image.jpg
CONTENT-TYPE: text/markdown

Hi, {{name}},

![image alt-description](image.jpg)
"""

# One connection, one batch: messages reach the server in row order, as these tests index them.
IN_ROW_ORDER = SendOptions(concurrency=1, batch_size=100)


def _run(
    folder: Path, smtp_server: SmtpServer, template: str, database: str = DATABASE
) -> campaign.SendReport:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mailmerge_template.txt").write_text(template, encoding="utf-8")
    (folder / "mailmerge_database.csv").write_text(database, encoding="utf-8")
    return campaign.send(
        folder / "mailmerge_database.csv",
        folder / "mailmerge_template.txt",
        transport=smtp_server.url,
        ledger_path=str(folder / "mergekit.db"),
        options=IN_ROW_ORDER,
    )


def _text(part: object) -> str:
    return str(part.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]


def test_simple_example(tmp_path: Path, smtp_server: SmtpServer) -> None:
    report = _run(tmp_path, smtp_server, SIMPLE)
    assert report.run.counts["sent"] == 2
    bob = smtp_server.messages[1]
    assert bob.mail_from == "myself@mydomain.com" and bob.rcpt_tos == ["bob@bobdomain.com"]
    message = bob.parsed(strict=True)
    assert message["Subject"] == "Testing mailmerge"
    assert _text(message) == "Hi, Bob,\n\nYour number is 42.\n"


def test_advanced_progress_report(tmp_path: Path, smtp_server: SmtpServer) -> None:
    _run(tmp_path, smtp_server, PROGRESS_TEMPLATE, PROGRESS_DATABASE)
    bodies = [_text(r.parsed(strict=True)) for r in smtp_server.messages]
    assert "Project 1: 100" in bodies[0] and "concerned" not in bodies[0]
    assert "border of the pass/fail line" in bodies[1]
    assert "you will not pass the course" in bodies[2]


def test_html_only(tmp_path: Path, smtp_server: SmtpServer) -> None:
    _run(tmp_path, smtp_server, HTML_ONLY)
    message = smtp_server.messages[0].parsed(strict=True)
    assert message.get_content_type() == "multipart/alternative"
    assert "<p>Hi, Myself,</p>" in _text(message.get_body(("html",)))
    assert "Sent by mailmerge (https://github.com/awdeorio/mailmerge)" in _text(message.get_body(("plain",)))


def test_html_and_plain_text(tmp_path: Path, smtp_server: SmtpServer) -> None:
    _run(tmp_path, smtp_server, HTML_AND_TEXT)
    message = smtp_server.messages[1].parsed(strict=True)
    assert message.get_content_type() == "multipart/alternative"
    text = _text(message.get_body(("plain",)))
    assert text.startswith(
        "Hi, Bob,\n\nYour number is 42.\n\nSent by mailmerge https://github.com/awdeorio/mailmerge"
    )
    assert "This is a MIME-encoded message" not in text
    assert "<p>Your number is 42.</p>" in _text(message.get_body(("html",)))


def test_markdown(tmp_path: Path, smtp_server: SmtpServer) -> None:
    _run(tmp_path, smtp_server, MARKDOWN)
    message = smtp_server.messages[0].parsed(strict=True)
    html = _text(message.get_body(("html",)))
    assert "<em>asterisks</em>" in html and "<strong>asterisks</strong>" in html
    assert "<ol>\n<li>Item 1</li>" in html
    assert '<a href="http://bit.ly/eecs485-wn19-p6">hyperlinks</a>' in html
    assert "<h1>This is a heading.</h1>" in html and "<h2>And another heading.</h2>" in html
    assert (
        '<img src="http://pluspng.com/img-png/python-logo-png-open-2000.png" alt="python logo not attached"'
        in html
    )
    assert _text(message.get_body(("plain",))).startswith("You can add:")


def test_attachments_inside_the_folder_work_outside_are_refused(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    folder = tmp_path / "campaign"
    folder.mkdir()
    (folder / "file1.docx").write_bytes(b"PK\x03\x04docx")
    (tmp_path / "file2.pdf").write_bytes(b"%PDF")
    report = _run(folder, smtp_server, ATTACHMENTS)
    # mailmerge reads ../file2.pdf and /z/shared/...; mergekit refuses paths outside the folder by design.
    assert report.run.counts["invalid"] == 2 and smtp_server.messages == []
    _, rows = campaign.report(ledger_path=str(folder / "mergekit.db"))
    assert all("'../file2.pdf' is outside the attachments folder" in row.last_text for row in rows)
    # The same template with only the in-folder attachment runs unchanged.
    only_inside = ATTACHMENTS.replace("ATTACHMENT: ../file2.pdf\n", "").replace(
        "ATTACHMENT: /z/shared/{{name}}_submission.txt\n", ""
    )
    report = _run(
        tmp_path / "second", smtp_server, only_inside.replace("file1.docx", "../campaign/file1.docx")
    )
    assert report.run.counts["invalid"] == 2
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "file1.docx").write_bytes(b"PK\x03\x04docx")
    report = _run(tmp_path / "third", smtp_server, only_inside)
    assert report.run.counts["sent"] == 2
    (attachment,) = smtp_server.messages[0].parsed(strict=True).iter_attachments()
    assert attachment.get_filename() == "file1.docx"
    assert (
        attachment.get_content_type()
        == "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    )
    assert attachment.get_content() == b"PK\x03\x04docx"


@pytest.mark.parametrize("template", [INLINE_IMAGE_HTML, INLINE_IMAGE_MARKDOWN])
def test_inline_images(tmp_path: Path, smtp_server: SmtpServer, template: str) -> None:
    (tmp_path / "second").mkdir(parents=True)
    (tmp_path / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0first")
    (tmp_path / "second" / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0second")
    _run(tmp_path, smtp_server, template)
    message = smtp_server.messages[0].parsed(strict=True)
    related = message.get_body(("related",))
    assert related is not None
    html = _text(related.get_body(("html",)))
    images = [part for part in related.iter_parts() if part.get_content_type() == "image/jpeg"]
    assert len(images) == template.count("ATTACHMENT:")
    for image in images:
        assert f'src="cid:{image["Content-ID"].strip("<>")}"' in html
    assert images[0].get_content() == b"\xff\xd8\xff\xe0first"
