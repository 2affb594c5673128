"""One scrubber for every text a transport lets out: no secret leaves in any encoding (issue 13).

A server or proxy may echo the request's credentials in a reply (a 400 whose
body lists the headers it got), and that reply becomes a row's ``last_text``,
the report and ``--json``. A transport registers each secret it holds (API key,
SMTP password, AWS secret and session token, webhook secret) with its
:class:`Scrubber`; dispatch passes every outcome text and provider id through
it (:meth:`mergekit.transports.base.Transport.clean`), and the transports pass
their error texts.

What is replaced by ``***``:

- the secret as written, percent-encoded (``%2F`` or ``%2f``; ``+`` or ``%20``
  for a space), JSON-escaped (``\\"``, ``\\u00e9``, ``\\/``), HTML-escaped and
  in hex;
- any base64 (standard or URL-safe) run that contains it, whatever precedes it
  in the encoded bytes (``api:KEY`` of Basic auth, AUTH PLAIN's
  ``\\0user\\0password``, a whole header block): base64 of a string embedded at
  an offset depends on the offset modulo 3, so each secret gives three
  "cores", the characters its bytes alone decide at each alignment, and a run
  holding one is removed whole (JSON's ``\\/`` and URL-encoded ``+``, ``/``,
  ``=`` are read as the characters first, so they cannot split a run);
- the credentials of any ``Bearer`` token (16 characters or more) or ``Basic``
  value (base64 of ``user:password``), known or not.

Texts are scrubbed before they are cut to a length, so a cut never leaves half
a secret.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import logging
import re
from urllib.parse import quote, quote_plus

REDACTED = "***"
_BASE64_ALPHABET = "A-Za-z0-9+/_-"
_URLSAFE = str.maketrans("+/", "-_")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_JSON_ESCAPE_HEX = re.compile(r"(?<=\\u)[0-9a-f]{4}")
# Escapes that may split a base64 run in a reply (JSON's "\/", a URL-encoded "+", "/" or "=").
_BASE64_ESCAPES = re.compile(r"\\/|%2[BbFf]|%3[Dd]")
_UNESCAPED = {"\\/": "/", "%2b": "+", "%2f": "/", "%3d": "="}
_MIN_CORE = 4  # base64 characters; shorter cores would match unrelated text
# RFC 6750 b64token; 16 characters or more, so "Bearer token" in an error text stays readable.
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)[A-Za-z0-9._~+/-]{16,}=*")
_BASIC = re.compile(r"(?i)\b(basic)(\s+|%20|\+)([A-Za-z0-9+/]{4,}={0,2})")


def text_forms(secret: str) -> set[str]:
    """The ways ``secret`` may be written in a text, encodings of the whole value."""
    forms = {secret, html.escape(secret), html.escape(secret, quote=False)}
    for safe in ("", "/", "/:@"):
        for encoded in (quote(secret, safe=safe), quote_plus(secret, safe=safe)):
            forms |= {encoded, _PERCENT_ESCAPE.sub(lambda m: m.group().lower(), encoded)}
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        upper = _JSON_ESCAPE_HEX.sub(lambda m: m.group().upper(), escaped)
        forms |= {escaped, upper, escaped.replace("/", "\\/"), upper.replace("/", "\\/")}
    raw = secret.encode()
    forms |= {raw.hex(), raw.hex().upper()}
    return {form for form in forms if form}


def base64_cores(secret: bytes) -> set[str]:
    """The base64 characters ``secret`` alone decides, at each of the 3 byte alignments, both alphabets."""
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + secret).decode("ascii")
        total = offset + len(secret)
        start = (0, 2, 3)[offset]  # characters that mix in the bytes before the secret
        end = total // 3 * 4 + (0, 1, 2)[total % 3]  # the last group's characters it alone decides
        core = encoded[start:end]
        if len(core) >= _MIN_CORE:
            cores |= {core, core.translate(_URLSAFE)}
    return cores


class Scrubber:
    """Knows a transport's secrets; :meth:`__call__` returns a text with none of them in any form."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        # A substring of every form and base64 core: a text that holds none is let through after
        # a few substring searches (fast, in C; the outcome texts of every batch pass here).
        self._hints: tuple[str, ...] = ()
        self._forms: re.Pattern[str] | None = None
        self._base64: re.Pattern[str] | None = None
        self.margin = 0  # characters past a cut that scrubbing must see

    def add(self, secret: str | None) -> None:
        """Register a secret; an empty or None value is ignored."""
        if not secret or secret in self._secrets:
            return
        self._secrets.add(secret)
        forms = set().union(*(text_forms(s) for s in self._secrets))
        cores = set().union(*(base64_cores(s.encode()) for s in self._secrets))
        anchors = set().union(*(_anchors(s) for s in self._secrets)) | cores
        self._hints = tuple(sorted(anchors))
        self._forms = _alternation(forms)
        cores_pattern = _alternation(cores or {REDACTED}).pattern  # "***" never is in a base64 run
        self._base64 = re.compile(f"[{_BASE64_ALPHABET}]*(?:{cores_pattern})[{_BASE64_ALPHABET}]*=*")
        self.margin = 2 * max(len(form) for form in forms) + 256

    def suspects(self, text: str) -> bool:
        """False if scrubbing ``text`` surely changes nothing; one search, for a whole batch's texts."""
        if self._hints and ("%" in text or "\\/" in text or self._hinted(text)):
            return True
        return "earer" in text or "EARER" in text or "asic" in text or "ASIC" in text

    def _hinted(self, text: str) -> bool:
        return any(hint in text for hint in self._hints)

    def _scrub_known(self, text: str) -> str:
        """The registered secrets' forms and the base64 runs holding one, replaced."""
        assert self._forms is not None and self._base64 is not None
        return self._base64.sub(REDACTED, self._forms.sub(REDACTED, text))

    def __call__(self, text: str, limit: int | None = None) -> str:
        """``text`` scrubbed, then cut to ``limit`` characters (with an ellipsis) if longer."""
        if not text:
            return text
        if limit is not None and len(text) > limit:
            text = text[: limit + self.margin]
        if self._hints:
            if self._hinted(text):
                text = self._scrub_known(text)
            if "%" in text or "\\/" in text:  # escapes that may split a base64 run
                unescaped = _BASE64_ESCAPES.sub(lambda m: _UNESCAPED[m.group().lower()], text)
                if unescaped != text and self._hinted(unescaped):
                    text = self._scrub_known(unescaped)
        if "earer" in text or "EARER" in text:
            text = _BEARER.sub(rf"\1\2{REDACTED}", text)
        if "asic" in text or "ASIC" in text:
            text = _BASIC.sub(_basic_credentials, text)
        if limit is not None and len(text) > limit:
            text = text[:limit] + "…"
        return text


class ScrubbingFilter(logging.Filter):
    """A logging filter that passes each record of its logger through a Scrubber.

    For a library's own log lines that quote credentials (botocore's SigV4 signer
    logs the canonical request, session token header included, at DEBUG).
    """

    def __init__(self) -> None:
        super().__init__()
        self.scrub = Scrubber()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.scrub(record.getMessage()), None
        return True


def _alternation(strings: set[str]) -> re.Pattern[str]:
    """A pattern matching any of ``strings``, the longest first."""
    return re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True))))


def _anchors(secret: str) -> set[str]:
    """Substrings of the text forms (:func:`text_forms`): the secret's longest run of letters and
    digits, which no escaping changes, and its hex; every form when it has no such run."""
    runs = re.findall(r"[A-Za-z0-9]{4,}", secret)
    if not runs:
        return text_forms(secret)
    raw = secret.encode()
    return {max(runs, key=len), raw.hex(), raw.hex().upper()}


def _basic_credentials(match: re.Match[str]) -> str:
    """``Basic ***`` where the value is base64 of ``user:password``; the text as it was otherwise."""
    try:
        decoded = base64.b64decode(match.group(3), validate=True)
    except (binascii.Error, ValueError):
        return match.group()
    return f"{match.group(1)}{match.group(2)}{REDACTED}" if b":" in decoded else match.group()
