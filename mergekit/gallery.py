"""The preview gallery: a static site a marketer opens from disk before pressing send.

``write_gallery`` turns :func:`mergekit.campaign.preview` items into
``index.html`` (every previewed row: recipient, subject, state, and the reason
for rows that will not be sent) and one ``message-NNNNNN.html`` per rendered
message (headers, the HTML part, the text part, the attachments by name and
size). Plain files, relative links, no script and no server: the HTML part is
shown in an ``<iframe sandbox srcdoc=…>``, so whatever it contains cannot run
script or reach the gallery page.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .campaign import PreviewItem

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222;
       padding: 0 1rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #ddd; vertical-align: top; }
.state { font-weight: 600; }
.state-pending { color: #176f2c; } .state-invalid { color: #b00020; }
.state-duplicate, .state-suppressed { color: #8a6d00; }
iframe { width: 100%; height: 32rem; border: 1px solid #bbb; background: #fff; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 1rem; border: 1px solid #ddd; }
.headers th { width: 12rem; color: #555; font-weight: 500; }
"""


def page_name(row: int) -> str:
    """The file name of the page for data row ``row``."""
    return f"message-{row:06d}.html"


def write_gallery(items: Sequence[PreviewItem], folder: str | Path, *, title: str) -> Path:
    """Write the gallery for ``items`` into ``folder`` (created if needed); return the index path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in items:
        message = item.message
        state = "pending" if message is not None else item.state
        label = "ready to send" if message is not None else state
        subject = escape(message.header("Subject")) if message is not None else ""
        to = escape(message.header("To")) if message is not None else ""
        if message is not None:
            link = f'<a href="{page_name(item.row)}">{subject or "(no subject)"}</a>'
            (out / page_name(item.row)).write_text(_message_page(item, title), encoding="utf-8")
        else:
            link = ""
        reason = "" if message is not None else escape(item.reason.partition(": ")[2] or item.reason)
        rows.append(
            f'<tr class="row" data-row="{item.row}"><td>{item.row}</td><td>{escape(item.key)}</td>'
            f"<td>{to}</td><td>{link}</td>"
            f'<td class="state state-{escape(state)}">{escape(label)}</td>'
            f'<td class="reason">{reason}</td></tr>'
        )
    ready = sum(item.message is not None for item in items)
    index = out / "index.html"
    index.write_text(
        _page(
            f"Preview: {title}",
            f"<h1>Preview: {escape(title)}</h1>"
            f"<p>{len(items)} rows previewed, {ready} ready to send, {len(items) - ready} not sendable.</p>"
            "<table><thead><tr><th>Row</th><th>Recipient key</th><th>To</th><th>Subject</th>"
            "<th>State</th><th>Reason</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
        ),
        encoding="utf-8",
    )
    return index


def _message_page(item: PreviewItem, title: str) -> str:
    message = item.message
    assert message is not None
    headers = [*message.headers, ("Message-ID", message.message_id)]
    header_rows = "".join(
        f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in headers
    )
    parts = [
        '<p><a href="index.html" id="back">&larr; all messages</a></p>',
        f'<h1 id="subject">{escape(message.header("Subject"))}</h1>',
        f'<table class="headers">{header_rows}</table>',
    ]
    if message.html is not None:
        # sandbox with no permissions: no script, no forms, no same-origin access.
        parts.append(
            '<h2>HTML part</h2><iframe id="html-part" sandbox="" referrerpolicy="no-referrer" '
            f'title="HTML part" srcdoc="{escape(message.html, quote=True)}"></iframe>'
        )
    parts.append(f'<h2>Text part</h2><pre id="text-part">{escape(message.text or "")}</pre>')
    if message.attachments:
        listed = "".join(
            f"<tr><td>{escape(a.filename)}</td><td>{escape(a.content_type)}</td>"
            f"<td>{_size(len(a.content))}</td></tr>"
            for a in message.attachments
        )
        parts.append(
            '<h2>Attachments</h2><table id="attachments"><thead><tr><th>Name</th><th>Type</th>'
            f"<th>Size</th></tr></thead><tbody>{listed}</tbody></table>"
        )
    else:
        parts.append("<h2>Attachments</h2><p>None.</p>")
    parts.append(
        f"<p>Row {item.row}, recipient key {escape(item.key)}, {len(message.raw):,} bytes on the wire.</p>"
    )
    return _page(f"{message.header('Subject')} - {title}", "".join(parts))


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB ({count:,} bytes)"
    return f"{count / 1024 / 1024:.1f} MiB ({count:,} bytes)"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )
