"""The substitution path (mergekit/substitution.py): what it accepts, and that it equals the Jinja render."""

from __future__ import annotations

import random
import re

import jinja2
import pytest
from jinja2.sandbox import SandboxedEnvironment

from mergekit.render import Template, TemplateSource
from mergekit.substitution import SubstitutionPlan, group_messages
from mergekit.transports.base import Message

PLAIN = """\
From: Ada <ada@example.com>
To: {{ name }} <{{ email }}>
Subject: Hi {{ name }}, {{ code }}

Dear {{ name }},
code {{code}} for {{ city }}{{ code }}.
{{ city }}
"""

ALPHABET = "ab <>&\"'%{}$\\\n\t-_.,;:éøß😀中" + "recipient."


def _plan(text: str) -> tuple[SubstitutionPlan | None, str]:
    return SubstitutionPlan.analyse(Template(TemplateSource.parse(text), campaign="c"))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("{% if x %}a{% endif %}", "body"),
        ("{{ x | upper }}", "body"),
        ("{{ x.y }}", "body"),
        ("{{ 'lit' }}", "body"),
        ("{{ x ~ y }}", "body"),
        ("{% for a in b %}{{ a }}{% endfor %}", "body"),
    ],
)
def test_anything_but_plain_variables_has_no_plan(body: str, why: str) -> None:
    plan, reason = _plan(f"From: a@example.com\nTo: b@example.com\nSubject: s\n\n{body}\n")
    assert plan is None and why in reason


def test_subject_with_a_filter_has_no_plan() -> None:
    plan, reason = _plan("From: a@example.com\nTo: b@example.com\nSubject: {{ s | title }}\n\nx\n")
    assert plan is None and "Subject" in reason


def test_plain_template_has_a_plan() -> None:
    plan, _ = _plan(PLAIN)
    assert plan is not None
    assert plan.body.names == ("name", "code", "city")


def _mailgun(text: str, values: dict[str, str], part: str, names: tuple[str, ...]) -> str:
    """Mailgun's substitution as documented: each %recipient.key% becomes the recipient's value."""
    return re.sub(r"%recipient\.([a-z])(\d+)%", lambda m: values[names[int(m.group(2))]], text)


def _sendgrid(text: str, substitutions: dict[str, str]) -> str:
    for tag, value in substitutions.items():
        text = text.replace(tag, value)
    return text


def test_substituted_text_equals_the_jinja_render_over_many_rows() -> None:
    """3,000 random rows: what the provider would build from tags + values is the render, exactly."""
    rng = random.Random(4)
    template = Template(TemplateSource.parse(PLAIN), campaign="c")
    plan, _ = SubstitutionPlan.analyse(template)
    assert plan is not None
    mailgun_body = plan.body.compile(lambda n: f"%recipient.t{plan.body.names.index(n)}%")
    mailgun_subject = plan.subject.compile(lambda n: f"%recipient.s{plan.subject.names.index(n)}%")
    sendgrid_body = plan.body.compile(lambda n: f"-n0nce{n}-")
    checked = fallbacks = 0
    for i in range(3000):

        def value(size: int) -> str:
            return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, size)))

        row = {
            "email": f"u{i}@example.org",
            "name": value(12).replace("\n", " ").replace("<", "").replace(">", "").replace('"', "")
            .replace(",", "").replace(";", "").replace(":", "").replace("\\", "").strip() or "x",
            "code": value(20),
            "city": value(30),
        }  # fmt: skip
        try:
            message = template.render(row, row=i + 1, key=row["email"])
        except Exception:
            continue  # a row the renderer refuses (e.g. a line break in a header) is never sent
        values = plan.values(message)
        if values is None:
            # Only a Subject whose edge whitespace the header parser stripped cannot be rebuilt.
            assert not plan.subject.extract(message.header("Subject")), row
            fallbacks += 1
            continue
        assert _mailgun(mailgun_body, values.text, "t", plan.body.names) == message.text
        assert _mailgun(mailgun_subject, values.subject, "s", plan.subject.names) == message.header("Subject")
        subs = {f"-n0nce{k}-": v for k, v in values.text.items()}
        if not any("n0nce" in v for v in subs.values()):
            assert _sendgrid(sendgrid_body, subs) == message.text
        checked += 1
    assert checked > 1500 and fallbacks < checked // 8  # random values: many end in whitespace


def test_html_values_are_what_autoescape_printed() -> None:
    """An HTML part rendered with autoescape: the html values are the escaped ones, text the raw ones."""
    body = "<p>Hello {{ name }}</p>\n<p>{{ note }}</p>\n"
    plan, _ = _plan(f"From: a@example.com\nTo: {{{{ email }}}}\nSubject: Hi {{{{ name }}}}\n\n{body}")
    assert plan is not None
    html_env = SandboxedEnvironment(
        autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    text_env = SandboxedEnvironment(
        autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    rng = random.Random(7)
    for i in range(500):
        row = {"name": "".join(rng.choice("<>&\"' aé") for _ in range(8)), "note": f"{i} < {i + 1} & 'q'"}
        html = html_env.from_string(body).render(row)
        text = text_env.from_string(body).render(row)
        message = Message(
            row=i, key=str(i), message_id=f"<{i}@x>", envelope_from="a@example.com",
            envelope_to=("b@example.com",), headers=(("Subject", f"Hi {row['name']}".strip()),),
            text=text, html=html, raw=b"",
        )  # fmt: skip
        values = plan.values(message)
        assert values is not None
        assert values.html["name"] == str(jinja2.utils.markupsafe.escape(row["name"]))
        assert values.text["name"] == row["name"]
        assert plan.body.rebuild(values.html) == html
        assert plan.body.rebuild(values.text) == text


def test_a_message_not_made_by_the_plan_is_left_alone() -> None:
    plan, _ = _plan(PLAIN)
    assert plan is not None
    template = Template(TemplateSource.parse(PLAIN), campaign="c")
    message = template.render(
        {"email": "a@example.org", "name": "A", "code": "1", "city": "X"}, row=1, key="k"
    )
    forged = Message(**{**{f: getattr(message, f) for f in message.__slots__}, "text": "something else\n"})
    assert plan.values(forged) is None
    grouping = group_messages(plan, [message, forged, message], max_size=1000, unsafe=lambda v: False)
    # The forged one goes alone; the same address twice is never in one group.
    assert grouping.singles == [0, 1, 2] and grouping.groups == []
