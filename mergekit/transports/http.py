"""The shared base of every HTTP email-API transport (issue 4).

All HTTP lives here: ``concurrency`` :class:`httpx.AsyncClient` per run, one
keep-alive connection each (timeouts, User-Agent, auth), the ``?base_url=``
override every HTTP URL takes, status classing and JSON decoding. A provider
file fills two hooks and nothing else:

- :meth:`HttpTransport.build_requests` turns a batch of rendered messages into
  one or more :class:`ApiRequest` (each names the messages it carries);
- :meth:`HttpTransport.parse_response` turns a 2xx reply into one outcome per
  message it carries, starting from ``unknown``.

Status classing, the same for every provider (DESIGN.md "Transports"):

==========================  ===============================================
reply                       outcome of every message the request carried
==========================  ===============================================
2xx, body parsed            what the provider's parser says
2xx, body unreadable        ``unknown``: it may have been accepted; never ``sent``
2xx, body not whole         ``unknown`` likewise: cut off, past ``?timeout=`` or
                            past MAX_REPLY_BYTES (not read on)
429                         ``transient``, with ``Retry-After`` (seconds or an
                            HTTP-date) or the provider's rate-limit reset header
5xx                         ``transient`` (``Retry-After`` honoured if given)
connection error, timeout   ``transient``: no status line within ``?timeout=``,
                            or another status whose body did not come whole
other 4xx                   ``permanent``, or per message where the provider's
                            :meth:`HttpTransport.parse_error` says which
==========================  ===============================================

A 429 also closes a gate shared by the whole run: no request of this transport
leaves before the wait is over, so concurrent batches slow down together, and
dispatch lowers the run's rate (:meth:`mergekit.dispatch.RateLimiter.throttle`).

Secrets (API keys) are read once at construction from the URL or the
environment; a missing one is a :class:`ConfigError` naming the variable, raised
before anything is sent. They travel only in request headers and are registered
with the transport's :class:`~mergekit.transports.scrub.Scrubber`, which dispatch
applies to every outcome (:meth:`~mergekit.transports.base.Transport.clean`).

``?timeout=`` bounds a whole exchange (connect, send, the whole reply), not each
read: see :meth:`HttpTransport._fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar, NamedTuple
from urllib.parse import unquote, urlsplit

import httpx

from ..errors import ConfigError, TransportError
from .base import Message, Outcome, Transport, TransportURL, is_loopback

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds to open a TCP+TLS connection to the API
# Seconds a whole exchange may take (``?timeout=``): connecting, sending the request (up
# to 50 MB on Postmark) and reading the whole reply; a 500-message batch takes a while.
EXCHANGE_TIMEOUT = 120.0
# Bytes of a reply read at most: a 500-message result list is well under 1 MB; a bigger
# body is not read on (a 2xx: ``unknown``), so a hostile server cannot fill the memory.
MAX_REPLY_BYTES = 4 * 1024 * 1024
MAX_RETRY_AFTER = 3600.0  # a Retry-After further out than this is capped: the row is deferred anyway
ERROR_TEXT_LIMIT = 300  # characters of a provider's error body kept in an outcome's text
# Refusals of a shared request that say nothing about its messages (auth, endpoint, rate):
# resending them one by one would only repeat the refusal.
NO_FALLBACK = frozenset({401, 403, 404, 429})
JSON_CONTENT_TYPE = {"Content-Type": "application/json"}  # the header of a JSON body sent as content=
# Headers the providers take as fields of their own, never as custom headers.
ADDRESS_FIELDS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender", "subject"})


def _stdlib_json_bytes(value: Any) -> bytes:
    """What httpx's ``json=`` sends: compact UTF-8 JSON, NaN refused."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# JSON in and out of every HTTP provider: orjson when installed (``pip install
# 'mergekit[fast]'``), several times faster than the stdlib on a 500-message batch
# body (issue 6, the HTTP path); the stdlib otherwise. Both write compact UTF-8
# JSON and raise a ValueError subclass on a body that is not JSON.
json_bytes: Callable[[Any], bytes] = _stdlib_json_bytes
json_loads: Callable[[bytes], Any] = json.loads
with contextlib.suppress(ImportError):
    import orjson

    json_bytes, json_loads = orjson.dumps, orjson.loads

try:
    USER_AGENT = f"mergekit/{version('mergekit')} httpx/{httpx.__version__}"
except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
    USER_AGENT = f"mergekit httpx/{httpx.__version__}"


@dataclass
class ApiRequest:
    """One HTTP request carrying the batch's messages at ``indexes``.

    Exactly one of ``json``, ``data``/``files`` (form) or ``content`` is the
    body; ``json`` goes out through :func:`json_bytes`. A form always goes as
    ``multipart/form-data``, files or not: the one form encoding the provider
    that takes forms documents (Mailgun), where httpx alone would send a form
    without files urlencoded. ``context`` is the provider's own note for its parser.
    """

    indexes: list[int]
    path: str
    method: str = "POST"
    json: Any = None
    data: list[tuple[str, str]] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    context: Any = None
    # Requests that carry the same messages one by one: sent instead when this
    # shared (substitution) request is refused with a 4xx that may be about one
    # message (not 401/403/404/429), so one bad address does not fail them all.
    fallback: list[ApiRequest] | None = None


class HttpTransport(Transport):
    """An HTTP email API: providers set ``default_base_url`` and fill the two hooks.

    ``concurrency`` requests are in flight at most, over at most as many
    keep-alive connections, whether they come from one batch split into many
    requests (SendGrid, Mailgun, Nylas) or from concurrent batches.
    """

    default_base_url: ClassVar[str]
    # Response headers a provider documents as its rate-limit reset, and whether
    # their value is an epoch time (SendGrid) or seconds to wait (Resend).
    reset_header: ClassVar[str | None] = None
    reset_is_epoch: ClassVar[bool] = False

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        self.base_url = self._base_url(url)
        try:
            self.timeout = float(url.query.get("timeout", EXCHANGE_TIMEOUT))
        except ValueError:
            self.timeout = 0.0
        if self.timeout <= 0:
            raise ConfigError("?timeout= must be a positive number of seconds", option="--transport")
        self._clients: list[httpx.AsyncClient] = []  # one per connection, opened by open()
        self._idle: list[httpx.AsyncClient] = []  # those no request is using
        self._slots: asyncio.Semaphore | None = None
        self._not_before = 0.0  # monotonic time before which no request leaves (after a 429)
        self.requests_made = 0  # every HTTP request sent, for reports and benchmarks

    # -- configuration -------------------------------------------------------

    def _base_url(self, url: TransportURL) -> str:
        base = url.query.get("base_url") or self.default_base_url
        parts = urlsplit(base)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(
                f"?base_url={base!r} in {url.redacted} is not an http(s) URL",
                option="--transport",
                hint="Use e.g. ?base_url=https://api.eu.example.com",
            )
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            # The API key would cross the network in cleartext.
            raise ConfigError(
                f"?base_url={base!r} is cleartext http to a non-loopback host",
                option="--transport",
                hint="Use https://, or http:// only to 127.0.0.1 or localhost",
            )
        return base.rstrip("/")

    def secret(
        self, env: str, *, url_value: str | None = None, query: Sequence[str] = ("key", "token", "api_key")
    ) -> str:
        """A secret from the URL (``url_value``, then ``?query`` names) or else ``$env``.

        :raises ConfigError: none given, naming the environment variable.
        """
        value = unquote(url_value) if url_value else None
        for name in query:
            value = value or self.url.query.get(name) or None
        value = value or os.environ.get(env) or None
        if not value:
            raise ConfigError(
                f"{self.name}:// needs an API key and none was given",
                option="--transport",
                hint=f"Set the environment variable {env}",
            )
        self.scrub.add(value)
        return value

    def auth(self) -> httpx.Auth | None:
        """The client's auth (Basic for Mailjet, Mailgun); headers carry the others."""
        return None

    def default_headers(self) -> dict[str, str]:
        """Headers on every request, e.g. ``Authorization: Bearer …``."""
        return {}

    # -- the two hooks a provider fills ---------------------------------------

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        """The requests that carry ``messages``; every index must be in exactly one."""
        raise NotImplementedError

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        """One outcome per message of ``request`` (in ``request.indexes`` order) from a 2xx reply.

        May raise ``ValueError``, ``KeyError``, ``TypeError`` or ``IndexError``
        on a body it cannot read: the base makes those messages ``unknown``.
        """
        raise NotImplementedError

    def parse_error(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome] | None:
        """Per-message outcomes for a non-2xx reply that names them, or None for the default."""
        return None

    # -- the send loop ---------------------------------------------------------

    async def open(self) -> None:
        # One client of one connection per request in flight, not one client with a
        # pool of ``concurrency``: httpcore's pool checks every connection it holds
        # (a poll() each) twice per request, at 16 connections 0.15-0.5 CPU-ms of a
        # 500-message Postmark request (issue 6, the HTTP path).
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        verify = httpx.create_ssl_context()  # one CA bundle load (~15 ms) for all of them
        self._clients = [
            httpx.AsyncClient(
                base_url=self.base_url,
                auth=self.auth(),
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept": "application/json",
                    # No compressed replies: the cap on a reply counts what is held in memory.
                    "Accept-Encoding": "identity",
                    **self.default_headers(),
                },
                limits=limits,
                verify=verify,
                # pool=None: a request waits for its connection as long as it takes;
                # ``_slots`` already bounds how many wait. ``_fetch`` bounds the whole exchange.
                timeout=httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout), pool=None),
                follow_redirects=False,
            )
            for _ in range(self.concurrency)
        ]
        self._idle = list(self._clients)
        self._slots = asyncio.Semaphore(self.concurrency)

    async def close(self) -> None:
        clients, self._clients, self._idle = self._clients, [], []
        for client in clients:
            await client.aclose()

    def inexpressible(self, message: Message) -> str | None:
        """Why no request the provider's API document allows can carry ``message``, or None.

        Such a message is ``permanent`` with that reason and goes in no request: the
        provider would refuse it anyway, and in a shared (substitution) request its
        refusal would send every other message of the request again one by one.
        """
        return None

    async def send_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        """One outcome per message, in order; requests of one batch go concurrently."""
        if not self._clients:
            raise TransportError("transport used before open()", transport=self.name, endpoint=self.base_url)
        refused = {i: why for i, m in enumerate(messages) if (why := self.inexpressible(m)) is not None}
        if not refused:
            return await self._send(messages)
        kept = [i for i in range(len(messages)) if i not in refused]
        outcomes = iter(await self._send([messages[i] for i in kept]) if kept else [])
        return [
            Outcome.permanent(None, f"{self.name}: {refused[i]}") if i in refused else next(outcomes)
            for i in range(len(messages))
        ]

    async def _send(self, messages: Sequence[Message]) -> list[Outcome]:
        requests = self.build_requests(messages)
        results = await asyncio.gather(*(self._exchange(request, messages) for request in requests))
        outcomes: list[Outcome | None] = [None] * len(messages)
        for request, request_outcomes in zip(requests, results, strict=True):
            for index, outcome in zip(request.indexes, request_outcomes, strict=True):
                outcomes[index] = outcome
        return [
            outcome or Outcome.unknown(f"{self.name}: no request carried this message")
            for outcome in outcomes
        ]

    async def _exchange(self, request: ApiRequest, messages: Sequence[Message]) -> list[Outcome]:
        carried = [messages[i] for i in request.indexes]
        count = len(carried)
        assert self._slots is not None
        async with self._slots:
            wait = self._not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.requests_made += 1
            content, headers = request.content, request.headers
            if request.json is not None:
                content, headers = json_bytes(request.json), {**headers, **JSON_CONTENT_TYPE}
            client = self._idle.pop()  # there is one for every slot
            try:
                response = await self._fetch(client, request, content, headers)
            finally:
                self._idle.append(client)
        if not isinstance(response, httpx.Response):
            return [response] * count
        outcomes = self._classify(request, response, carried)
        if request.fallback and 400 <= response.status_code < 500 and response.status_code not in NO_FALLBACK:
            log.info(
                "%s refused a shared request (HTTP %d); sending its %d messages one by one",
                self.name,
                response.status_code,
                count,
            )
            return await self._exchange_each(request, messages)
        return outcomes

    async def _fetch(
        self, client: httpx.AsyncClient, request: ApiRequest, content: bytes | None, headers: dict[str, str]
    ) -> httpx.Response | Outcome:
        """The reply, read whole within ``?timeout=`` and MAX_REPLY_BYTES, or the outcome of its loss.

        httpx's timeouts bound each read; a body that trickles a byte a second would
        never trip them. The deadline here covers connect, send and the whole body.
        """
        status: int | None = None  # known once the status line is in
        try:
            async with asyncio.timeout(self.timeout):
                async with client.stream(
                    request.method,
                    request.path,
                    files=_multipart(request.data, request.files),
                    content=content,
                    headers=headers,
                ) as streamed:
                    status = streamed.status_code
                    body = await _read_capped(streamed)
        except TimeoutError:
            return self._lost(status, f"no whole reply within ?timeout={self.timeout:g} s")
        except _TooLarge:
            return self._lost(status, f"reply larger than {MAX_REPLY_BYTES:,} bytes, not read")
        except httpx.TimeoutException as err:
            return self._lost(status, f"timed out ({type(err).__name__})")
        except httpx.TransportError as err:
            return self._lost(status, f"{type(err).__name__}: {err}")
        # The body as read, on a Response the provider parsers take as usual.
        kept = [(k, v) for k, v in streamed.headers.multi_items() if k.lower() != "content-encoding"]
        return httpx.Response(
            status, headers=kept, content=body, request=streamed.request, extensions=streamed.extensions
        )

    def _lost(self, status: int | None, why: str) -> Outcome:
        """A reply that did not come whole: ``unknown`` after a 2xx, else ``transient``.

        A 2xx says the provider took the request; which messages it accepted is in the
        body it did not finish, so never ``sent``, never retried here. Before the status
        line (or after another status) the messages are tried again.
        """
        if status is None:
            return Outcome.transient(None, f"{self.name}: {why}")
        if 200 <= status < 300:
            return Outcome.unknown(f"{self.name}: HTTP {status}, {why}; it may have been sent")
        return Outcome.transient(None, f"{self.name}: HTTP {status}, {why}")

    async def _exchange_each(self, request: ApiRequest, messages: Sequence[Message]) -> list[Outcome]:
        assert request.fallback is not None
        results = await asyncio.gather(*(self._exchange(single, messages) for single in request.fallback))
        by_index = {
            index: outcome
            for single, outcomes in zip(request.fallback, results, strict=True)
            for index, outcome in zip(single.indexes, outcomes, strict=True)
        }
        return [by_index.get(i) or Outcome.unknown(f"{self.name}: lost in fallback") for i in request.indexes]

    def _classify(
        self, request: ApiRequest, response: httpx.Response, carried: list[Message]
    ) -> list[Outcome]:
        status = response.status_code
        count = len(carried)
        if 200 <= status < 300:
            try:
                outcomes = self.parse_response(request, response, carried)
                if len(outcomes) != count:
                    raise ValueError(f"{len(outcomes)} results for {count} messages")
                return outcomes
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
                text = f"{self.name}: HTTP {status}, reply unreadable ({err}); it may have been sent"
                return [Outcome.unknown(text, status)] * count
        # Scrubbed before the cut: a cut must not leave half a key for the scrubber to miss.
        detail = f"{self.name}: HTTP {status}: " + self.scrub(error_detail(response), ERROR_TEXT_LIMIT)
        if status == 429 or status >= 500:
            retry_after = self.retry_after(response)
            if status == 429:
                wait = retry_after if retry_after is not None else 1.0
                self._not_before = max(self._not_before, time.monotonic() + wait)
            return [Outcome.transient(status, detail, retry_after)] * count
        try:
            specific = self.parse_error(request, response, carried)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            specific = None
        if specific is not None and len(specific) == count:
            return specific
        return [Outcome.permanent(status, detail)] * count

    def retry_after(self, response: httpx.Response) -> float | None:
        """Seconds to wait: ``Retry-After`` (seconds or HTTP-date, RFC 9110 10.2.3), else the reset header."""
        value = response.headers.get("retry-after")
        seconds = parse_retry_after(value) if value else None
        if seconds is None and self.reset_header:
            reset = response.headers.get(self.reset_header)
            try:
                number = float(reset) if reset else None
            except ValueError:
                number = None
            if number is not None:
                seconds = max(0.0, number - time.time()) if self.reset_is_epoch else max(0.0, number)
        return min(seconds, MAX_RETRY_AFTER) if seconds is not None else None


def _multipart(
    fields: list[tuple[str, str]] | None, files: list[tuple[str, tuple[str, bytes, str]]] | None
) -> list[tuple[str, tuple[str | None, bytes, str | None]]] | None:
    """A form as httpx's multipart parts, in order: each field a part without a file name
    (a plain form field, repeated names as repeated parts), then the files."""
    if fields is None and files is None:
        return None
    parts: list[tuple[str, tuple[str | None, bytes, str | None]]] = [
        (name, (None, value.encode(), None)) for name, value in fields or ()
    ]
    return parts + list(files or ())


class _TooLarge(Exception):
    """A reply body past MAX_REPLY_BYTES."""


async def _read_capped(response: httpx.Response) -> bytes:
    """The body, read as it streams in and dropped at MAX_REPLY_BYTES (:class:`_TooLarge`)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
        raise _TooLarge
    chunks = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def parse_retry_after(value: str) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP-date; None if neither."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def error_detail(response: httpx.Response) -> str:
    """The provider's error text: its JSON ``message``/``Message``/``error`` field, else the body."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "Message", "error", "ErrorMessage", "errors"):
            if body.get(key):
                value = body[key]
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                break
    # Whole: the caller scrubs secrets before it cuts the text to ERROR_TEXT_LIMIT.
    return " ".join(text.split()) or response.reason_phrase


def json_body(response: httpx.Response) -> Any:
    """The reply's JSON; ValueError (so the messages become ``unknown``) if it is not JSON."""
    return json_loads(response.content)


# -- helpers the provider files share ----------------------------------------


class Recipients(NamedTuple):
    """A message's addressees split as the APIs want them: (display name, address) pairs."""

    sender: tuple[str, str]
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    bcc: list[tuple[str, str]]
    reply_to: list[tuple[str, str]]


def recipients(message: Message) -> Recipients:
    """From, To, Cc, Reply-To from the rendered headers; Bcc is the envelope's remainder.

    One pass over the parsed address headers: this runs once per message of
    every HTTP batch.
    """
    sender: tuple[str, str] | None = None
    to: list[tuple[str, str]] = []
    cc: list[tuple[str, str]] = []
    reply_to: list[tuple[str, str]] = []
    for name, pairs in message.addresses:
        if name == "to":
            to += pairs
        elif name == "cc":
            cc += pairs
        elif name == "reply-to":
            reply_to += pairs
        elif name == "from" and sender is None and pairs:
            sender = pairs[0]
    shown = [address for _, address in to]
    if cc:
        shown += [address for _, address in cc]
    bcc: list[tuple[str, str]] = []
    if message.envelope_to != tuple(shown):  # the common case is equal: no Bcc, no duplicate
        comparable = {_comparable(address) for address in shown}
        bcc = [("", address) for address in message.envelope_to if _comparable(address) not in comparable]
    # The tuple built directly: a named tuple's generated __new__ is one more Python call a message.
    return tuple.__new__(Recipients, (sender or ("", message.envelope_from), to, cc, bcc, reply_to))


def _comparable(address: str) -> str:
    """An address as the envelope holds it (IDNA domain, lower case), for comparison only."""
    if address.isascii():  # what the renderer's addresses are: IDNA would change nothing but case
        return address.lower()
    local, _, domain = address.rpartition("@")
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")
    return f"{local}@{domain}".lower()


def format_address(name: str, address: str) -> str:
    """``"Name" <address>`` for APIs that take one string per address."""
    if not name:
        return address
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>'


def format_addresses(pairs: list[tuple[str, str]]) -> str:
    """An address list as one string, ``"Name" <address>, …``, for APIs that take it so."""
    if len(pairs) == 1:  # most To and Reply-To: no list to build and join
        return format_address(*pairs[0])
    return ", ".join([format_address(name, address) for name, address in pairs])


def subject_and_headers(message: Message, *, message_id: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """The Subject, and the headers an API takes as custom ones (all but the address fields; Message-ID).

    One pass over the headers, for the APIs that want both.
    """
    subject: str | None = None
    headers: list[tuple[str, str]] = []
    for name, value in message.headers:
        lowered = name.lower()
        if lowered not in ADDRESS_FIELDS:
            headers.append((name, value))
        elif subject is None and lowered == "subject":
            subject = value
    if message_id:
        headers.append(("Message-ID", message.message_id))
    return subject or "", headers


def custom_headers(message: Message, *, message_id: bool = True) -> list[tuple[str, str]]:
    """The headers an API takes as custom ones: all but the address fields; plus Message-ID."""
    return subject_and_headers(message, message_id=message_id)[1]


def batch_key(prefix: str, messages: Sequence[Message]) -> str:
    """An idempotency key from the batch's Message-IDs (from the campaign identity and row key).

    The same messages give the same key on every retry and after a resume, so a
    provider that honours the key collapses a duplicate; 64 hex characters fit
    every provider's limit (Resend, Nylas: 256).
    """
    digest = hashlib.sha256("\n".join(m.message_id for m in messages).encode()).hexdigest()
    return f"{prefix}-{digest[:48]}"


def url_host(url: TransportURL) -> str:
    """The URL's host part as written (case kept), without userinfo or port."""
    netloc = url.parts.netloc.rpartition("@")[2]
    return unquote(netloc.split(":")[0]) if not netloc.startswith("[") else netloc


def first_text(mapping: Mapping[str, Any], *keys: str) -> str:
    """The first non-empty string among ``keys`` of a JSON object."""
    for key in keys:
        value = mapping.get(key)
        if value:
            return str(value)
    return ""
