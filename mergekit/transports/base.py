"""The one small interface every transport implements, and the data it speaks.

A transport turns rendered messages into outcomes and nothing else: it never
retries, renders or touches the ledger (dispatch does). ``send_batch`` returns
exactly one :class:`Outcome` per message, in order; a refusal of one message is
an outcome, not an exception. An exception from ``send_batch`` means the whole
batch's fate is unknown to the transport, and dispatch treats it as such.
"""

from __future__ import annotations

import enum
import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Self
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from ..errors import ConfigError
from .scrub import Scrubber

if TYPE_CHECKING:
    from ..render import Template


class Status(enum.StrEnum):
    """What became of one message: the closed vocabulary of outcomes."""

    SENT = "sent"  # accepted by the server or provider
    TRANSIENT = "transient"  # refused for now (4xx, 429, 5xx HTTP, connection lost before the data)
    PERMANENT = "permanent"  # refused for good (SMTP 5xx, HTTP 4xx)
    UNKNOWN = "unknown"  # may or may not have left (reply lost after the data went out)


_new_tuple = tuple.__new__


class Outcome(NamedTuple):
    """One message's outcome; ``retry_after`` is the server's requested wait in seconds.

    A named tuple, not a frozen dataclass: it is as immutable, and one is built
    per message of every reply in half the time (a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``; issue 6, the
    HTTP path).
    """

    status: Status
    provider_id: str | None = None
    code: int | None = None
    text: str = ""
    retry_after: float | None = None

    @classmethod
    def sent(cls, provider_id: str | None = None, code: int | None = None, text: str = "") -> Outcome:
        # The tuple built directly: one Python call, not two, for every message accepted.
        return _new_tuple(cls, (Status.SENT, provider_id, code, text, None))

    @classmethod
    def transient(cls, code: int | None, text: str, retry_after: float | None = None) -> Outcome:
        return cls(Status.TRANSIENT, None, code, text, retry_after)

    @classmethod
    def permanent(cls, code: int | None, text: str) -> Outcome:
        return cls(Status.PERMANENT, None, code, text)

    @classmethod
    def unknown(cls, text: str, code: int | None = None) -> Outcome:
        return cls(Status.UNKNOWN, None, code, text)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file carried by a message; ``content`` is shared between rows naming the same file.

    ``content_id`` is set when the HTML part shows the file inline as ``cid:<content_id>``
    (RFC 2392): HTTP APIs then send it as their inline attachment.
    """

    filename: str
    content_type: str
    content: bytes
    content_id: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """A rendered message: the wire bytes plus the parts HTTP APIs want separately.

    ``headers`` holds every header as the template rendered it (decoded text, no
    ``Bcc``), in order; ``raw`` is the RFC 5322 message with CRLF line ends.
    """

    row: int
    key: str
    message_id: str
    envelope_from: str
    envelope_to: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    text: str | None
    html: str | None
    raw: bytes
    attachments: tuple[Attachment, ...] = field(default=())
    # The address headers as the renderer parsed them: (lower-case header name,
    # ((display name, address), ...)). APIs take addresses from here, never by
    # parsing a header again (a display name from the data may hold "@" or ",").
    addresses: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = field(default=())

    def header(self, name: str, default: str = "") -> str:
        """The first header called ``name`` (case-insensitive), decoded."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: hosts where cleartext never leaves the machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Characters of an outcome's text, and of a provider id, that the ledger keeps (README "Outcomes"):
# a reply's first lines say why; a hostile server's megabytes would only fill the ledger.
OUTCOME_TEXT_LIMIT = 1000

SECRET_QUERY_KEYS = frozenset({"key", "api_key", "token", "secret", "password", "private"})


@dataclass(frozen=True)
class TransportURL:
    """A parsed transport URL; ``redacted`` is the only form that may be shown or stored."""

    text: str
    parts: SplitResult
    query: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> TransportURL:
        parts = urlsplit(text)
        if not parts.scheme:
            raise ConfigError(
                f"transport URL {redact_url(text)!r} has no scheme",
                option="--transport",
                hint="Use e.g. smtp://host:587, maildir://outbox or null://",
            )
        return cls(text, parts, dict(parse_qsl(parts.query, keep_blank_values=True)))

    @property
    def scheme(self) -> str:
        return self.parts.scheme.lower()

    @property
    def redacted(self) -> str:
        return redact_url(self.text)

    def flag(self, name: str, default: bool) -> bool:
        """A boolean query parameter such as ``?tls_verify=false``."""
        value = self.query.get(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(
            f"?{name}={value!r} in the transport URL is not a boolean",
            option="--transport",
            hint="Use true or false",
        )


def redact_url(text: str) -> str:
    """The URL with its password and secret-looking query values replaced by ``***``."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = "&".join(
        f"{k}=***" if k.lower() in SECRET_QUERY_KEYS else f"{k}={v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and text.startswith(f"{parts.scheme}://"):
        # urlunsplit drops an empty authority: keep "null://" and "maildir://outbox" as written.
        redacted = redacted.replace(f"{parts.scheme}:", f"{parts.scheme}://", 1)
    return redacted


class Transport(ABC):
    """Open, send batches, close. Subclasses declare ``schemes`` and ``max_batch``.

    ``concurrency`` is how many ``send_batch`` calls dispatch keeps in flight at
    once; a transport sizes its pool of connections to it.
    """

    schemes: ClassVar[tuple[str, ...]]
    max_batch: ClassVar[int]
    # True where a batch goes out as one request (HTTP bulk APIs): dispatch then keeps
    # batches full. False where a batch is just a connection's share of messages (SMTP).
    batch_is_request: ClassVar[bool] = True
    name: ClassVar[str]

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        self.url = url
        self.concurrency = concurrency
        # Every secret this transport holds, so that no text it lets out carries one.
        self.scrub = Scrubber()

    def clean(self, outcomes: list[Outcome]) -> list[Outcome]:
        """``outcomes`` with texts and provider ids scrubbed of secrets and cut to OUTCOME_TEXT_LIMIT.

        Dispatch passes every outcome through here before it reaches the ledger, the
        report or a log line: one place, whatever the transport or the path.
        """
        texts = {text for outcome in outcomes for text in (outcome.text, outcome.provider_id) if text}
        if not texts:
            return outcomes
        # One search over the batch's texts (a batch's outcomes often share one text): most
        # batches hold nothing to scrub, and each message's provider id would cost a search.
        longest = max(map(len, texts))
        if longest <= OUTCOME_TEXT_LIMIT and not self.scrub.suspects("\0".join(texts)):
            return outcomes
        clean = {text: self.scrub(text, OUTCOME_TEXT_LIMIT) for text in texts}
        return [
            outcome._replace(
                text=clean.get(outcome.text, outcome.text),
                provider_id=clean.get(outcome.provider_id or "", outcome.provider_id),
            )
            for outcome in outcomes
        ]

    def prepare(self, template: Template) -> None:
        """Called once by dispatch with the campaign's compiled template, before ``open``.

        A no-op by default; a transport that can send a template's plain
        substitutions in bulk (SendGrid, Mailgun) analyses it here.
        """

    async def open(self) -> None:
        """Prepare to send (connect, authenticate); raise TransportError if that cannot work."""

    @abstractmethod
    async def send_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        """Send ``messages``; return one outcome per message, in order."""

    async def close(self) -> None:
        """Release connections; never raises for a connection already gone."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
