"""Templates as hostile input (issue 13, item 8): the sandbox holds, and a row that runs away is
that row's ``invalid``, within the bounds of :mod:`mergekit.sandbox`, while the campaign goes on.

A campaign is sent through ``mergekit send`` into a Maildir; each row's ``attack``
column picks one branch of the template. The verdict is ``report --state invalid``
(every attack row ``invalid`` with its reason) and the Maildir (the other rows
delivered, nothing leaked into them).
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
from pathlib import Path

import pytest
from jinja2.sandbox import SandboxedEnvironment

from mergekit.render import Template, TemplateSource
from mergekit.sandbox import MAX_CPU_SECONDS
from mergekit.workers import Renderer
from tests.conftest import run_cli

# Attribute escapes Jinja's sandbox must refuse (reason: "unsafe", or the name is undefined).
ESCAPES = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler": "{{ cycler.__init__.__globals__ }}",
    "joiner": "{{ joiner.__init__.__globals__ }}",
    "namespace": "{{ namespace.__init__.__globals__ }}",
    "lipsum": "{{ lipsum.__globals__ }}",
    "range": "{{ range.__self__ }}",
    "format": "{{ '{0.__class__.__mro__}'.format(name) }}",
    "format_map": "{{ '{x.__class__}'.format_map({'x': name}) }}",
    "format filter": "{{ '%s'|format(name.__class__) }}",
    "attr filter": "{{ name|attr('__class__') }}",
    "attr format": "{{ ('{0.__class__.__mro__}'|attr('format'))(name) }}",
    "template reference": "{{ self._TemplateReference__context }}",
    "loop": "{% for i in [1] %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    "macro": "{% macro m() %}{% endmacro %}{{ m.__globals__ }}",
    "type mro": "{{ dict.mro() }}",
    "generator frame": "{{ (range(2)|map('string')).gi_frame.f_globals }}",
}
ESCAPE_REASONS = ("unsafe", "is undefined", "has no attribute")

# Rows that run away: the expression, and what the reason must say.
RUNAWAYS = {
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        f"more than {MAX_CPU_SECONDS:g} s of CPU",
    ),
    "nested output": (
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "the output passed 10,000,000 characters",
    ),
    "buffered output": (
        "{% filter upper %}{% for i in range(100000) %}{% for j in range(100000) %}x"
        "{% endfor %}{% endfor %}{% endfilter %}",
        "a block's output passed",
    ),
    "recursion": ("{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}", "recursion too deep"),
    "string times 10**8": ("{{ 'x' * 100000000 }}", "a repetition to 100,000,000"),
    "value times 10**8": ("{{ name * 100000000 }}", "a repetition to"),
    "list times 10**8": ("{{ ([1] * 100000000)|length }}", "a repetition to"),
    "center filter": ("{{ 'x'|center(10**8) }}", "filter center"),
    "center method": ("{{ 'x'.center(10**8) }}", "a width of 100,000,000"),
    "format width": ("{{ '{:>100000000}'.format(1) }}", "a format width"),
    "printf width": ("{{ '%100000000d' % 1 }}", "a format width"),
    "format filter width": ("{{ '%*d'|format(100000000, 1) }}", "a format width"),
    "power": ("{{ (10 ** 100000000) > 1 }}", "an integer of more than"),
    "namespace doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "a value of 16,777,216 characters",
    ),
    "macro doubling": (
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}"
        "{% endmacro %}{{ d('x', 40) }}",
        "a value of",
    ),
    "list doubling": (
        "{% set l = [1] %}{% for i in range(40) %}{{ l.extend(l) or '' }}{% endfor %}",
        "a collection of",
    ),
    "join": ("{{ range(100000)|join('x' * 1000000) }}", "a join to"),
    "replace": ("{{ ('x' * 1000000)|replace('x', 'yyyyyyyyyyyyyyyyyyyyy') }}", "a replacement"),
    "batch fill": ("{{ [1]|batch(100000000, 'x')|list|length }}", "filter batch"),
    "expandtabs": ("{{ ('\t' * 1000000).expandtabs(1000) }}", "a repetition to"),
    "indent": ("{{ ('a\n' * 1000000)|indent('xxxxxxxxxxxxxxxxxxxxx') }}", "filter indent"),
    "range 10**9": ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
}


def campaign(tmp_path: Path, attacks: dict[str, str]) -> None:
    """people.csv with one row per attack and two harmless rows; t.txt with a branch per attack."""
    branches = "".join(
        f"{{% {'if' if i == 0 else 'elif'} attack == {name!r} %}}{expression}"
        for i, (name, expression) in enumerate(attacks.items())
    )
    body = f"{branches}{{% endif %}}Hello {{{{ name }}}}\n"
    headers = "From: Ada <ada@example.com>\nTo: {{ email }}\nSubject: Hi\n"
    (tmp_path / "t.txt").write_text(f"{headers}\n{body}")
    with (tmp_path / "people.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "name", "attack"])
        writer.writerow(["first@example.org", "First", "none"])
        for i, name in enumerate(attacks):
            writer.writerow([f"row{i}@example.org", f"Row {i}", name])
        writer.writerow(["last@example.org", "Last", "none"])


def run(tmp_path: Path, attacks: dict[str, str]) -> tuple[dict[str, str], list[str], float]:
    """Send the campaign: each attack's reason, the delivered messages, and the run's seconds."""
    campaign(tmp_path, attacks)
    started = time.monotonic()
    result = run_cli("send", "people.csv", "t.txt", "--transport", "maildir://out", "--json", cwd=tmp_path)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr  # done, with invalid rows
    assert "Traceback" not in result.stderr
    report = run_cli("report", "--state", "invalid", "--format", "json", cwd=tmp_path)
    names = list(attacks)
    reasons = {names[row["row"] - 2]: row["last_text"] for row in json.loads(report.stdout)}
    messages = [path.read_text() for path in (tmp_path / "out" / "new").iterdir()]
    return reasons, messages, took


def test_attribute_escapes_are_refused_and_the_campaign_goes_on(tmp_path: Path) -> None:
    reasons, messages, _ = run(tmp_path, ESCAPES)
    assert set(reasons) == set(ESCAPES)
    for name, reason in reasons.items():
        assert any(word in reason for word in ESCAPE_REASONS), (name, reason)
    assert len(messages) == 2 and all("Hello " in text for text in messages)
    leaked = ("<class", "subclasses", "__globals__", "<function", "<module", "Context")
    assert not any(word in text for word in leaked for text in messages)


def test_runaway_rows_are_invalid_within_the_bounds_and_the_campaign_goes_on(tmp_path: Path) -> None:
    attacks = {name: expression for name, (expression, _) in RUNAWAYS.items()}
    reasons, messages, took = run(tmp_path, attacks)
    for name, (_, expected) in RUNAWAYS.items():
        assert expected in reasons.get(name, "(sent)"), (name, reasons.get(name))
    assert len(messages) == 2 and all(len(text) < 2000 for text in messages)
    assert took < 60, took  # a few rows at the CPU bound each, on a loaded machine


def test_a_row_stopped_in_a_render_worker_leaves_the_worker_rendering(tmp_path: Path) -> None:
    """The render processes of a large run apply the same CPU bound, and go on with the next rows."""
    expression = RUNAWAYS["nested loops"][0]
    source = "From: a@example.com\nTo: {{ email }}\nSubject: Hi\n\n"
    source += f"{{% if attack %}}{expression}{{% endif %}}Hello {{{{ name }}}}\n"
    template = Template(TemplateSource.parse(source, path="t.txt"), campaign="c")
    rows = [
        (i, f"r{i}@example.org", {"email": f"r{i}@example.org", "name": "N", "attack": attack})
        for i, attack in ((1, ""), (2, "yes"), (3, ""))
    ]

    async def render_in_a_worker() -> tuple[list[object], bool, float]:
        renderer = Renderer(template, 1)
        await renderer.start()
        try:
            started = time.monotonic()
            found = await renderer.render(rows)
            return list(found), renderer._pool is not None, time.monotonic() - started
        finally:
            renderer.close()

    found, in_worker, took = asyncio.run(render_in_a_worker())
    assert in_worker  # the worker survived the stopped row
    assert isinstance(found[1], str) and f"more than {MAX_CPU_SECONDS:g} s of CPU" in found[1]
    assert [getattr(item, "row", None) for item in found] == [1, None, 3]
    assert took < 30, took


@pytest.mark.parametrize(
    "expression",
    [
        "{{ name|center(9) }}|{{ ['a', 'b']|join(', ') }}|{{ 'x' * 3 }}|{{ name.replace('o', '0') }}",
        "{{ '%05.1f'|format(3.14159) }}|{{ '{:>6}'.format(name) }}|{{ '%d' % 123456789012 }}",
        "{% set ns = namespace(n=0) %}{% for i in range(10) %}{% set ns.n = ns.n + i %}{% endfor %}"
        "{{ ns.n }}",
        "{% macro m(x) %}[{{ x }}]{% endmacro %}{{ m(name) }}|{{ 123456789012|filesizeformat }}",
        "{{ missing|default(99999999999) }}|{{ ('a\nb')|indent(2) }}|{{ 2 ** 64 }}",
    ],
)
def test_ordinary_templates_render_as_before(expression: str) -> None:
    """The bounds leave everyday filters, methods and operators alone: as Jinja's own sandbox renders."""
    source = f"From: a@example.com\nTo: b@example.org\nSubject: Hi\n\n{expression}\n"
    message = Template(TemplateSource.parse(source, path="t.txt"), campaign="c").render(
        {"name": "Jo"}, row=1, key="b@example.org"
    )
    expected = SandboxedEnvironment().from_string(expression).render(name="Jo")
    assert message.text == expected + "\n"
