"""Render: template format, header safety, wire encoding parsed back by the standard library."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from mergekit.errors import RenderError, TemplateError
from mergekit.render import Template, TemplateSource, make_message_id

BASIC = """\
From: Ada Example <ada@example.com>
To: {{ name }} <{{ email }}>
Subject: Hello {{ name }}

Dear {{ name }}, your code is {{ zip }}.
"""


def render(source: str, **data: str) -> tuple[EmailMessage, bytes]:
    template = Template(TemplateSource.parse(source), campaign="test")
    message = template.render(data, row=1, key=data.get("email", "k"))
    parsed = email.message_from_bytes(message.raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed, message.raw


def content(parsed: EmailMessage) -> str:
    """The body text with the wire's CRLF line ends read back as newlines."""
    return str(parsed.get_content()).replace("\r\n", "\n")


def test_ascii_message_parses_back_with_values_intact() -> None:
    parsed, raw = render(BASIC, name="Bob", email="bob@example.org", zip="02134")
    assert parsed["To"] == "Bob <bob@example.org>"
    assert parsed["Subject"] == "Hello Bob"
    assert content(parsed) == "Dear Bob, your code is 02134.\n"
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    assert b"\r\n\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_non_ascii_headers_are_rfc2047_and_display_names_survive() -> None:
    parsed, raw = render(BASIC, name="Zoë Ærøskøbing-Ñúñez", email="zoe@example.org", zip="1")
    head = raw.split(b"\r\n\r\n")[0]
    assert head.isascii()
    assert parsed["Subject"] == "Hello Zoë Ærøskøbing-Ñúñez"
    assert parsed["To"].addresses[0].display_name == "Zoë Ærøskøbing-Ñúñez"
    assert parsed["To"].addresses[0].addr_spec == "zoe@example.org"
    assert content(parsed) == "Dear Zoë Ærøskøbing-Ñúñez, your code is 1.\n"


def test_display_names_with_specials_are_quoted() -> None:
    parsed, _ = render(BASIC, name='Doe, "Jo" Jr.', email="jo@example.org", zip="1")
    assert parsed["To"].addresses[0].display_name == 'Doe, "Jo" Jr.'
    assert parsed["To"].addresses[0].addr_spec == "jo@example.org"


def test_long_headers_are_folded_and_long_lines_encoded() -> None:
    long_name = " ".join(["word"] * 60)
    parsed, raw = render(
        BASIC.replace("Dear", "x" * 1200 + " Dear"), name=long_name, email="l@example.org", zip="1"
    )
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert parsed["Subject"] == f"Hello {long_name}"
    assert content(parsed).startswith("x" * 1200)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"


def test_message_id_is_deterministic_per_campaign_and_key() -> None:
    _, first = render(BASIC, name="A", email="a@example.org", zip="1")
    _, again = render(BASIC, name="A changed", email="a@example.org", zip="2")
    message_id = make_message_id("test", "a@example.org", "example.com")
    assert f"Message-ID: {message_id}".encode() in first
    assert f"Message-ID: {message_id}".encode() in again
    assert make_message_id("other", "a@example.org", "example.com") != message_id


@pytest.mark.parametrize(
    "value, label",
    [("Bob\r\nBcc: victim@example.net", "CR"), ("Bob\nBcc: victim@example.net", "LF"), ("Bob\x00", "NUL")],
)
def test_line_breaks_from_data_never_make_a_header(value: str, label: str) -> None:
    with pytest.raises(RenderError) as caught:
        render(BASIC, name=value, email="bob@example.org", zip="1")
    assert caught.value.header == "To"
    assert label in caught.value.message


def test_line_breaks_in_the_body_are_fine() -> None:
    parsed, _ = render(
        "From: a@example.com\nTo: b@example.org\nSubject: s\n\n{{ text }}\n", text="one\r\ntwo\nthree"
    )
    assert content(parsed) == "one\ntwo\nthree\n"


def test_undefined_variable_is_named() -> None:
    with pytest.raises(RenderError, match="'nickname' is undefined"):
        render(
            "From: a@example.com\nTo: {{ email }}\nSubject: Hi {{ nickname }}\n\nx\n", email="b@example.org"
        )


def test_bad_address_header_names_the_header() -> None:
    with pytest.raises(RenderError) as caught:
        render(BASIC, name="Bob", email="not an address", zip="1")
    assert caught.value.header == "To"


def test_a_bad_address_repeated_names_each_row() -> None:
    """Address headers are cached by value; a refusal is not, so every row gets its own error."""
    template = Template(TemplateSource.parse(BASIC), campaign="test")
    for row in (1, 2):
        with pytest.raises(RenderError) as caught:
            template.render({"name": "Bob", "email": "not an address", "zip": "1"}, row=row, key=f"k{row}")
        assert (caught.value.row, caught.value.key, caught.value.header) == (row, f"k{row}", "To")


def test_missing_from_or_recipient_is_refused() -> None:
    with pytest.raises(RenderError, match="From"):
        render("To: b@example.org\nSubject: s\n\nx\n")
    with pytest.raises(RenderError, match="recipient"):
        render("From: a@example.com\nSubject: s\n\nx\n")


def test_bcc_is_an_envelope_recipient_but_not_on_the_wire() -> None:
    template = Template(
        TemplateSource.parse("From: a@example.com\nTo: b@example.org\nBcc: c@example.org\nSubject: s\n\nx\n"),
        campaign="t",
    )
    message = template.render({}, row=1, key="b")
    assert message.envelope_to == ("b@example.org", "c@example.org")
    assert b"c@example.org" not in message.raw


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt"
    path.write_text("From: a@example.com\nTo: {{ email }}\nSubject: s\n\nline 5\n{% if x %}\n")
    with pytest.raises(TemplateError) as caught:
        Template.from_path(path, campaign="t")
    assert caught.value.path == str(path)
    assert caught.value.line == 6
    assert f"{path}:6" in str(caught.value)


def test_template_without_blank_line_is_refused() -> None:
    with pytest.raises(TemplateError, match="blank line"):
        TemplateSource.parse("From: a@example.com\nTo: b@example.org\n")


def test_conditional_headers_like_mailmerge() -> None:
    source = "From: a@example.com\nTo: {{ email }}\n{% if cc %}Cc: {{ cc }}\n{% endif %}Subject: s\n\nbody\n"
    template = Template(TemplateSource.parse(source), campaign="t")
    with_cc = template.render({"email": "b@example.org", "cc": "c@example.org"}, row=1, key="b")
    without = template.render({"email": "b@example.org", "cc": ""}, row=2, key="b")
    assert with_cc.envelope_to == ("b@example.org", "c@example.org")
    assert without.envelope_to == ("b@example.org",)


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(RenderError):
        render(
            "From: a@example.com\nTo: b@example.org\nSubject: s\n\n"
            "{{ ''.__class__.__mro__[1].__subclasses__() }}\n"
        )
