"""Render throughput (rows/s): the HTML+CSS newsletter sample next to the plain-text welcome template.

Rendering only (no ledger, no transport), in one process, same run, same rows:

* ``welcome.txt``: the plain-text sample (text/plain, one part);
* ``newsletter.html``: the HTML sample with its linked stylesheet inlined once
  per template, a derived text part, multipart/mixed with a per-row PDF;
* the same newsletter with its stylesheet link removed (no CSS to inline);
* the same newsletter with CSS inlined per row (what inlining once avoids).

Run: ``python benchmarks/render_rich.py [--rows N] [--repeat R]``; prints the
best of R runs for each.
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import css_inline

from mergekit.bodies import CssPlan
from mergekit.render import Template, TemplateSource

ROOT = Path(__file__).resolve().parent.parent


def _rows(path: Path, count: int) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        base = list(csv.DictReader(file))
    return [base[i % len(base)] | {"email": f"r{i}.{base[i % len(base)]['email']}"} for i in range(count)]


def _measure(template: Template, rows: list[dict[str, str]], repeat: int) -> tuple[float, int]:
    best = 0.0
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        for number, row in enumerate(rows, start=1):
            message = template.render(row, row=number, key=row["email"])
        elapsed = time.perf_counter() - started
        best = max(best, len(rows) / elapsed)
        size = len(message.raw)
    return best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    assets = ROOT / "sample_data" / "newsletter"
    welcome = Template.from_path(ROOT / "templates" / "welcome.txt", campaign="bench")
    newsletter = Template.from_path(
        ROOT / "templates" / "newsletter.html", campaign="bench", attachments_dir=assets
    )
    assert newsletter.css is not None and not newsletter.css.per_row, "the sample should inline its CSS once"
    source = TemplateSource.read(ROOT / "templates" / "newsletter.html")
    no_css_text = source.text.replace('<link rel="stylesheet" href="newsletter.css">\n', "")
    no_css = Template(
        TemplateSource.parse(no_css_text, path=source.path), campaign="bench", attachments_dir=assets
    )
    assert no_css.css is None or no_css.css.inliner is None
    per_row = Template(source, campaign="bench", attachments_dir=assets)
    stylesheet = (assets / "newsletter.css").read_text(encoding="utf-8")
    # Same template compiled from the uninlined source, with the inliner run on every rendered row.
    per_row.css = CssPlan(
        no_css.css.source if no_css.css else "",
        True,
        css_inline.CSSInliner(load_remote_stylesheets=False, extra_css=stylesheet),
        "benchmark: forced",
    )
    per_row._html = no_css._html  # the uninlined body, compiled the same way
    _check_per_row(per_row)

    text_rows = _rows(ROOT / "sample_data" / "recipients.csv", args.rows)
    news_rows = _rows(ROOT / "sample_data" / "newsletter.csv", args.rows)
    print(
        f"python {platform.python_version()} on {platform.machine()}, {args.rows} rows, best of {args.repeat}"
    )
    results = [
        ("welcome.txt (plain text)", welcome, text_rows),
        ("newsletter.html, CSS inlined once per template", newsletter, news_rows),
        ("newsletter.html without its stylesheet (no inlining)", no_css, news_rows),
        ("newsletter.html, CSS inlined per row", per_row, news_rows),
    ]
    measured = {}
    for label, template, rows in results:
        rate, size = _measure(template, rows, args.repeat)
        measured[label] = rate
        print(f"{label:<55} {rate:>9,.0f} rows/s   ({size:,} bytes/message)")
    once = measured[results[1][0]]
    print(f"inlined once vs no CSS: {once / measured[results[2][0]]:.2f}x the throughput")
    print(f"inlined once vs per row: {once / measured[results[3][0]]:.2f}x the throughput")
    print(f"newsletter vs plain text: {once / measured[results[0][0]]:.2f}x the throughput")


def _check_per_row(template: Template) -> None:
    """Render one row to be sure the forced per-row template inlines like the once-inlined one."""
    row = _rows(ROOT / "sample_data" / "newsletter.csv", 1)[0]
    html = template.render(row, row=1, key=row["email"]).html or ""
    assert 'style="color: #1a4d8f;' in html, "per-row inlining did not apply the stylesheet"


if __name__ == "__main__":
    main()
