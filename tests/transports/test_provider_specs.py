"""Every request a transport sends conforms to the provider's own API document (issue 13, item 9).

Real campaigns go through each HTTP transport into the real local server
(:mod:`tests.transports.fakeapi`), which keeps every request as it arrived;
:mod:`tests.transports.specs` checks each against the document in
``provider_specs/``. The messages vary enough to take every path of the
payload builders: plain text with non-ASCII names and subject (the
substitution path on SendGrid and Mailgun), HTML with its text part, Cc, Bcc,
Reply-To, custom headers, unsubscribe headers, attachments and an inline
image (Resend's ``POST /emails``), a text message with a non-ASCII file name,
and the URL options that add fields (sandbox, test mode, message stream,
configuration set). The last tests show the checker failing on what it must
refuse.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from collections.abc import Callable
from dataclasses import replace
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import pytest

import mergekit
from mergekit.campaign import ContentOptions
from tests.transports.api_campaign import FAST, NAMES, NASTY, TEMPLATE, url_for
from tests.transports.fakeapi import KEYS, Captured, FakeApi
from tests.transports.specs import SPEC_SUMMARY, form_parts, violations

HTML = """\
From: "Ada Ö. Lovelace" <ada@example.com>
To: {{ name }} <{{ email }}>
Cc: {{ name }} (Büro) <office{{ n }}@example.net>
Bcc: archive@example.com
Reply-To: Help Desk <help@example.com>
Subject: Ihre Unterlagen, {{ name }} \u2013 Nº {{ n }} ✓
X-Campaign: spring
X-Row-City: {{ city }}
Attachment: logo.png
Attachment: Preisliste Ü.pdf

<html><body><p>Hallo {{ name }},</p><p><img src="logo.png" alt="Logo"></p>
<p>{{ city }} &amp; <a href="{{ unsubscribe_url }}">abmelden</a></p></body></html>
"""

ATTACHED = """\
From: ada@example.com
To: {{ email }}
Subject: {{ name }}: la liste des prix
Attachment: Preisliste Ü.pdf

Bonjour {{ name }}, voici la liste ({{ city }}).
"""

# Every other row renders an empty Subject and body: SendGrid's document allows neither.
EMPTY = """\
From: ada@example.com
To: {{ name }} <{{ email }}>
Subject: {{ note }}

{{ note }}"""

# Each template with its file suffix (the body kind) and row count.
VARIANTS = {
    "plain": (TEMPLATE, ".txt", 12),
    "html": (HTML, ".html", 4),
    "attached": (ATTACHED, ".txt", 3),
    "empty": (EMPTY, ".txt", 4),
}
# URL options that add fields to the payload, besides the default URL.
EXTRAS = {
    "postmark": ["", "message_stream=outbound"],
    "resend": [""],
    "sendgrid": ["", "substitution=false&sandbox=true"],
    "mailgun": ["", "substitution=false&testmode=true"],
    "mailjet": ["", "sandbox=true"],
    "ses": ["", "configuration_set=news"],
    "nylas": [""],
}
UNSUBSCRIBE = ContentOptions(
    unsubscribe_url="https://example.com/u/{token}", unsubscribe_mailto="leave@example.com"
)
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _inline_shown(provider: str, request: Captured) -> list[tuple[str, set[str]]]:
    """Each message's HTML and the Content-IDs the request sends as inline attachments for it."""
    if provider == "mailgun":  # an ``inline`` file's name is its Content-ID
        if "multipart/" not in dict(request.headers).get("Content-Type", ""):
            return []  # main's urlencoded requests carried no file, so no HTML variant
        named: dict[str, list[Any]] = {}
        for part in form_parts(request):
            named.setdefault(part.get_param("name", header="content-disposition"), []).append(part)
        html = "".join(part.get_payload(decode=True).decode() for part in named.get("html", []))
        return [(html, {str(part.get_filename()) for part in named.get("inline", [])})]
    body = json.loads(request.body)
    if provider == "ses":  # the raw message: its related parts' Content-ID headers
        raw = BytesParser(policy=HTTP).parsebytes(base64.b64decode(body["Content"]["Raw"]["Data"]))
        html_part = raw.get_body(("html",))
        ids = {str(p["Content-ID"]).strip("<>") for p in raw.walk() if p["Content-ID"]}
        return [(html_part.get_content() if html_part is not None else "", ids)]
    if provider == "sendgrid":
        html = next((c["value"] for c in body["content"] if c["type"] == "text/html"), "")
        files = body.get("attachments", [])
        return [(html, {a["content_id"] for a in files if a.get("disposition") == "inline"})]
    if provider == "nylas":
        files = body.get("attachments", [])
        return [(body["body"], {a["content_id"] for a in files if a.get("is_inline")})]
    # One entry per message: (its HTML field, its attachment list field, the Content-ID field and prefix)
    html_field, files_field, key, prefix = {
        "postmark": ("HtmlBody", "Attachments", "ContentID", "cid:"),
        "resend": ("html", "attachments", "content_id", ""),
        "mailjet": ("HTMLPart", "InlinedAttachments", "ContentID", ""),
    }[provider]
    messages = body["Messages"] if provider == "mailjet" else body if isinstance(body, list) else [body]
    return [
        (m.get(html_field, ""), {a[key].removeprefix(prefix) for a in m.get(files_field, []) if key in a})
        for m in messages
    ]


def _campaign(folder: Path, template: str, suffix: str, count: int) -> tuple[Path, Path]:
    folder.mkdir()
    (folder / "logo.png").write_bytes(PNG)
    (folder / "Preisliste Ü.pdf").write_bytes(b"%PDF-1.4\n% mergekit test\n%%EOF\n")
    rows = [
        {
            "email": f"user{i:03d}@example.org",
            "name": NAMES[i % len(NAMES)],
            "n": str(i),
            "code": f"{i:05d}{NASTY[i % len(NASTY)]}",
            "city": NASTY[(i * 7) % len(NASTY)] or "Köln",
            "note": "" if i % 2 == 0 else NASTY[i % len(NASTY)],
        }
        for i in range(count)
    ]
    data = folder / "people.csv"
    with data.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path = folder / f"message{suffix}"
    path.write_text(template, encoding="utf-8")
    return data, path


@pytest.mark.usefixtures("keys_in_env")
@pytest.mark.parametrize("provider", list(EXTRAS))
def test_requests_conform_to_the_providers_document(
    provider: str, api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGEKIT_UNSUBSCRIBE_SECRET", "unsubscribe-secret-for-tests")
    paths: set[str] = set()
    delivered = 0
    for e, extra in enumerate(EXTRAS[provider]):
        for name, (template, suffix, count) in VARIANTS.items():
            data, path = _campaign(tmp_path / f"{name}{e}", template, suffix, count)
            report = mergekit.send(
                data,
                path,
                transport=url_for(provider, api, extra),
                ledger_path=str(data.parent / "ledger.db"),
                campaign=f"{name}{e}",  # Message-IDs (and idempotency keys) differ between campaigns
                options=replace(FAST, concurrency=2),
                content=UNSUBSCRIBE if name == "html" else ContentOptions(),
            )
            counts = report.run.counts
            # An empty row is sent, or refused (by the server or, on SendGrid, before a request).
            assert counts["sent"] == count or (name == "empty" and counts["sent"] + counts["failed"] == count)
            _, rows = mergekit.report(ledger_path=str(data.parent / "ledger.db"))
            assert all(row.last_text for row in rows if row.state == "failed"), rows
            delivered += counts["sent"]
    found = {}
    inline_images = 0
    for index, request in enumerate(api.captured):
        paths.add(request.path.split("?")[0])
        problems = violations(provider, request)
        for html, inline_ids in _inline_shown(provider, request):
            if "<img" in html:  # the HTML variant: its logo.png is shown inline, by Content-ID
                inline_images += 1
                shown = set(re.findall(r'<img src="cid:([^"]+)"', html))
                if not shown or shown != inline_ids:
                    problems.append(
                        f"inline image: the HTML shows {shown or html[:80]!r}, sent inline {inline_ids}"
                    )
        if problems:
            found[index] = problems
    assert inline_images == VARIANTS["html"][2] * len(EXTRAS[provider])
    SPEC_SUMMARY.append(
        {
            "provider": provider,
            "requests": len(api.captured),
            "violating": len(found),
            "operations": ", ".join(sorted(paths)),
            "first violation": next(iter(found.values()), [""])[0][:90],
        }
    )
    assert len(api.deliveries) == delivered
    if provider == "resend":  # attachments take POST /emails, the rest the batch endpoint
        assert paths == {"/emails", "/emails/batch"}
    assert not found, "\n".join(f"request {i}: {'; '.join(p)}" for i, p in found.items())


# -- the checker refuses what it must --------------------------------------------------


def _post(api: FakeApi, path: str, **kwargs: Any) -> Captured:
    """Send one request to the real server as given; return it as the server captured it."""
    before = len(api.captured)
    httpx.post(api.base_url + path, timeout=10, **kwargs)
    assert len(api.captured) == before + 1
    return api.captured[-1]


MAILGUN = "/v3/mg.example.com/messages"
MAILGUN_AUTH = httpx.BasicAuth("api", KEYS["mailgun"])
MAILGUN_FIELDS = {
    "from": "ada@example.com",
    "to": ["a@example.org", "b@example.org"],
    "subject": "Hi",
    "text": "x",
}


def _as_parts(fields: dict[str, Any]) -> list[tuple[str, tuple[None, bytes, None]]]:
    """``fields`` as multipart parts without a file name: plain form fields."""
    values = [(k, v) for k, vs in fields.items() for v in (vs if isinstance(vs, list) else [vs])]
    return [(name, (None, value.encode(), None)) for name, value in values]


def test_mailgun_checks_catch_a_urlencoded_form_and_bad_fields(api: FakeApi) -> None:
    good = _post(api, MAILGUN, auth=MAILGUN_AUTH, files=_as_parts(MAILGUN_FIELDS))
    assert violations("mailgun", good) == []
    # What the transport sent for a message without attachments before the fix.
    urlencoded = _post(api, MAILGUN, auth=MAILGUN_AUTH, data=MAILGUN_FIELDS)
    assert violations("mailgun", urlencoded) == [
        "Content-Type application/x-www-form-urlencoded is not one the operation accepts "
        "(multipart/form-data)"
    ]
    no_subject = {k: v for k, v in MAILGUN_FIELDS.items() if k != "subject"}
    missing = _post(api, MAILGUN, auth=MAILGUN_AUTH, files=_as_parts(no_subject))
    assert violations("mailgun", missing) == ["form: 'subject' is a required property"]
    twice = _post(api, MAILGUN, auth=MAILGUN_AUTH, files=_as_parts({**MAILGUN_FIELDS, "subject": ["a", "b"]}))
    assert violations("mailgun", twice) == ["form/subject: ['a', 'b'] is not of type 'string'"]
    no_body = {k: v for k, v in MAILGUN_FIELDS.items() if k != "text"}
    empty = _post(api, MAILGUN, auth=MAILGUN_AUTH, files=_as_parts(no_body))
    assert violations("mailgun", empty) == [
        "none of text, html, amp-html, template (the operation needs one)"
    ]
    bearer = _post(api, MAILGUN, headers={"Authorization": "Bearer x"}, files=_as_parts(MAILGUN_FIELDS))
    assert violations("mailgun", bearer) == ["Authorization is not basic (Bearer)"]


def _drop(*keys: str) -> Callable[[Any], Any]:
    """Remove ``keys`` (a path) from a JSON body; a list on the way means its first item."""

    def mutate(body: Any) -> Any:
        node = body
        for key in keys[:-1]:
            node = node[0] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node = node[0]
        del node[keys[-1]]
        return body

    return mutate


def _set(value: Any, *keys: str) -> Callable[[Any], Any]:
    def mutate(body: Any) -> Any:
        node = body[0] if isinstance(body, list) else body
        for key in keys[:-1]:
            node = node[key][0] if isinstance(node[key], list) else node[key]
        node[keys[-1]] = value
        return body

    return mutate


# A required field removed, or a field of the wrong type, and the line the checker must give.
BROKEN = [
    ("postmark", _set(["a@example.org"], "To"), "body/0/To: ['a@example.org'] is not of type 'string'"),
    ("postmark", _set(", ".join(f"u{i}@example.org" for i in range(51)), "To"), "To: more than 50 addresses"),
    ("resend", _drop("subject"), "'subject' is a required property"),
    ("resend", _set([], "to"), "body/0/to: [] is not valid under any of the given schemas"),
    ("sendgrid", _drop("from"), "body: 'from' is a required property"),
    ("sendgrid", _drop("personalizations", "to"), "body/personalizations/0: 'to' is a required property"),
    ("sendgrid", _set("", "subject"), "body/subject: '' should be non-empty"),
    ("sendgrid", _set({"Reply-To": "x"}, "personalizations", "headers"), "reserved headers ['reply-to']"),
    (
        "sendgrid",
        _set({"k": "v" * 10_000}, "personalizations", "custom_args"),
        "custom_args is 10009 bytes, over 10000",
    ),
    ("mailjet", _drop("Messages", "To"), "body/Messages/0: 'To' is a required property"),
    (
        "mailjet",
        _set("x", "Messages", "Bogus"),
        "Additional properties are not allowed ('Bogus' was unexpected)",
    ),
    ("nylas", _drop("to"), "body: 'to' is a required property"),
    ("nylas", _set("a@example.org", "to"), "body/to: 'a@example.org' is not of type 'array'"),
    ("ses", _drop("Content"), 'Missing required parameter in input: "Content"'),
    ("ses", _set("not base64!", "Content", "Raw", "Data"), "SendEmail.Content.Raw.Data: blob is not base64"),
    ("ses", _set("x", "Bogus"), 'Unknown parameter in input: "Bogus"'),
]


@pytest.mark.usefixtures("keys_in_env")
@pytest.mark.parametrize(("provider", "mutate", "expected"), BROKEN)
def test_checks_catch_a_broken_body(
    provider: str, mutate: Callable[[Any], Any], expected: str, api: FakeApi, tmp_path: Path
) -> None:
    data, path = _campaign(tmp_path / "c", TEMPLATE, ".txt", 2)
    mergekit.send(data, path, transport=url_for(provider, api), ledger_path=str(tmp_path / "l.db"))
    sent = api.captured[0]
    assert violations(provider, sent) == []
    broken = Captured(
        sent.method, sent.path, sent.headers, json.dumps(mutate(json.loads(sent.body))).encode()
    )
    problems = violations(provider, broken)
    assert any(expected in line for line in problems), problems
    unsigned = [
        (k, v) for k, v in sent.headers if k.lower() not in {"authorization", "x-postmark-server-token"}
    ]
    assert violations(provider, replace(sent, headers=unsigned)), "a request without its credentials passed"
    as_text = [(k, "text/plain" if k.lower() == "content-type" else v) for k, v in sent.headers]
    assert any(
        "Content-Type text/plain" in line for line in violations(provider, replace(sent, headers=as_text))
    )
