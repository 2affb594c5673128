"""Body kinds: plain text, HTML and Markdown, and what turns one into the other.

A template's body kind comes from its ``Content-Type:`` header (``text/plain``,
``text/html``, ``text/markdown``, or mailmerge's ``multipart/alternative`` with
the parts written out) or else from the file extension (``.txt``, ``.html``,
``.htm``, ``.md``, ``.markdown``). It is decided once, from the template's
source, because it decides how the body compiles: HTML parts are autoescaped.

CSS inlining (css-inline) runs once per template on the body *source*: every
Jinja construct is first swapped for an HTML comment placeholder
(``<!--mk:N-->``, which an HTML parser keeps in place even between table rows),
the ``<style>`` blocks and linked local stylesheets are inlined into ``style=``
attributes, and the placeholders are swapped back. When the round trip cannot
be trusted (Jinja inside ``<style>``, inside a tag's name or attribute list, or
in a stylesheet link), the template falls back to inlining each rendered row,
which is correct but slower; :attr:`CssPlan.per_row` says which was chosen.

The text part of an HTML message is derived from the rendered HTML by
:func:`html_to_text`: block elements become paragraphs and lines, list items
``- ``, links ``text (url)``, images their alt text; ``<style>``, ``<script>``
and ``<head>`` are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import css_inline
from markdown_it import MarkdownIt

from .errors import TemplateError

TEXT, HTML, MARKDOWN, ALTERNATIVE = "text/plain", "text/html", "text/markdown", "multipart/alternative"
KINDS = (TEXT, HTML, MARKDOWN, ALTERNATIVE)
EXTENSION_KINDS = {".txt": TEXT, ".html": HTML, ".htm": HTML, ".md": MARKDOWN, ".markdown": MARKDOWN}

_CONTENT_TYPE_LINE = re.compile(r"^content-type[ \t]*:[ \t]*(.*)$", re.I | re.M)
_BOUNDARY_PARAM = re.compile(r"""boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))""", re.I)
# Jinja's default delimiters: statements, expressions, comments (the sandboxed
# environment keeps the defaults, so these are the only ones to protect).
_JINJA = re.compile(r"\{%.*?%\}|\{\{.*?\}\}|\{#.*?#\}", re.S)
_PLACEHOLDER = re.compile(r"<!--mk:(\d+)-->|&lt;!--mk:(\d+)--&gt;")
_STYLESHEET_LINK = re.compile(r"<link\b[^>]*>", re.I)
_ATTRIBUTE = re.compile(r"""([a-zA-Z-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""")
_STYLE_BLOCK = re.compile(r"<style\b[^>]*>(.*?)</style>", re.I | re.S)


@dataclass(frozen=True)
class BodyKind:
    """The body's kind and, for mailmerge's multipart templates, the boundary."""

    kind: str
    boundary: str | None = None


def detect_kind(header_source: str, path: str) -> BodyKind:
    """The kind named by the template's own ``Content-Type:`` line, else by its extension.

    :raises TemplateError: the Content-Type names something mergekit cannot build,
        or is itself a Jinja expression (the kind must be known before rendering).
    """
    found = _CONTENT_TYPE_LINE.search(header_source)
    if found:
        value = found.group(1).strip()
        if "{{" in value or "{%" in value:
            raise TemplateError(
                "the Content-Type header cannot be computed per row",
                path=path,
                hint="Write text/plain, text/html or text/markdown literally",
            )
        media = value.split(";", 1)[0].strip().lower()
        if media not in KINDS:
            raise TemplateError(
                f"unsupported Content-Type {media!r}",
                path=path,
                hint=f"Use one of {', '.join(KINDS)}, or leave it out and name the file .txt, .html or .md",
            )
        if media == ALTERNATIVE:
            boundary = _BOUNDARY_PARAM.search(value)
            if not boundary:
                raise TemplateError(
                    'Content-Type: multipart/alternative needs a boundary="..." parameter',
                    path=path,
                    hint='Write e.g. Content-Type: multipart/alternative; boundary="boundary"',
                )
            return BodyKind(ALTERNATIVE, boundary.group(1) or boundary.group(2))
        return BodyKind(media)
    return BodyKind(EXTENSION_KINDS.get(Path(path).suffix.lower(), TEXT))


@dataclass(frozen=True)
class SourcePart:
    """One part of a multipart template: its kind and its Jinja source."""

    kind: str
    source: str
    first_line: int


def split_alternative(body: str, boundary: str, *, path: str, first_line: int) -> list[SourcePart]:
    """Split mailmerge's written-out ``multipart/alternative`` body into its parts.

    The preamble before the first ``--boundary`` line is dropped, as is anything
    after ``--boundary--`` (mailmerge's example omits the closing line: allowed).
    Each part is a header block (``Content-Type:``), a blank line and its body.
    """
    delimiter = f"--{boundary}"
    parts: list[SourcePart] = []
    current: list[str] | None = None
    start = first_line
    for number, line in enumerate(body.split("\n"), start=first_line):
        stripped = line.rstrip()
        if stripped in (delimiter, delimiter + "--"):
            if current is not None:
                parts.append(_source_part(current, start, path))
            current = None if stripped.endswith("--") and stripped != delimiter else []
            start = number + 1
            if current is None:
                break
        elif current is not None:
            current.append(line)
    if current is not None:
        parts.append(_source_part(current, start, path))
    kinds = [part.kind for part in parts]
    if not parts or len(set(kinds)) != len(kinds) or not set(kinds) <= {TEXT, HTML, MARKDOWN}:
        raise TemplateError(
            f"a multipart/alternative template needs one text/plain and one text/html part, "
            f"each after a --{boundary} line; found {kinds or 'none'}",
            path=path,
            line=first_line,
        )
    return parts


def _source_part(lines: list[str], start: int, path: str) -> SourcePart:
    text = "\n".join(lines)
    header, sep, body = text.partition("\n\n")
    if not sep:
        header, body = text, ""
    kind = TEXT  # RFC 2045 5.2: a part without Content-Type is text/plain
    for line in header.split("\n"):
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "content-type":
            kind = value.split(";", 1)[0].strip().lower()
    if kind not in (TEXT, HTML, MARKDOWN):
        raise TemplateError(f"unsupported part Content-Type {kind!r}", path=path, line=start)
    return SourcePart(kind, body, start + header.count("\n") + 2)


# -- Markdown -----------------------------------------------------------------

# CommonMark with tables and strikethrough. Raw HTML in Markdown is not passed
# through (html=False): a row value such as "<script>" arrives as text. Write
# an .html template for hand-made HTML.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable(
    ["table", "strikethrough"]
)


def markdown_to_html(text: str) -> str:
    """A complete HTML document for the Markdown ``text``."""
    return f"<!DOCTYPE html>\n<html><body>\n{_MARKDOWN.render(text)}</body></html>\n"


# -- CSS inlining ---------------------------------------------------------------


@dataclass(frozen=True)
class CssPlan:
    """How a template's HTML gets its CSS inlined.

    ``source`` is the body source to compile (already inlined when ``per_row``
    is False); ``inliner`` is used per rendered row when ``per_row`` is True,
    and is None when the template has no CSS at all.
    """

    source: str
    per_row: bool
    inliner: css_inline.CSSInliner | None
    reason: str = ""


def plan_css(source: str, *, folder: Path, path: str) -> CssPlan:
    """Inline the template's CSS once if that is safe, else prepare per-row inlining.

    Linked stylesheets must be local files inside ``folder`` (the template's, or
    ``--attachments-dir``); remote
    ones are left alone (no network access while rendering) and keep their link.

    :raises TemplateError: a linked local stylesheet is missing or outside the folder.
    """
    has_style = _STYLE_BLOCK.search(source) is not None
    links = [m for m in _STYLESHEET_LINK.finditer(source) if _is_stylesheet(m.group(0))]
    if not has_style and not links:
        return CssPlan(source, False, None)
    extra_css: list[str] = []
    dynamic = ""
    for link in links:
        href = _attributes(link.group(0)).get("href", "")
        if _JINJA.search(href):
            dynamic = "a stylesheet link is computed per row"
            continue
        if re.match(r"[a-z][a-z0-9+.-]*:|//", href, re.I):
            continue  # remote: not fetched, not inlined
        extra_css.append(_read_stylesheet(href, folder=folder, path=path))
    local_links = [
        link.group(0) for link in links if not _is_remote(_attributes(link.group(0)).get("href", ""))
    ]
    for local_link in local_links:
        source = source.replace(local_link, "", 1)
    inliner = css_inline.CSSInliner(
        load_remote_stylesheets=False,
        keep_link_tags=True,  # remote stylesheets stay linked; local ones were removed above
        extra_css="\n".join(extra_css) or None,
    )
    if dynamic:
        return CssPlan(source, True, inliner, dynamic)
    if any(_JINJA.search(block) for block in _STYLE_BLOCK.findall(source)):
        return CssPlan(source, True, inliner, "a <style> block contains Jinja")
    constructs: list[str] = []

    def protect(match: re.Match[str]) -> str:
        constructs.append(match.group(0))
        return f"<!--mk:{len(constructs) - 1}-->"

    protected = _JINJA.sub(protect, source)
    try:
        inlined = inliner.inline(protected)
    except ValueError as err:
        raise TemplateError(f"cannot inline the CSS: {err}", path=path) from err
    seen: list[int] = []

    def restore(match: re.Match[str]) -> str:
        index = int(match.group(1) or match.group(2))
        seen.append(index)
        return constructs[index] if index < len(constructs) else match.group(0)

    restored = _PLACEHOLDER.sub(restore, inlined)
    if seen != list(range(len(constructs))):
        # The parser moved or mangled a Jinja construct (e.g. one inside a tag):
        # inlining the template source would change what it renders.
        return CssPlan(source, True, inliner, "Jinja inside a tag or in an unusual place")
    return CssPlan(restored, False, None)


def _is_stylesheet(tag: str) -> bool:
    return "stylesheet" in _attributes(tag).get("rel", "").lower().split()


def _is_remote(href: str) -> bool:
    return bool(re.match(r"[a-z][a-z0-9+.-]*:|//", href, re.I)) or bool(_JINJA.search(href))


def _attributes(tag: str) -> dict[str, str]:
    return {
        m.group(1).lower(): next(v for v in m.group(2, 3, 4) if v is not None)
        for m in _ATTRIBUTE.finditer(tag)
    }


def _read_stylesheet(href: str, *, folder: Path, path: str) -> str:
    base = folder.resolve()
    target = (base / href.split("?", 1)[0].split("#", 1)[0]).resolve()
    if not target.is_relative_to(base):
        raise TemplateError(
            f"stylesheet {href!r} is outside the folder {base}",
            path=path,
            hint="Keep linked stylesheets in the template's folder, or the folder --attachments-dir names",
        )
    try:
        return target.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise TemplateError(
            f"cannot read stylesheet {href!r} ({target})",
            path=path,
            hint="Link a UTF-8 .css file in the template's folder, or pass --attachments-dir with its folder",
        ) from err


# -- HTML to text ---------------------------------------------------------------

_BLOCKS = frozenset(
    {
        "p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "table",
        "tr", "blockquote", "pre", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5",
        "h6", "hr", "address", "figure", "figcaption", "center", "form",
    }
)  # fmt: skip
_SKIPPED = frozenset({"style", "script", "head", "title", "template", "noscript"})
_SPACES = re.compile(r"[ \t\r\n\f\v]+")


class _TextExtractor:
    """Turns a stream of tags and text into readable plain text (see :func:`html_to_text`)."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.pre = 0
        self.links: list[tuple[str, int]] = []
        self.lists: list[list[int]] = []  # per open list: [is_ordered, counter]

    def _break(self, count: int = 1) -> None:
        """End the current line, leaving at least ``count`` line breaks (none at the very start)."""
        out = self.out
        newlines = 0
        while out:
            last = out[-1]
            kept = last.rstrip(" \n")
            newlines += last.count("\n", len(kept))
            if kept:
                out[-1] = kept
                break
            out.pop()
        if out:
            out.append("\n" * max(count, min(newlines, 2)))

    def _ends_with(self, suffixes: tuple[str, ...]) -> bool:
        return bool(self.out) and self.out[-1].endswith(suffixes)

    def start(self, tag: str, attributes: str) -> None:
        if tag == "br":
            self.out.append("\n")
        elif tag in ("ul", "ol"):
            self._break(1 if self.lists else 2)
            self.lists.append([tag == "ol", 0])
        elif tag == "li":
            self._break(1)
            depth = max(len(self.lists) - 1, 0)
            if self.lists and self.lists[-1][0]:
                self.lists[-1][1] += 1
                self.out.append("   " * depth + f"{self.lists[-1][1]}. ")
            else:
                self.out.append("   " * depth + "- ")
        elif tag in ("td", "th"):
            if self.out and not self._ends_with(("\n", " ")):
                self.out.append("  ")
        elif tag in _BLOCKS:
            self._break(1 if tag in ("tr", "dt", "dd") else 2)
            if tag == "pre":
                self.pre += 1
            elif tag == "hr":
                self.out.append("-" * 20)
                self._break(2)
        elif tag == "a":
            self.links.append((unescape(_attributes(attributes).get("href", "")), len(self.out)))
        elif tag == "img":
            alt = unescape(_attributes(attributes).get("alt", ""))
            if alt:
                self.out.append(alt)

    def end(self, tag: str) -> None:
        if tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._break(1 if self.lists else 2)
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            label = "".join(self.out[start:]).strip()
            if href and not href.startswith("#") and href != label and href.removeprefix("mailto:") != label:
                self.out.append(f" ({href})" if label else href)
        elif tag in _BLOCKS:
            if tag == "pre":
                self.pre = max(self.pre - 1, 0)
            self._break(1 if tag in ("tr", "dt", "dd") else 2)

    def data(self, raw: str) -> None:
        data = unescape(raw) if "&" in raw else raw
        if self.pre:
            self.out.append(data)
            return
        text = _SPACES.sub(" ", data)
        if text == " " and (not self.out or self._ends_with(("\n", " "))):
            return
        if self._ends_with(("\n",)):
            text = text.lstrip(" ")
        if text:
            self.out.append(text)


# A tag, comment, declaration or processing instruction; attribute values may hold ">".
_TOKEN = re.compile(
    r"""<!--.*?(?:-->|\Z)|<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:[^>"']|"[^"]*"|'[^']*')*)>|<[!?][^>]*>""", re.S
)


def html_to_text(html: str) -> str:
    """A readable plain-text rendering of ``html``: paragraphs, lists, ``text (url)`` links.

    A regular-expression tokenizer (in C) rather than :class:`html.parser.HTMLParser`
    (pure Python): the text part is derived for every row, and this is most of
    an HTML message's render time.
    """
    extractor = _TextExtractor()
    position = 0
    lowered: str | None = None
    length = len(html)
    while position < length:
        match = _TOKEN.search(html, position)
        if match is None:
            extractor.data(html[position:])
            break
        if match.start() > position:
            extractor.data(html[position : match.start()])
        position = match.end()
        tag = match.group(2)
        if tag is None:
            continue  # comment, doctype, processing instruction
        tag = tag.lower()
        if match.group(1):
            extractor.end(tag)
        elif tag in _SKIPPED:
            # Skip to the element's end tag: its content (CSS, script) is not text.
            lowered = lowered if lowered is not None else html.lower()
            close = lowered.find(f"</{tag}", position)
            if close < 0:
                break
            position = lowered.find(">", close) + 1 or length
        else:
            extractor.start(tag, match.group(3))
    lines = [line.rstrip() for line in "".join(extractor.out).split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"
