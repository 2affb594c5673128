"""Property tests: row values never become markup in HTML bodies, nor new headers in the header block."""

from __future__ import annotations

import email
import email.policy
import re
from html.parser import HTMLParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit.errors import RenderError
from mergekit.render import Template, TemplateSource

HTML_TEMPLATE = (
    "From: a@example.com\nTo: r@example.com\nSubject: s\nContent-Type: text/html\n\n"
    '<html><head><style>p { color: red }</style></head><body><p title="{{ v }}">{{ v }}</p></body></html>\n'
)
MARKDOWN_TEMPLATE = (
    "From: a@example.com\nTo: r@example.com\nSubject: s\nContent-Type: text/markdown\n\n{{ v }}\n"
)
HEADER_TEMPLATE = "From: a@example.com\nTo: r@example.com\nSubject: Hello {{ v }}\nX-Note: {{ v }}\n\nbody\n"
EXPECTED_HEADERS = ["From", "To", "Subject", "X-Note", "Date", "Message-ID", "MIME-Version", "Content-Type"]
# What CommonMark may legitimately produce from text (emphasis, links, lists ...): never script or raw HTML.
MARKDOWN_TAGS = {
    "html", "body", "p", "em", "strong", "a", "img", "code", "pre", "ul", "ol", "li", "h1", "h2", "h3", "h4",
    "h5", "h6", "blockquote", "hr", "br", "table", "thead", "tbody", "tr", "th", "td", "s",
}  # fmt: skip

html_template = Template(TemplateSource.parse(HTML_TEMPLATE, path="t.txt"), campaign="c")
markdown_template = Template(TemplateSource.parse(MARKDOWN_TEMPLATE, path="t.txt"), campaign="c")
header_template = Template(TemplateSource.parse(HEADER_TEMPLATE, path="t.txt"), campaign="c")

values = st.one_of(
    st.text(),
    st.text(
        alphabet=st.sampled_from(list("<>&\"'/=!-[]()*_`\\\r\n \tscriptimgonerror:javascript")), max_size=60
    ),
    st.sampled_from(
        [
            "<script>alert(1)</script>",
            "</p><img src=x onerror=alert(1)>",
            '" onmouseover="alert(1)',
            "<!-- x -->",
            "{{ 7*7 }}",
            "a\r\nBcc: victim@example.com",
            "<style>*{}</style>",
        ]
    ),
)


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.other: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_comment(self, data: str) -> None:
        self.other.append(data)

    def handle_decl(self, decl: str) -> None:
        self.other.append(decl)

    def handle_pi(self, data: str) -> None:
        self.other.append(data)


def _html_part(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    return str(message.get_body(("html",)).get_content()).replace("\r\n", "\n")  # type: ignore[union-attr]


def _normalised(value: str) -> str:
    return value.replace("\r\n", "\n").replace("\r", "\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_html_body_never_gets_markup_from_data(value: str) -> None:
    message = html_template.render({"v": value}, row=1, key="k")
    markup = _Markup()
    markup.feed(_html_part(message.raw))
    markup.close()
    assert markup.tags == ["html", "head", "body", "p"]
    assert markup.other == []
    assert sorted(name for name, _ in markup.attributes) == ["style", "title"]
    assert dict(markup.attributes)["title"] == _normalised(value)
    assert "".join(markup.text).strip("\n") == _normalised(value).strip("\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_markdown_body_never_gets_raw_html_from_data(value: str) -> None:
    message = markdown_template.render({"v": value}, row=1, key="k")
    markup = _Markup()
    markup.feed(_html_part(message.raw))
    markup.close()
    assert set(markup.tags) <= MARKDOWN_TAGS
    assert markup.other in ([], ["DOCTYPE html"])
    for name, attribute in markup.attributes:
        assert name in {"href", "src", "alt", "title", "start", "class"}
        if name in {"href", "src"}:
            assert not re.match(r"\s*(javascript|vbscript|data):", attribute or "", re.I)


@settings(max_examples=300, deadline=None)
@given(values)
def test_header_values_never_make_a_new_header(value: str) -> None:
    try:
        message = header_template.render({"v": value}, row=1, key="k")
    except RenderError as err:
        assert err.header in {"Subject", "X-Note"}
        assert re.search(r"[\r\n\x00-\x08\x0b-\x1f\x7f]", value) or "contains" in err.message
        return
    assert "\r" not in value and "\n" not in value
    parsed = email.message_from_bytes(message.raw, policy=email.policy.default)
    assert [name for name, _ in parsed.items()][: len(EXPECTED_HEADERS)] == EXPECTED_HEADERS
    assert len(parsed.keys()) == len(EXPECTED_HEADERS) + 1  # + Content-Transfer-Encoding
    assert " ".join(str(parsed["X-Note"]).split()) == " ".join(value.split())
