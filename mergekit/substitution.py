"""Plain-substitution templates: one shared body, per-recipient values (issue 4).

SendGrid and Mailgun take no per-message body in a batch; their bulk form is
one body with per-recipient substitution variables (SendGrid ``substitutions``,
Mailgun ``%recipient.key%``). When a template's body and Subject are literal
text and plain ``{{ variable }}`` outputs only (no tags, filters, attributes,
tests or expressions), :class:`SubstitutionPlan` compiles them to the
provider's syntax and finds, for each rendered message, the values to send.

The values are not recomputed from the row: they are read back from the
message Jinja rendered, by matching it against the template (each variable a
group, a repeated variable a back-reference), and the plan then rebuilds the
text from those values and checks it equals the render, character for
character. So the value sent for an HTML part is exactly what Jinja printed
there (HTML-escaped under autoescape) and the value for a text part exactly
what it printed there, and whatever the provider substitutes is, by
construction, the Jinja render. A message for which this cannot hold (a part
the template does not produce by substitution, a value that contains the
provider's own syntax, a Subject rendered by a tag) is not given values, and
the transport sends it on its own, as without the plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

from .transports.base import Message


@dataclass(frozen=True)
class Slot:
    """A ``{{ name }}`` output in a template part."""

    name: str


Segment = str | Slot


class PartPattern:
    """One template part (Subject or body) as literal text and slots.

    :meth:`extract` reads the slot values back from a rendered part;
    :meth:`compile` writes the part in a provider's substitution syntax.
    """

    def __init__(self, segments: list[Segment]) -> None:
        merged: list[Segment] = []
        for segment in segments:
            if isinstance(segment, str) and merged and isinstance(merged[-1], str):
                merged[-1] += segment
            elif segment != "":
                merged.append(segment)
        self.segments = tuple(merged)
        self.names = tuple(dict.fromkeys(s.name for s in self.segments if isinstance(s, Slot)))
        self.literals = tuple(s for s in self.segments if isinstance(s, str))
        groups = {name: f"g{i}" for i, name in enumerate(self.names)}
        seen: set[str] = set()
        pattern = []
        for segment in self.segments:
            if isinstance(segment, str):
                pattern.append(re.escape(segment))
            elif segment.name in seen:
                pattern.append(f"(?P={groups[segment.name]})")
            else:
                seen.add(segment.name)
                pattern.append(f"(?P<{groups[segment.name]}>.*?)")
        self._regex = re.compile("".join(pattern), re.DOTALL)
        self._groups = groups

    def extract(self, rendered: str) -> dict[str, str] | None:
        """The values that rebuild ``rendered`` exactly, or None if no values can."""
        # Cheap necessary check first: every literal appears, in order.
        position = 0
        for literal in self.literals:
            found = rendered.find(literal, position)
            if found < 0:
                return None
            position = found + len(literal)
        match = self._regex.fullmatch(rendered)
        if match is None:
            return None
        values = {name: match.group(group) for name, group in self._groups.items()}
        return values if self.rebuild(values) == rendered else None

    def rebuild(self, values: Mapping[str, str]) -> str:
        return "".join(s if isinstance(s, str) else values[s.name] for s in self.segments)

    def compile(self, tag: Callable[[str], str]) -> str:
        """The part with each slot written as ``tag(name)``."""
        return "".join(s if isinstance(s, str) else tag(s.name) for s in self.segments)

    def text(self) -> str:
        """All literal text, to check a provider's syntax does not occur in it."""
        return "".join(self.literals)


def plain_segments(source: str) -> list[Segment] | None:
    """``source`` as literal text and slots, or None if it uses anything but ``{{ name }}``."""
    env = SandboxedEnvironment(keep_trailing_newline=True)
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError:
        return None
    segments: list[Segment] = []
    for node in tree.body:
        if not isinstance(node, nodes.Output):
            return None  # {% if %}, {% for %}, {% set %}, macros...
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                segments.append(child.data)
            elif isinstance(child, nodes.Name) and child.ctx == "load":
                segments.append(Slot(child.name))
            else:
                return None  # filters, attributes, literals, expressions
    return segments


@dataclass(frozen=True)
class MessageValues:
    """One message's substitution values per part: ``subject``, ``text``, ``html``."""

    subject: dict[str, str]
    text: dict[str, str]
    html: dict[str, str]

    def all_values(self) -> list[str]:
        return [*self.subject.values(), *self.text.values(), *self.html.values()]


class SubstitutionPlan:
    """A template whose Subject and body are plain substitutions; see the module docstring."""

    def __init__(self, subject: PartPattern, body: PartPattern) -> None:
        self.subject = subject
        self.body = body

    @classmethod
    def analyse(cls, template: Any) -> tuple[SubstitutionPlan | None, str]:
        """A plan for a :class:`mergekit.render.Template`, or None and the reason there is none."""
        source = getattr(template, "source", None)
        header_source = getattr(source, "header_source", None)
        body_source = getattr(source, "body_source", None)
        if not isinstance(header_source, str) or not isinstance(body_source, str):
            return None, "template has no header block and body source"
        kind = getattr(getattr(template, "kind", None), "kind", "text/plain")
        if kind != "text/plain":
            # HTML, Markdown and multipart bodies derive one part from the other (html_to_text,
            # markdown_to_html): neither is a plain substitution of one source.
            return None, f"the body is {kind}, not text/plain"
        if "{%" in header_source:
            return None, "the header block uses Jinja tags"
        lines = header_source.split("\n")
        found = [i for i, line in enumerate(lines) if line.partition(":")[0].strip().lower() == "subject"]
        if len(found) != 1:
            return None, "the template has no single Subject: line"
        index = found[0]
        if index + 1 < len(lines) and lines[index + 1][:1] in {" ", "\t"}:
            return None, "the Subject: line is folded"
        subject = plain_segments(lines[index].partition(":")[2].strip())
        if subject is None:
            return None, "the Subject uses more than plain {{ variable }} substitutions"
        body = plain_segments(body_source)
        if body is None:
            return None, "the body uses more than plain {{ variable }} substitutions"
        return cls(PartPattern(subject), PartPattern(body)), "plain substitutions only"

    def values(self, message: Message) -> MessageValues | None:
        """The values that make the plan's parts equal this message's, or None if none do."""
        subject = self.subject.extract(message.header("Subject"))
        if subject is None or message.text is None:
            return None
        text = self.body.extract(message.text)
        if text is None:
            return None
        html: dict[str, str] = {}
        if message.html is not None:
            found = self.body.extract(message.html)
            if found is None:
                return None
            html = found
        return MessageValues(subject, text, html)


@dataclass
class Grouping:
    """A batch split into groups that share one body, and messages to send on their own."""

    groups: list[list[tuple[int, MessageValues]]]
    singles: list[int]


def shared_key(message: Message, *, per_recipient_headers: bool = False) -> tuple[Any, ...] | None:
    """What messages must have in common to share one request body; None if it cannot share.

    A shared request has one From, Reply-To, set of custom headers (unless the
    provider takes headers per recipient: ``per_recipient_headers``) and part
    structure, and one recipient per message (To only: a Cc or Bcc would be
    copied to every recipient of the batch); attachments go on their own.
    """
    from .transports.http import custom_headers, recipients  # the transports package imports us lazily

    people = recipients(message)
    if len(people.to) != 1 or people.cc or people.bcc or message.attachments:
        return None
    return (
        message.header("From"),
        tuple(people.reply_to),
        () if per_recipient_headers else tuple(custom_headers(message, message_id=False)),
        message.text is None,
        message.html is None,
    )


def group_messages(
    plan: SubstitutionPlan,
    messages: list[Message] | tuple[Message, ...] | Any,
    *,
    max_size: int,
    unsafe: Callable[[str], bool],
    fits: Callable[[MessageValues], bool] = lambda _: True,
    per_recipient_headers: bool = False,
) -> Grouping:
    """Group ``messages`` for the plan; ``unsafe(value)`` and ``not fits(values)`` send one alone.

    A recipient address appears at most once in a group (providers key the
    values by address, or refuse a repeated one).
    """
    singles: list[int] = []
    by_key: dict[tuple[Any, ...], list[tuple[list[tuple[int, MessageValues]], set[str]]]] = {}
    for index, message in enumerate(messages):
        key = shared_key(message, per_recipient_headers=per_recipient_headers)
        values = plan.values(message) if key is not None else None
        if key is None or values is None or not fits(values) or any(unsafe(v) for v in values.all_values()):
            singles.append(index)
            continue
        address = message.envelope_to[0].lower()
        chunks = by_key.setdefault(key, [])
        for chunk, addresses in chunks:
            if len(chunk) < max_size and address not in addresses:
                chunk.append((index, values))
                addresses.add(address)
                break
        else:
            chunks.append(([(index, values)], {address}))
    groups = []
    for chunks in by_key.values():
        for chunk, _ in chunks:
            if len(chunk) > 1:
                groups.append(chunk)
            else:
                singles.extend(index for index, _ in chunk)
    return Grouping(groups, sorted(singles))
