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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate, getaddresses
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from email_validator import EmailNotValidError, validate_email
from jinja2.sandbox import SandboxedEnvironment

from .errors import RenderError, TemplateError
from .transports.base import Message

# Private-use stand-ins for characters that must never reach a header from data.
_HEADER_MARKERS = {"\r": "\ue000", "\n": "\ue001", "\x00": "\ue002"}
_MARKER_TRANSLATION = str.maketrans(_HEADER_MARKERS)
_MARKER_NAMES = {"\ue000": "CR", "\ue001": "LF", "\ue002": "NUL"}
_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 ftext: printable ASCII except ':'
ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender"})
RECIPIENT_HEADERS = ("to", "cc", "bcc")
# Headers mergekit writes itself; a template's own value for them is ignored.
GENERATED_HEADERS = frozenset(
    {"mime-version", "content-type", "content-transfer-encoding", "bcc", "date", "message-id"}
)
# RFC 5322 2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998.
SOFT_LINE_LIMIT = 78
HARD_LINE_LIMIT = 998
# RFC 2047 2: an encoded-word is at most 75 characters; 45 bytes of UTF-8 make 60 of base64.
_ENCODED_WORD_BYTES = 45


def _mark_header_value(value: Any) -> Any:
    """Jinja ``finalize`` for the header block: make CR/LF/NUL from data visible."""
    if isinstance(value, str):
        return value.translate(_MARKER_TRANSLATION)
    return value


def _environment(*, finalize: Any = None) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
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


class Template:
    """A compiled template that renders rows into messages for one campaign."""

    def __init__(self, source: TemplateSource, *, campaign: str) -> None:
        self.source = source
        self.campaign = campaign
        self._headers = self._compile(_environment(finalize=_mark_header_value), source.header_source, 1)
        self._body = self._compile(_environment(), source.body_source, source.body_line)
        self._date = _DateCache()

    @classmethod
    def from_path(cls, path: str | Path, *, campaign: str) -> Template:
        return cls(TemplateSource.read(path), campaign=campaign)

    def _compile(self, env: SandboxedEnvironment, text: str, first_line: int) -> jinja2.Template:
        try:
            return env.from_string(text)
        except jinja2.TemplateSyntaxError as err:
            raise TemplateError(
                f"template syntax error: {err.message}",
                path=self.source.path,
                line=(err.lineno or 1) + first_line - 1,
            ) from None

    def render(self, data: Mapping[str, str], *, row: int, key: str) -> Message:
        """Render one row; raise :class:`RenderError` naming the variable or header at fault."""
        try:
            header_text = self._headers.render(data)
            body = self._body.render(data)
        except jinja2.UndefinedError as err:
            raise RenderError(
                f"{_undefined_reason(err)} (the row has no such column)", row=row, key=key
            ) from None
        except jinja2.TemplateError as err:
            raise RenderError(f"template error: {err}", row=row, key=key) from None
        headers = _parse_header_block(header_text, row=row, key=key)
        return self._build(headers, body, row=row, key=key)

    def _build(self, headers: list[tuple[str, str]], body: str, *, row: int, key: str) -> Message:
        wire: list[str] = []
        shown: list[tuple[str, str]] = []
        envelope_from = ""
        envelope_to: list[str] = []
        message_id_domain = "mergekit.invalid"
        for name, value in headers:
            lowered = name.lower()
            if lowered in GENERATED_HEADERS and lowered != "bcc":
                continue
            if lowered in ADDRESS_HEADERS:
                addresses = _parse_addresses(value, header=name, row=row, key=key)
                if lowered in RECIPIENT_HEADERS:
                    envelope_to.extend(address for _, address in addresses)
                elif lowered == "from" and not envelope_from:
                    envelope_from = addresses[0][1]
                    message_id_domain = envelope_from.rpartition("@")[2]
                if lowered != "bcc":
                    wire.append(
                        _fold(name, ", ".join(_format_address(n, a) for n, a in addresses), addresses=True)
                    )
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
        message_id = make_message_id(self.campaign, key, message_id_domain)
        wire.append(f"Date: {self._date.now()}")
        wire.append(f"Message-ID: {message_id}")
        text = body.replace("\r\n", "\n").replace("\r", "\n")
        body_bytes, encoding = _encode_body(text)
        wire.append("MIME-Version: 1.0")
        wire.append('Content-Type: text/plain; charset="utf-8"')
        wire.append(f"Content-Transfer-Encoding: {encoding}")
        raw = ("\r\n".join(wire) + "\r\n\r\n").encode("ascii") + body_bytes
        return Message(
            row=row,
            key=key,
            message_id=message_id,
            envelope_from=envelope_from,
            envelope_to=tuple(dict.fromkeys(envelope_to)),
            headers=tuple(shown),
            text=text,
            html=None,
            raw=raw,
        )


def make_message_id(campaign: str, key: str, domain: str) -> str:
    """The same ``Message-ID`` every time for one recipient of one campaign, so copies collapse."""
    digest = hashlib.sha256(f"{campaign}\x00{key}".encode()).hexdigest()[:32]
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
    for name, value in headers:
        for marker, label in _MARKER_NAMES.items():
            if marker in value:
                raise RenderError(
                    f"header {name}: a value from the data contains {label}; "
                    "line breaks are not allowed in headers",
                    row=row,
                    key=key,
                    header=name,
                )
        if any(ord(ch) < 32 and ch != "\t" for ch in value):
            raise RenderError(f"header {name}: contains a control character", row=row, key=key, header=name)
    return headers


@lru_cache(maxsize=4096)
def _normalise_address(address: str) -> str:
    """The address as it goes on the wire (IDNA domain), or ValueError with the reason."""
    try:
        result = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as err:
        raise ValueError(str(err)) from None
    return result.ascii_email or result.normalized


def _parse_addresses(value: str, *, header: str, row: int, key: str) -> list[tuple[str, str]]:
    if not value:
        raise RenderError(f"header {header}: is empty", row=row, key=key, header=header)
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
            parsed.append((name, _normalise_address(address)))
        except ValueError as err:
            raise RenderError(
                f"header {header}: address {address!r} is not valid: {err}", row=row, key=key, header=header
            ) from None
    return parsed


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


def _format_address(name: str, address: str) -> str:
    """``name <address>`` with the display name quoted or encoded as RFC 5322/2047 require."""
    if not name:
        return address
    if not name.isascii() or "=?" in name or len(name) + len(address) + 16 > HARD_LINE_LIMIT:
        # A name too long for one line is encoded too, in words that fold: otherwise the whole
        # header, address included, would be encoded and the address lost to every reader.
        return f"{_encoded_words(name)} <{address}>"
    if _ATEXT_PHRASE.match(name):
        return f"{name} <{address}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>'


def _encoded_words(value: str) -> str:
    """RFC 2047 base64 encoded-words of at most 75 characters, never splitting a character."""
    words = []
    chunk = bytearray()
    for char in value:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > _ENCODED_WORD_BYTES:
            words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode()}?=")
            chunk = bytearray()
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
    return _fold_ascii(f"{name}: {_encoded_words(value)}")


def _fold_ascii(line: str) -> str:
    lines: list[str] = []
    current = ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > SOFT_LINE_LIMIT:
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n".join(lines)


def _encode_body(text: str) -> tuple[bytes, str]:
    """The body as CRLF bytes and its transfer encoding: 7bit if it can be, else quoted-printable."""
    if not text.endswith("\n"):
        text += "\n"
    if text.isascii() and all(len(line) <= HARD_LINE_LIMIT for line in text.split("\n")):
        return text.replace("\n", "\r\n").encode("ascii"), "7bit"
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return encoded.replace(b"\n", b"\r\n"), "quoted-printable"
