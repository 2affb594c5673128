"""The hand-built wire form, parsed back by the standard library (strict where it applies)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from email.utils import getaddresses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit.addresses import validate_address as _validate_address
from mergekit.errors import RenderError
from mergekit.render import (
    _SINGLE_ANGLE_ADDRESS,
    Template,
    TemplateSource,
    _parse_addresses,
)

TEMPLATE = """\
From: Ada from Example Co <ada@example.com>
To: {{ name }} <{{ email }}>
Subject: {{ subject }}
Reply-To: support@example.com

{{ body }}
"""


def build(**data: str) -> bytes:
    template = Template(TemplateSource.parse(TEMPLATE), campaign="wire")
    return template.render(data, row=1, key=data["email"]).raw


def strict(raw: bytes) -> EmailMessage:
    """Parse with ``policy.strict``: any defect the parser notices raises."""
    parsed = email.message_from_bytes(raw, policy=email.policy.strict)
    assert isinstance(parsed, EmailMessage)
    assert parsed.defects == []
    for name in parsed:
        assert parsed[name].defects == ()
    return parsed


def lines(raw: bytes) -> list[bytes]:
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF on the wire"
    return raw.split(b"\r\n")


def test_ascii_message_is_strictly_valid_7bit() -> None:
    raw = build(name="Bob Smith", email="bob@example.org", subject="Welcome", body="Hello Bob.\n.dot line")
    parsed = strict(raw)
    assert parsed["To"].addresses[0].addr_spec == "bob@example.org"
    assert parsed["To"].addresses[0].display_name == "Bob Smith"
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    assert parsed.get_content().replace("\r\n", "\n") == "Hello Bob.\n.dot line\n"
    assert raw.isascii()


def test_non_ascii_headers_and_body_round_trip_strictly() -> None:
    name = "Amélie Dubois-Ærøskøbing 日本"
    raw = build(name=name, email="amelie@example.org", subject=f"Bienvenue, {name} ✓", body=f"Chère {name},")
    head = raw.split(b"\r\n\r\n")[0]
    assert head.isascii()
    assert all(len(line) <= 78 for line in lines(head))
    parsed = strict(raw)
    assert parsed["Subject"] == f"Bienvenue, {name} ✓"
    assert parsed["To"].addresses[0].display_name == name
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == f"Chère {name},\n"


def test_long_headers_fold_at_78_and_parse_back_unchanged() -> None:
    subject = " ".join(f"word{i}" for i in range(80))
    raw = build(name="Bob", email="bob@example.org", subject=subject, body="x")
    head = raw.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in lines(head))
    assert strict(raw)["Subject"] == subject


def test_unfoldable_long_header_is_encoded_within_998() -> None:
    subject = "x" * 1500
    raw = build(name="Bob", email="bob@example.org", subject=subject, body="x")
    assert all(len(line) <= 998 for line in lines(raw))
    assert strict(raw)["Subject"] == subject


def test_long_non_ascii_header_splits_between_characters() -> None:
    subject = "é" * 100 + "日本語" * 20
    raw = build(name="Bob", email="bob@example.org", subject=subject, body="x")
    assert all(len(line) <= 78 for line in lines(raw.split(b"\r\n\r\n")[0]))
    assert strict(raw)["Subject"] == subject


def test_long_body_lines_become_quoted_printable() -> None:
    body = "y" * 3000 + "\nshort\n" + "z " * 700
    raw = build(name="Bob", email="bob@example.org", subject="s", body=body)
    assert all(len(line) <= 78 for line in lines(raw))
    parsed = strict(raw)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == body + "\n"


def test_display_name_with_specials_is_quoted_strictly() -> None:
    raw = build(name='Doe, "Jo" Jr.', email="jo@example.org", subject="s", body="x")
    address = strict(raw)["To"].addresses[0]
    assert (address.display_name, address.addr_spec) == ('Doe, "Jo" Jr.', "jo@example.org")


def test_idna_domain_goes_on_the_wire_as_ascii() -> None:
    raw = build(name="Jo", email="jo@münchen.de", subject="s", body="x")
    assert strict(raw)["To"].addresses[0].addr_spec == "jo@xn--mnchen-3ya.de"


def _reference(value: str) -> list[tuple[str, str]] | None:
    """The general path: getaddresses and email-validator on every address (None: refused)."""
    pairs = getaddresses([value])
    if not pairs or any("@" not in address for _, address in pairs):
        single = _SINGLE_ANGLE_ADDRESS.match(value)
        if single is None:
            return None
        pairs = [(single.group(1).strip().strip('"'), single.group(2).strip())]
    try:
        return [(" ".join(name.split()), _validate_address(address)) for name, address in pairs]
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abcXY .-_'", max_size=12),
    st.text(alphabet="abc.+-_!", min_size=1, max_size=10),
    st.sampled_from(["example.org", "Example.COM", "localhost", "x.invalid", "münchen.de", "a..b.org"]),
    st.booleans(),
)
def test_fast_address_path_agrees_with_the_general_one(
    name: str, local: str, domain: str, angle: bool
) -> None:
    value = f"{name} <{local}@{domain}>".strip() if angle else f"{local}@{domain}"
    expected = _reference(value)
    try:
        found = _parse_addresses(value, header="To", row=1, key="k")
    except RenderError:
        found = None
    assert found == expected


@pytest.mark.parametrize("local", ["a" * 64, "a" * 65, ".a", "a.", "a..b", 'a"b', "a b"])
def test_local_part_limits_match_email_validator(local: str) -> None:
    value = f"{local}@example.org"
    try:
        _validate_address(value)
        valid = True
    except ValueError:
        valid = False
    try:
        _parse_addresses(f"X <{value}>", header="To", row=1, key="k")
        accepted = True
    except RenderError:
        accepted = False
    assert accepted == valid
