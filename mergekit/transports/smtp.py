"""``smtp://`` and ``smtps://``: a pool of reused aiosmtplib connections.

``smtp://[user[:password]@]host[:port][?starttls=auto|always|never]`` speaks
plain SMTP on port 25 (587 with a user) and upgrades with STARTTLS when the
server offers it (``auto``), insists on it (``always``) or never tries
(``never``). ``smtps://`` is implicit TLS on port 465. Certificates are
verified; ``?tls_verify=false`` turns that off for self-signed test servers and
says so on every run; ``?ca_file=PATH`` trusts a private CA instead. The
password may also come from ``MERGEKIT_SMTP_PASSWORD``.
Credentials are never sent over a cleartext connection to a non-loopback host.

Each connection carries many messages (reconnecting after ``?max_per_connection``
messages, on 421 and when the server drops it). A message's dialogue is MAIL,
RCPT per recipient, DATA; a refusal is that message's outcome and the
connection is reset (RSET) and reused. A reply lost after the data went out
makes the outcome ``unknown``: the server may have taken the message.

aiosmtplib sets a connection up (greeting, EHLO, STARTTLS, login); the messages
then go through :mod:`.pipelining`'s reply reader, which matches every reply to
its command and drops a connection whose replies are out of step. Where the
server advertises PIPELINING (RFC 2920) a connection spends one round trip per
message instead of four, with the same outcomes; ``?pipelining=false`` keeps
the classic dialogue everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import unquote

import aiosmtplib
from aiosmtplib import SMTPStatus

from ..errors import ConfigError, TransportError
from .base import OUTCOME_TEXT_LIMIT, Message, Outcome, Transport, TransportURL, is_loopback
from .pipelining import ReplyReader, send_lockstep, send_pipelined

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds to wait for any one reply before the connection is given up
DEFAULT_MAX_PER_CONNECTION = 1000  # messages before a fresh connection: bounds server-side state


@dataclass
class _Pooled:
    """A pooled connection: set up by aiosmtplib, then read by a :class:`ReplyReader`.

    aiosmtplib drops a line that arrives between commands and pairs a line left
    in its buffer with the next command: it cannot tell that the server is out
    of step. The reader takes the transport over as soon as the connection is
    ready, and accounts for every reply from then on.
    """

    smtp: aiosmtplib.SMTP
    reader: ReplyReader
    pipelining: bool  # the server advertised PIPELINING (RFC 2920)
    used: int = 0

    @classmethod
    def take_over(cls, smtp: aiosmtplib.SMTP) -> _Pooled:
        protocol = smtp.protocol
        if protocol is None or protocol.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        # Bytes aiosmtplib read past the last reply it was asked for: lines no command asked for.
        # (A private attribute of aiosmtplib 5; without it, such a line goes unseen as before.)
        leftover = bytes(getattr(protocol, "_buffer", b""))
        reader = ReplyReader.take_over(protocol.transport, leftover)  # type: ignore[arg-type]
        return cls(smtp, reader, smtp.supports_extension("pipelining"))

    @property
    def alive(self) -> bool:
        return self.reader.alive

    def close(self) -> None:
        self.reader.transport.close()
        self.smtp.close()

    async def quit(self, timeout: float) -> None:
        await self.reader.quit(timeout)
        self.smtp.close()


class SmtpTransport(Transport):
    """An SMTP client pool of ``concurrency`` connections; a batch uses one connection."""

    schemes: ClassVar[tuple[str, ...]] = ("smtp", "smtps")
    max_batch: ClassVar[int] = 100
    batch_is_request: ClassVar[bool] = False
    name: ClassVar[str] = "smtp"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        parts = url.parts
        self.implicit_tls = url.scheme == "smtps"
        if not parts.hostname:
            raise ConfigError(
                f"{url.redacted} names no host",
                option="--transport",
                hint="Use e.g. smtp://mail.example.com:587",
            )
        self.host = parts.hostname
        self.username = unquote(parts.username) if parts.username else None
        self._password = (
            unquote(parts.password) if parts.password else os.environ.get("MERGEKIT_SMTP_PASSWORD")
        )
        self.scrub.add(self._password)  # a server may quote AUTH's base64 back in a reply
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{url.redacted} has a bad port", option="--transport") from None
        self.port = port or (465 if self.implicit_tls else 587 if self.username else 25)
        self.starttls = url.query.get("starttls", "auto").lower()
        if self.starttls not in {"auto", "always", "never"}:
            raise ConfigError(
                f"?starttls={self.starttls!r} must be auto, always or never", option="--transport"
            )
        self.verify = url.flag("tls_verify", True)
        self.timeout = _positive(url, "timeout", float, DEFAULT_TIMEOUT)
        self.max_per_connection = int(_positive(url, "max_per_connection", int, DEFAULT_MAX_PER_CONNECTION))
        self.pipelining = url.flag("pipelining", True)
        self.endpoint = f"{self.host}:{self.port}"
        if self.username and self._password is None:
            raise ConfigError(
                f"{url.redacted} names user {self.username!r} but no password",
                option="--transport",
                hint="Put it in the URL or in MERGEKIT_SMTP_PASSWORD",
            )
        if (
            self.username
            and not self.implicit_tls
            and self.starttls == "never"
            and not is_loopback(self.host)
        ):
            raise ConfigError(
                f"{url.redacted} would send the password in clear text (starttls=never)",
                option="--transport",
                hint="Use smtps://, or starttls=auto|always",
            )
        self._idle: list[_Pooled] = []
        self._closed_after: Counter[int] = Counter()  # 421s seen after N messages on a connection
        self._slots = concurrency  # connections at once; lowered when the server refuses more
        self._busy = 0  # batches holding a slot
        self._slot_free = asyncio.Condition()
        self._tls_context: ssl.SSLContext | None = None
        ca_file = url.query.get("ca_file")
        if ca_file:
            try:
                self._tls_context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"cannot load ?ca_file={ca_file}: {err}", option="--transport") from None
        if not self.verify:
            log.warning(
                "TLS certificate verification is OFF for %s (?tls_verify=false): "
                "use this only with a test server",
                self.endpoint,
            )
            self._tls_context = ssl.create_default_context()
            self._tls_context.check_hostname = False
            self._tls_context.verify_mode = ssl.CERT_NONE

    async def open(self) -> None:
        """Connect once to fail early on a wrong host, TLS or password; keep it in the pool.

        A greeting that says "not now" (4yz, e.g. 421 when the server has too many
        connections) is not a wrong host: the batches meet it again as transient
        outcomes, which dispatch retries and defers.
        """
        try:
            self._idle.append(await self._connect())
        except TransportError as err:
            if not err.greeting or err.code is None or not 400 <= err.code < 500:
                raise
            log.warning("%s: %s; the batches will retry", self.endpoint, err.message)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for pooled in idle:
            await pooled.quit(self.timeout)

    async def _connect(self) -> _Pooled:
        start_tls: bool | None = {"auto": None, "always": True, "never": False}[self.starttls]
        connection = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.implicit_tls,
            start_tls=False if self.implicit_tls else start_tls,
            validate_certs=self.verify,
            tls_context=self._tls_context,
            timeout=self.timeout,
        )
        try:
            await connection.connect()
            if self.username:
                if not _is_encrypted(connection) and not is_loopback(self.host):
                    raise ConfigError(
                        f"{self.endpoint} offers no TLS; the password is not sent in clear text",
                        option="--transport",
                        hint="Use smtps:// or a server that offers STARTTLS",
                    )
                await connection.login(self.username, self._password or "")
            if connection.is_ehlo_or_helo_needed:  # no STARTTLS or login asked for it: say EHLO now
                try:
                    await connection.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await connection.helo()
            return _Pooled.take_over(connection)
        except aiosmtplib.SMTPAuthenticationError as err:
            await _quietly_quit(connection)
            raise ConfigError(
                f"{self.endpoint} refused the login for {self.username!r}: "
                f"{err.code} {self.scrub(err.message, OUTCOME_TEXT_LIMIT)}",
                option="--transport",
                hint="Check the user and password",
            ) from None
        except aiosmtplib.SMTPException as err:
            connection.close()
            code = err.code if isinstance(err, aiosmtplib.SMTPResponseException) else None
            failure = TransportError(
                self.scrub(f"cannot connect: {_describe(err)}", OUTCOME_TEXT_LIMIT),
                transport=self.name,
                endpoint=self.endpoint,
                code=code,
                reply=self.scrub(err.message, OUTCOME_TEXT_LIMIT) if code is not None else None,
            )
            failure.greeting = isinstance(err, aiosmtplib.SMTPConnectResponseError)
            raise failure from None
        except OSError as err:
            connection.close()
            raise TransportError(
                f"cannot connect: {err.strerror or err}", transport=self.name, endpoint=self.endpoint
            ) from None

    async def send_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        async with self._slot_free:
            await self._slot_free.wait_for(lambda: self._busy < self._slots)
            self._busy += 1
        try:
            return await self._send_batch(messages)
        finally:
            async with self._slot_free:
                self._busy -= 1
                self._slot_free.notify_all()

    async def _send_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        pooled = self._idle.pop() if self._idle else None
        index = 0
        while index < len(messages):
            if pooled is None or not pooled.alive or pooled.used >= self.max_per_connection:
                if pooled is not None:
                    await pooled.quit(self.timeout)
                try:
                    pooled = await self._connect()
                except TransportError as err:
                    if err.greeting and err.code == SMTPStatus.domain_unavailable:
                        await self._fewer_connections(err)
                    outcomes.extend(Outcome.transient(err.code, str(err)) for _ in messages[index:])
                    return outcomes
            chunk = messages[index : index + self.max_per_connection - pooled.used]
            dialogue = send_pipelined if self.pipelining and pooled.pipelining else send_lockstep
            done, alive = await dialogue(pooled.reader, chunk, timeout=self.timeout)
            outcomes.extend(done)
            index += len(done)
            closed_at = next((i for i, o in enumerate(done) if o.code == SMTPStatus.domain_unavailable), None)
            if closed_at is not None:  # 421: the server closed this connection (RFC 5321 3.8)
                self._learn_cap(pooled.used + closed_at)
            pooled.used += len(done)
            if not alive:
                pooled.close()
                pooled = None
        if pooled is not None and pooled.alive:
            if len(self._idle) < self._slots:
                self._idle.append(pooled)
            else:
                await pooled.quit(self.timeout)
        return outcomes

    async def _fewer_connections(self, err: TransportError) -> None:
        """A 421 greeting while others are open: the server wants fewer connections; use fewer.

        Postfix answers "421 4.7.0 Error: too many connections" above
        ``smtpd_client_connection_count_limit``. Batches then wait for a free
        connection instead of taking the same refusal again.
        """
        others = self._busy - 1
        if others < 1 or others >= self._slots:
            return
        self._slots = others
        log.warning(
            "%s refused another connection (%s %s): using at most %d",
            self.endpoint,
            err.code,
            err.reply,
            others,
        )
        while len(self._idle) > self._slots:
            await self._idle.pop(0).quit(self.timeout)

    def _learn_cap(self, carried: int) -> None:
        """A server that closes with 421 after the same number of messages twice has a cap: keep under it.

        Reconnecting before the cap spares each of those messages a refusal and a retry.
        """
        if carried < 1 or carried >= self.max_per_connection:
            return
        self._closed_after[carried] += 1
        if self._closed_after[carried] >= 2:
            log.info(
                "%s closes connections after %d messages; reconnecting before that", self.endpoint, carried
            )
            self.max_per_connection = carried


def _positive(url: TransportURL, name: str, kind: type[float] | type[int], default: float) -> float:
    """A positive number from the URL's query, or a ConfigError naming it."""
    text = url.query.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"?{name}={text!r} in the transport URL must be a positive "
            + ("whole number" if kind is int else "number of seconds"),
            option="--transport",
            hint=f"Write e.g. ?{name}={default:g}",
        )
    return value


async def _quietly_quit(connection: aiosmtplib.SMTP) -> None:
    try:
        if connection.is_connected:
            await connection.quit()
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        connection.close()


def _is_encrypted(connection: aiosmtplib.SMTP) -> bool:
    return connection.get_transport_info("sslcontext") is not None


def _describe(err: BaseException) -> str:
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return f"{err.code} {err.message}"
    return str(err) or type(err).__name__


__all__ = ["SmtpTransport"]
