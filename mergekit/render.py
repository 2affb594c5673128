"""Render: a template file plus one row of data becomes a :class:`Message`.

The template format is mailmerge's: a header block, a blank line, a body, all
Jinja. The two parts are compiled once each in a sandboxed environment with
``StrictUndefined``. Values printed into the header block pass through a
``finalize`` hook that swaps CR, LF and NUL for private-use markers, so a row
value can never start a header of its own: a header that carries a marker after
rendering makes the row ``invalid``, naming the header.

The wire form is assembled by hand rather than with :mod:`email`'s header
registry (which costs more than sending the message): headers are written as
rendered, RFC 2047 encoded-words only where a value is not ASCII or cannot be
folded, and the body is 7bit when it can be and quoted-printable otherwise
(RFC 2045), always with CRLF line ends (RFC 5322 section 2.1).

HTML and Markdown bodies (see :mod:`mergekit.bodies`) go out as
``multipart/alternative`` (text, then HTML: RFC 2046 5.1.4 puts the preferred
part last), wrapped in ``multipart/mixed`` when the row has attachments
(:mod:`mergekit.attachments`). Boundaries are derived from the Message-ID, so
a resent message is byte-identical apart from its ``Date:``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.utils import formatdate, getaddresses
from functools import lru_cache
from pathlib import Path
from threading import get_ident
from typing import Any

import jinja2

from . import bodies
from .addresses import wire_address
from .attachments import AttachmentFolder, AttachmentRefused, LoadedAttachment
from .errors import RenderError, TemplateError
from .sandbox import RenderLimitError, Sandbox, deadline, join_bounded
from .transports.base import Message
from .unsubscribe import Unsubscribe, list_id_address

# Private-use stand-ins for characters that must never reach a header from data.
_HEADER_MARKERS = {"\r": "\ue000", "\n": "\ue001", "\x00": "\ue002"}
_MARKER_TRANSLATION = str.maketrans(_HEADER_MARKERS)
_MARKER_NAMES = {"\ue000": "CR", "\ue001": "LF", "\ue002": "NUL"}
_MARKER = re.compile("[\ue000-\ue002]")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f]")  # C0 controls but TAB
# Either of the above in a header block, whose lines end in LF (CR from a template is a control).
_MARKER_OR_CONTROL = re.compile("[\ue000-\ue002\x00-\x08\x0b-\x1f]")
_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 ftext: printable ASCII except ':'
ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender"})
RECIPIENT_HEADERS = ("to", "cc", "bcc")
# Headers mergekit writes itself; a template's own value for them is ignored.
GENERATED_HEADERS = frozenset(
    {"mime-version", "content-type", "content-transfer-encoding", "bcc", "date", "message-id"}
)
# mailmerge's pseudo-header naming a file to attach; never written to the wire.
ATTACHMENT_HEADER = "attachment"
UNSUBSCRIBE_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
LIST_ID_HEADER = "list-id"  # written with the unsubscribe headers, unless the template has its own
# RFC 5322 2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998.
SOFT_LINE_LIMIT = 78
HARD_LINE_LIMIT = 998
# RFC 2047 2: an encoded-word is at most 75 characters; 45 bytes of UTF-8 make 60 of base64.
_ENCODED_WORD_BYTES = 45
_ENCODED_WORD_MAX = 75


def _mark_header_value(value: Any) -> Any:
    """Jinja ``finalize`` for the header block: make CR/LF/NUL from data visible."""
    if isinstance(value, str):
        return value.translate(_MARKER_TRANSLATION)
    return value


def _environment(*, finalize: Any = None, autoescape: bool = False) -> Sandbox:
    return Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,
        finalize=finalize,
    )


@dataclass(frozen=True)
class TemplateSource:
    """A template file split into its header block and body, with their first lines."""

    path: str
    text: str
    header_source: str
    body_source: str
    body_line: int  # 1-based line number where the body starts

    @classmethod
    def read(cls, path: str | Path) -> TemplateSource:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise TemplateError(
                "template file not found", path=str(path), hint="Check the TEMPLATE argument"
            ) from None
        except UnicodeDecodeError as err:
            raise TemplateError(
                "template is not UTF-8 text", path=str(path), hint="Save the template as UTF-8"
            ) from err
        except OSError as err:
            raise TemplateError(f"cannot read template: {err.strerror}", path=str(path)) from err
        return cls.parse(text, path=str(path))

    @classmethod
    def parse(cls, text: str, *, path: str = "<template>") -> TemplateSource:
        text = text.replace("\r\n", "\n")
        header, sep, body = text.partition("\n\n")
        if not sep:
            raise TemplateError(
                "template has no blank line between its headers and its body",
                path=path,
                line=text.count("\n") + 1,
                hint="Write the headers (From:, To:, Subject:), one blank line, then the body",
            )
        if not header.strip():
            raise TemplateError(
                "template has no headers",
                path=path,
                line=1,
                hint="Start the template with From:, To: and Subject: lines",
            )
        return cls(path, text, header + "\n", body, header.count("\n") + 3)

    @property
    def fingerprint(self) -> str:
        """What identifies this template's content: a changed template changes it."""
        return hashlib.sha256(self.text.encode()).hexdigest()


class _Compiled:
    """A compiled Jinja template that renders a row the way ``jinja2.Template.render`` does,
    less two passes per row over the template's globals (a ChainMap, slow to iterate): the
    copy into the row's context (flattened once here instead) and the set of their names
    (only ``{% import %}`` reads it, and these templates have no loader to import from).
    Those were a third of a short template's cost."""

    __slots__ = ("_globals", "template")

    def __init__(self, template: jinja2.Template) -> None:
        self.template = template
        self._globals = dict(template.globals)

    def render(self, data: Mapping[str, Any]) -> str:
        template = self.template
        context = jinja2.runtime.new_context(
            template.environment, template.name, template.blocks, {**self._globals, **data}, shared=True
        )
        try:
            return join_bounded(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()


class Template:
    """A compiled template that renders rows into messages for one campaign.

    ``attachments_dir`` is where ``Attachment:`` paths and linked stylesheets
    resolve, and must stay (default: the template's folder); ``unsubscribe``
    adds the List-Unsubscribe and List-Id headers and the ``unsubscribe_url``
    variable. ``identity`` is the ledger's campaign identity, which Message-IDs
    derive from (see :meth:`with_identity`); without one (a preview, which has
    no ledger) it is the campaign name.
    """

    def __init__(
        self,
        source: TemplateSource,
        *,
        campaign: str,
        attachments_dir: str | Path | None = None,
        unsubscribe: Unsubscribe | None = None,
        identity: str | None = None,
    ) -> None:
        self.source = source
        self.campaign = campaign
        self.identity = campaign if identity is None else identity
        self.unsubscribe = unsubscribe
        self._attachments_dir = attachments_dir
        # Attachments and linked stylesheets resolve in one folder: --attachments-dir or the template's.
        folder = Path(attachments_dir) if attachments_dir is not None else Path(source.path).parent
        self.attachments = AttachmentFolder(folder)
        self._headers = self._compile(_environment(finalize=_mark_header_value), source.header_source, 1)
        self.kind = bodies.detect_kind(source.header_source, source.path)
        self.css: bodies.CssPlan | None = None
        self._body: _Compiled | None = None  # the text part (Markdown source for Markdown)
        self._html: _Compiled | None = None
        self._markdown = False
        parts = [bodies.SourcePart(self.kind.kind, source.body_source, source.body_line)]
        if self.kind.kind == bodies.ALTERNATIVE:
            assert self.kind.boundary is not None
            parts = bodies.split_alternative(
                source.body_source, self.kind.boundary, path=source.path, first_line=source.body_line
            )
        for part in parts:
            if part.kind == bodies.HTML:
                self.css = bodies.plan_css(part.source, folder=folder, path=source.path)
                self._html = self._compile(_environment(autoescape=True), self.css.source, part.first_line)
            elif part.kind == bodies.MARKDOWN and self._body is None:
                self._markdown = self._html is None
                self._body = self._compile(_environment(), part.source, part.first_line)
            elif part.kind == bodies.TEXT:
                self._body = self._compile(_environment(), part.source, part.first_line)
                self._markdown = False
        self._date = _DateCache()

    def with_identity(self, identity: str) -> Template:
        """This template for the ledger's campaign ``identity`` (compiled once, checked before
        the ledger is opened, bound once the campaign is)."""
        bound = copy.copy(self)
        bound.identity = identity
        return bound

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as what built it, so a render worker compiles its own copy."""
        return (
            _rebuild_template,
            (
                self.source.text,
                self.source.path,
                self.campaign,
                self._attachments_dir,
                self.unsubscribe,
                self.identity,
            ),
        )

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        campaign: str,
        attachments_dir: str | Path | None = None,
        unsubscribe: Unsubscribe | None = None,
    ) -> Template:
        return cls(
            TemplateSource.read(path),
            campaign=campaign,
            attachments_dir=attachments_dir,
            unsubscribe=unsubscribe,
        )

    def _compile(self, env: Sandbox, text: str, first_line: int) -> _Compiled:
        try:
            return _Compiled(env.from_string(text))
        except jinja2.TemplateSyntaxError as err:
            raise TemplateError(
                f"template syntax error: {err.message}",
                path=self.source.path,
                line=(err.lineno or 1) + first_line - 1,
            ) from None

    def render(self, data: Mapping[str, str], *, row: int, key: str) -> Message:
        """Render one row; raise :class:`RenderError` naming the variable, header or file at fault,
        or the bound the template passed (:mod:`mergekit.sandbox`: CPU time, size)."""
        guard = deadline
        timed = get_ident() == guard.thread  # signals reach the main thread only
        if timed:
            if not guard.ticking:
                guard.start()
            guard.serial += 1
            guard.rendering = True
        try:
            try:
                return self._render(data, row=row, key=key)
            finally:
                if timed:
                    guard.rendering = False
        except RenderLimitError as err:  # the deadline can expire outside the Jinja code
            raise RenderError(f"template: {err}", row=row, key=key) from None

    def _render(self, data: Mapping[str, str], *, row: int, key: str) -> Message:
        unsubscribe_email = ""
        if self.unsubscribe is not None:
            # {email} in the unsubscribe URL: the row's "email" column, else the recipient key.
            unsubscribe_email = next((v for k, v in data.items() if k.lower() == "email"), key).strip()
            if self.unsubscribe.url:
                url = self.unsubscribe.url_for(self.campaign, key, unsubscribe_email)
                data = {**data, "unsubscribe_url": url or ""}
        try:
            header_text = self._headers.render(data)
            body = self._body.render(data) if self._body is not None else None
            html = self._html.render(data) if self._html is not None else None
        except jinja2.UndefinedError as err:
            raise RenderError(
                f"{_undefined_reason(err)} (the row has no such column)", row=row, key=key
            ) from None
        except RenderLimitError as err:
            raise RenderError(f"template: {err}", row=row, key=key) from None
        except jinja2.TemplateError as err:
            raise RenderError(f"template error: {err}", row=row, key=key) from None
        except RecursionError:
            raise RenderError("template error: recursion too deep", row=row, key=key) from None
        except Exception as err:  # the template's own expression failed: 1/0, range(10**9), int('x')
            raise RenderError(f"template error: {type(err).__name__}: {err}", row=row, key=key) from None
        headers = _parse_header_block(header_text, row=row, key=key)
        if self._markdown and body is not None:
            html = bodies.markdown_to_html(body)
        elif html is not None and self.css is not None and self.css.per_row and self.css.inliner is not None:
            html = self.css.inliner.inline(html)
        if html is not None and body is None:
            body = bodies.html_to_text(html)
        return self._build(
            headers, body or "", row=row, key=key, html=html, unsubscribe_email=unsubscribe_email
        )

    def _build(
        self,
        headers: list[tuple[str, str]],
        body: str,
        *,
        row: int,
        key: str,
        html: str | None = None,
        unsubscribe_email: str = "",
    ) -> Message:
        wire: list[str] = []
        own_list_id = False
        shown: list[tuple[str, str]] = []
        envelope_from = ""
        envelope_to: list[str] = []
        message_id_domain = "mergekit.invalid"
        attached: list[tuple[str, LoadedAttachment]] = []
        parsed: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered in GENERATED_HEADERS and lowered != "bcc":
                continue
            if lowered == ATTACHMENT_HEADER:
                try:
                    attached.append((value.strip(), self.attachments.load(value)))
                except AttachmentRefused as err:
                    raise RenderError(str(err), row=row, key=key, header=name) from None
                continue
            if self.unsubscribe is not None and lowered in UNSUBSCRIBE_HEADERS:
                continue
            own_list_id |= lowered == LIST_ID_HEADER
            if lowered in ADDRESS_HEADERS:
                try:
                    addresses, line = _address_header(name, value)
                except RenderError as err:  # raised without the row, which the cache must not keep
                    raise RenderError(err.message, row=row, key=key, header=name) from None
                parsed.append((lowered, addresses))
                if lowered in RECIPIENT_HEADERS:
                    envelope_to.extend(address for _, address in addresses)
                elif lowered == "from" and not envelope_from:
                    envelope_from = addresses[0][1]
                    message_id_domain = envelope_from.rpartition("@")[2]
                if lowered != "bcc":
                    wire.append(line)
            else:
                wire.append(_fold(name, value))
            if lowered != "bcc":
                shown.append((name, value))
        if not envelope_from:
            raise RenderError("the message has no From: header", row=row, key=key, header="From")
        if not envelope_to:
            raise RenderError(
                "the message has no recipient (To:, Cc: or Bcc:)", row=row, key=key, header="To"
            )
        if self.unsubscribe is not None:
            for name, value in self.unsubscribe.headers(self.campaign, key, unsubscribe_email):
                wire.append(_fold(name, value))
                shown.append((name, value))
            if not own_list_id:
                list_id = _format_address(self.campaign, list_id_address(self.campaign, message_id_domain))
                wire.append(_fold("List-Id", list_id, addresses=True))
                shown.append(("List-Id", list_id))
        message_id = make_message_id(self.identity, key, message_id_domain)
        wire.append(f"Date: {self._date.now()}")
        wire.append(f"Message-ID: {message_id}")
        text = body.replace("\r\n", "\n").replace("\r", "\n")
        wire.append("MIME-Version: 1.0")
        inline: dict[int, str] = {}  # index in ``attached`` -> Content-ID of an inline image
        if html is None and not attached:
            body_bytes, encoding = _encode_body(text)
            wire.append('Content-Type: text/plain; charset="utf-8"')
            wire.append(f"Content-Transfer-Encoding: {encoding}")
        else:
            html, inline = _inline_images(message_id, html, attached)
            content_type, body_bytes = _multipart(message_id, text, html, attached, inline)
            wire.append(content_type)
        raw = ("\r\n".join(wire) + "\r\n\r\n").encode("ascii") + body_bytes
        return Message(
            row=row,
            key=key,
            message_id=message_id,
            envelope_from=envelope_from,
            envelope_to=tuple(dict.fromkeys(envelope_to)),
            headers=tuple(shown),
            text=text,
            html=html,
            raw=raw,
            attachments=tuple(
                replace(item.attachment, content_id=inline[i]) if i in inline else item.attachment
                for i, (_, item) in enumerate(attached)
            ),
            addresses=tuple(parsed),
        )


def _rebuild_template(
    text: str,
    path: str,
    campaign: str,
    attachments_dir: str | Path | None,
    unsubscribe: Unsubscribe | None,
    identity: str,
) -> Template:
    return Template(
        TemplateSource.parse(text, path=path),
        campaign=campaign,
        attachments_dir=attachments_dir,
        unsubscribe=unsubscribe,
        identity=identity,
    )


def make_message_id(identity: str, key: str, domain: str) -> str:
    """The same ``Message-ID`` every time for one recipient of one campaign, so copies collapse;
    ``identity`` is the campaign's (see :class:`~mergekit.ledger.Campaign`), so no other
    campaign repeats it, whatever its name."""
    digest = hashlib.sha256(f"{identity}\x00{key}".encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


class _DateCache:
    """``Date:`` values, formatted at most once a second (formatting costs more than rendering)."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second, self._text = second, formatdate(second, usegmt=True)
        return self._text


def _undefined_reason(err: jinja2.UndefinedError) -> str:
    # Jinja's message is "'name' is undefined" or "'dict object' has no attribute 'x'".
    match = re.match(r"'([^']*)' is undefined", str(err))
    if match:
        return f"template variable {match.group(1)!r} is undefined"
    return f"template variable undefined: {err}"


def _parse_header_block(text: str, *, row: int, key: str) -> list[tuple[str, str]]:
    """Split the rendered header block into (name, value), unfolding continuation lines."""
    headers: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue  # a header that rendered empty (e.g. inside {% if %})
        if line[0] in " \t" and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _HEADER_NAME.match(name):
            raise RenderError(
                f"header line {line[:60]!r} is not 'Name: value'", row=row, key=key, header=name or None
            )
        headers.append((name, value.strip()))
    if not _MARKER_OR_CONTROL.search(text):  # the common case: one scan instead of two per header
        return headers
    for name, value in headers:
        marker = _MARKER.search(value)
        if marker is not None:
            raise RenderError(
                f"header {name}: a value from the data contains {_MARKER_NAMES[marker.group()]}; "
                "line breaks are not allowed in headers",
                row=row,
                key=key,
                header=name,
            )
        if _CONTROL.search(value):
            raise RenderError(f"header {name}: contains a control character", row=row, key=key, header=name)
    return headers


def _parse_addresses(value: str, *, header: str, row: int | None, key: str | None) -> list[tuple[str, str]]:
    if not value:
        raise RenderError(f"header {header}: is empty", row=row, key=key, header=header)
    simple = _SIMPLE_ADDRESS.match(value)
    if simple is not None:
        # One address, a display name without quotes, comments or specials: what
        # getaddresses would return, without its character-by-character parse.
        name, address = simple.group(1, 2) if simple.group(2) else ("", simple.group(3))
        pairs = [(" ".join(name.split()), address)]
    else:
        angled = _angle_addresses(value)
        pairs = angled if angled is not None else getaddresses([value])
    if not pairs or any("@" not in address for _, address in pairs):
        single = _SINGLE_ANGLE_ADDRESS.match(value)
        if single is None:
            raise RenderError(
                f"header {header}: {value!r} is not a valid address list", row=row, key=key, header=header
            )
        # "Doe, Jo <jo@example.org>" from a name column: one address whose display
        # name holds specials; quote it rather than split it at the comma.
        pairs = [(single.group(1).strip().strip('"'), single.group(2).strip())]
    parsed = []
    for name, address in pairs:
        try:
            parsed.append((name, wire_address(address)))
        except ValueError as err:
            raise RenderError(
                f"header {header}: address {address!r} is not valid: {err}", row=row, key=key, header=header
            ) from None
    return parsed


# "Name <local@domain>" or "local@domain": no quotes, comments, groups or lists.
_SIMPLE_ADDRESS = re.compile(
    r'([^"<>()\[\]\\,;:@]*?)\s*<([^<>\s"()\[\]\\,;:@]+@[^<>\s"()\[\]\\,;:@]+)>\Z'
    r'|([^<>\s"()\[\]\\,;:@]+@[^<>\s"()\[\]\\,;:@]+)\Z'
)


def _angle_addresses(value: str) -> list[tuple[str, str]] | None:
    """``phrase <addr>, phrase <addr>``: only what is inside angle brackets is an address.

    A display name from the data (``To: {{ name }} <{{ email }}>``) may hold ``@``,
    commas or anything else; read as an address list it could add a recipient
    ("a@evil.example, Jo <jo@…>") or replace the shown address. None when the
    value has no angle brackets or is not such a list.
    """
    if "<" not in value:
        return None
    found = []
    position = 0
    for match in _ANGLE_ITEM.finditer(value):
        if match.start() != position:
            return None
        phrase = match.group(1).strip()
        if len(phrase) >= 2 and phrase[0] == phrase[-1] == '"':  # quoted by the template: "{{ name }}"
            phrase = phrase[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        found.append((phrase, match.group(2).strip()))
        position = match.end()
    return found if found and position == len(value) else None


_ANGLE_ITEM = re.compile(r"\s*([^<>]*?)\s*<([^<>]*)>\s*(?:,|\Z)")
_SINGLE_ANGLE_ADDRESS = re.compile(r"([^<>]*)<([^<>@]+@[^<>@]+)>\s*\Z")
_ATEXT_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]*\Z")


@lru_cache(maxsize=1024)
def _address_header(name: str, value: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """An address header's (display name, address) pairs and its folded wire line.

    Cached: most templates give From (often Reply-To too) one value on every row,
    and parsing, validating and encoding it was a tenth of a send's CPU.
    """
    addresses = tuple(_parse_addresses(value, header=name, row=None, key=None))
    room = SOFT_LINE_LIMIT - len(name) - 2
    formatted = [
        _format_address(n, a, room=room if i == 0 else _ENCODED_WORD_MAX)
        for i, (n, a) in enumerate(addresses)
    ]
    return addresses, _fold(name, ", ".join(formatted), addresses=True)


def _format_address(name: str, address: str, *, room: int = _ENCODED_WORD_MAX) -> str:
    """``name <address>`` with the display name quoted or encoded as RFC 5322/2047 require.

    ``room`` is the space left on the header's first line, for the first encoded-word.
    """
    if not name:
        return address
    if not name.isascii() or "=?" in name or len(name) + len(address) + 16 > HARD_LINE_LIMIT:
        # A name too long for one line is encoded too, in words that fold: otherwise the whole
        # header, address included, would be encoded and the address lost to every reader.
        return f"{_encoded_words(name, room=room)} <{address}>"
    if _ATEXT_PHRASE.match(name):
        return f"{name} <{address}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>'


def _encoded_words(value: str, *, room: int = _ENCODED_WORD_MAX) -> str:
    """RFC 2047 base64 encoded-words of at most 75 characters, never splitting a character.

    The words are separated by single spaces (which decoders drop between
    encoded-words), so the header folds at them; the first word fits ``room``.
    """
    whole = value.encode("utf-8")
    # "=?utf-8?b?" + "?=" is 12 characters; base64 makes 4 of every 3 bytes.
    budget = min(_ENCODED_WORD_BYTES, max(9, 3 * ((room - 12) // 4)))
    if len(whole) <= budget:
        return f"=?utf-8?b?{base64.b64encode(whole).decode()}?="
    words = []
    chunk = bytearray()
    for char in value:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > budget:
            words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode()}?=")
            chunk = bytearray()
            budget = _ENCODED_WORD_BYTES
        chunk += encoded
    if chunk:
        words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode()}?=")
    return " ".join(words)  # _fold breaks the line between them


def _fold(name: str, value: str, *, addresses: bool = False) -> str:
    """``Name: value`` folded at spaces to 78 columns; encoded where not ASCII or unfoldable."""
    line = f"{name}: {value}"
    # RFC 2047 5: text that looks like an encoded-word must be encoded (an address list is already).
    if value.isascii() and (addresses or "=?" not in value):
        if len(line) <= SOFT_LINE_LIMIT:
            return line
        folded = _fold_ascii(line)
        if all(len(part) <= HARD_LINE_LIMIT for part in folded.split("\r\n")):
            return folded
    return _fold_ascii(f"{name}: {_encoded_words(value, room=SOFT_LINE_LIMIT - len(name) - 2)}")


def _fold_ascii(line: str) -> str:
    lines: list[str] = []
    current = ""
    for index, word in enumerate(line.split(" ")):
        # Never fold right after "Name:": some parsers then read a value starting with a space.
        if index > 1 and current and len(current) + 1 + len(word) > SOFT_LINE_LIMIT:
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n".join(lines)


def _encode_body(text: str, *, boundary: str | None = None) -> tuple[bytes, str]:
    """The body as CRLF bytes and its transfer encoding: 7bit if it can be, else quoted-printable.

    With ``boundary``, a 7bit body that contains the boundary is quoted-printable
    instead (which encodes the boundary's ``=``), so it cannot end its part.
    """
    if not text.endswith("\n"):
        text += "\n"
    if (
        text.isascii()
        and max(map(len, text.split("\n"))) <= HARD_LINE_LIMIT
        and (boundary is None or boundary not in text)
    ):
        return text.replace("\n", "\r\n").encode("ascii"), "7bit"
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return encoded.replace(b"\n", b"\r\n"), "quoted-printable"


def _text_part(subtype: str, text: str, boundary: str) -> bytes:
    body, encoding = _encode_body(text, boundary=boundary)
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n'
    return head.encode("ascii") + body


def _escape_attribute(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&#34;").replace("'", "&#39;").replace("<", "&lt;")


def _join_parts(boundary: str, parts: list[bytes]) -> bytes:
    # RFC 2046 5.1.1: the CRLF before a delimiter belongs to the delimiter, so each
    # part (which ends in CRLF) gets one more, and its last line break survives.
    delimiter = f"--{boundary}\r\n".encode("ascii")
    return b"".join(delimiter + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode("ascii")


def _inline_images(
    message_id: str, html: str | None, attached: list[tuple[str, LoadedAttachment]]
) -> tuple[str | None, dict[int, str]]:
    """The HTML with ``cid:`` sources, and the Content-ID of each attachment it shows inline.

    An attachment whose ``Attachment:`` value the HTML names as an image source
    (``<img src="logo.png">``, mailmerge's inline images) is shown inline: the
    ``src`` becomes ``cid:`` (RFC 2392). The same HTML and ids go to the raw
    message (:func:`_multipart`) and to the HTTP APIs (``Attachment.content_id``).
    """
    inline: dict[int, str] = {}
    if html is None:
        return html, inline
    seed = _seed(message_id)
    for index, (value, _) in enumerate(attached):
        source = re.compile(r"""(\ssrc\s*=\s*["'])""" + re.escape(_escape_attribute(value)) + r"""(["'])""")
        if source.search(html):
            inline[index] = f"part{index}.{seed}@mergekit"
            html = source.sub(rf"\g<1>cid:{inline[index]}\g<2>", html)
    return html, inline


def _seed(message_id: str) -> str:
    """What boundaries and Content-IDs are made of: fixed by the Message-ID, so a resent copy is the same."""
    return hashlib.sha256(message_id.encode()).hexdigest()[:24]


def _multipart(
    message_id: str,
    text: str,
    html: str | None,
    attached: list[tuple[str, LoadedAttachment]],
    inline_ids: dict[int, str],
) -> tuple[str, bytes]:
    """The ``Content-Type`` header line and body of a multipart message (RFC 2046 5.1).

    Boundaries start with ``=_``, which quoted-printable and base64 bodies cannot
    contain; 7bit parts that happen to contain one are sent quoted-printable.
    The attachments at ``inline_ids`` (see :func:`_inline_images`) go inline, in a
    ``multipart/related`` HTML part (RFC 2387).
    """
    seed = _seed(message_id)
    alternative, mixed, related = f"=_alt_{seed}", f"=_mix_{seed}", f"=_rel_{seed}"
    inline = [item.inline_part(inline_ids[i]) for i, (_, item) in enumerate(attached) if i in inline_ids]
    attached = [pair for i, pair in enumerate(attached) if i not in inline_ids]
    if html is not None:
        html_text = html.replace("\r\n", "\n").replace("\r", "\n")
        html_part = _text_part("html", html_text, alternative)
        if inline:
            html_part = (
                f'Content-Type: multipart/related;\r\n boundary="{related}"\r\n\r\n'.encode()
                + _join_parts(related, [_text_part("html", html_text, related), *inline])
            )
        inner = _join_parts(alternative, [_text_part("plain", text, alternative), html_part])
        first = f'Content-Type: multipart/alternative;\r\n boundary="{alternative}"\r\n\r\n'.encode() + inner
        if not attached:
            return f'Content-Type: multipart/alternative;\r\n boundary="{alternative}"', inner
    else:
        first = _text_part("plain", text, mixed)
    body = _join_parts(mixed, [first, *(item.part for _, item in attached)])
    return f'Content-Type: multipart/mixed;\r\n boundary="{mixed}"', body
