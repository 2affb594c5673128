"""SMTP command pipelining (RFC 2920) on a connection aiosmtplib has set up.

aiosmtplib connects, says EHLO, upgrades with STARTTLS and logs in; its
protocol object reads one reply per command written and drops what arrives
before it asks, so it cannot read the replies of a pipelined group. Once a
connection is ready, :class:`ReplyReader` takes the transport over
(``transport.set_protocol``) and queues every reply in order.

:func:`send_pipelined` then spends one round trip per message: MAIL FROM, every
RCPT TO and DATA go in one write (RFC 2920 3.1: DATA ends a group); once the
354 is in, the message content, its end-of-data dot and the next message's
MAIL/RCPT/DATA go in the next write, so the end-of-data reply of one message
and the command replies of the next come back together.

Outcomes are those of the classic dialogue: a refused MAIL or DATA, or every
recipient refused, is that message's outcome (a lone dot is sent if the server
said 354 anyway, RFC 2920 3.1), and the next group starts with RSET. A
connection lost or a reply timed out after a message's content was written
makes that message ``unknown``; a message whose commands went out but whose
content did not is ``transient``; messages not begun are left to the caller.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiosmtplib import SMTPStatus

from .base import Message, Outcome

_DOT_LINE = re.compile(rb"(?m)^\.")  # RFC 5321 4.5.2: a line starting with '.' gets another
# A reply is at most this long (all its lines): bounds memory against a babbling server.
MAX_REPLY_BYTES = 32 * 1024
_UNSAFE_ADDRESS = re.compile(r"[\r\n\x00<>]")  # would break out of a command line
RCPT_ACCEPTED = frozenset({SMTPStatus.completed, SMTPStatus.will_forward})


class Gone(Exception):
    """The connection closed, timed out or answered nonsense; the text says which."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str


class ReplyReader(asyncio.Protocol):
    """The connection's protocol once it pipelines: writes bytes, queues complete replies."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 1  # replies queued before the waiter is woken
        self._gone: str | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport) -> ReplyReader:
        reader = cls(transport)
        transport.set_protocol(reader)
        return reader

    @property
    def alive(self) -> bool:
        return self._gone is None and not self.transport.is_closing()

    # -- asyncio.Protocol ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(f"malformed reply line {line[:60]!r}")
                self.transport.close()
                return
            self._lines.append(line[4:].decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                self._replies.append(Reply(int(line[:3]), "\n".join(self._lines)))
                self._lines = []
        if len(self._buffer) + sum(map(len, self._lines)) > MAX_REPLY_BYTES:
            self._fail("reply too long")
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        self._fail("the server closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection lost")

    # -- use -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.alive:
            raise Gone(self._gone or "connection closing")
        self.transport.write(data)

    async def ready(self, count: int, timeout: float) -> None:
        """Wait until ``count`` replies are queued or the connection is gone (one wake-up,
        not one per reply); never raises: the reads that follow say what was lost."""
        if len(self._replies) >= count or self._gone is not None:
            return
        loop = asyncio.get_running_loop()
        self._wanted = count
        self._waiter = loop.create_future()
        # A timer handle rather than asyncio.wait_for: this runs once per message, and
        # wait_for wraps every wait in a task and callbacks of its own.
        timer = loop.call_later(timeout, self._time_out, timeout)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._wanted = 1

    def _time_out(self, timeout: float) -> None:
        self._fail(f"no reply within {timeout:g} s")
        self.transport.close()

    async def read(self, timeout: float) -> Reply:
        """The next reply, in order; raise :class:`Gone` if none can come."""
        while not self._replies:
            if self._gone is not None:
                raise Gone(self._gone)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                self._fail(f"no reply within {timeout:g} s")
                self.transport.close()
                raise Gone(self._gone or "timeout") from None
            finally:
                self._waiter = None
        return self._replies.popleft()

    async def quit(self, timeout: float) -> None:
        """QUIT politely, then close; never raises."""
        try:
            self.write(b"QUIT\r\n")
            await self.read(min(timeout, 5.0))
        except Gone:
            pass
        finally:
            self.transport.close()

    def _fail(self, text: str) -> None:
        if self._gone is None:
            self._gone = text
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and (len(self._replies) >= self._wanted or self._gone is not None)
        ):
            waiter.set_result(None)


def commands(message: Message) -> bytes:
    """MAIL FROM, one RCPT TO per recipient, DATA: one pipelined group (RFC 2920 3.1)."""
    parts = [f"MAIL FROM:<{message.envelope_from}>\r\n"]
    parts.extend(f"RCPT TO:<{recipient}>\r\n" for recipient in message.envelope_to)
    parts.append("DATA\r\n")
    return "".join(parts).encode("ascii")


def content(message: Message) -> bytes:
    """The message, dot-stuffed (RFC 5321 4.5.2), ending in CRLF and the end-of-data dot."""
    raw = message.raw if message.raw.endswith(b"\r\n") else message.raw + b"\r\n"
    if raw.startswith(b".") or b"\n." in raw:  # most messages have no line to stuff
        raw = _DOT_LINE.sub(b"..", raw)
    return raw + b".\r\n"


def classify(code: int, text: str) -> Outcome:
    """RFC 5321 4.2.1: 4yz is transient, 5yz permanent."""
    if 400 <= code < 500:
        return Outcome.transient(code, text)
    return Outcome.permanent(code, text)


def refused_outcome(refused: dict[str, Reply]) -> Outcome:
    """Every recipient refused: transient if any refusal was, so a retry may still reach them."""
    replies = list(refused.values())
    transient = [reply for reply in replies if 400 <= reply.code < 500]
    chosen = transient[0] if transient else replies[0]
    text = "; ".join(f"{recipient}: {reply.code} {reply.text}" for recipient, reply in refused.items())
    return classify(chosen.code, text)


def sent_outcome(reply: Reply, refused: dict[str, Reply]) -> Outcome:
    """The end-of-data reply's outcome; a 250 names the recipients refused on the way."""
    if reply.code != SMTPStatus.completed:
        return classify(reply.code, reply.text)
    partial = ""
    if refused:
        partial = "; refused: " + ", ".join(f"{r} {c.code} {c.text}" for r, c in refused.items())
    match = re.search(r"queued as (\S+)", reply.text)  # Postfix: "2.0.0 Ok: queued as 4Xy…"
    return Outcome.sent(match.group(1) if match else None, reply.code, reply.text + partial)


@dataclass
class _InFlight:
    """A message after its 354: its content (or a lone dot) written, its end-of-data reply due."""

    message: Message
    refused: dict[str, Reply] = field(default_factory=dict)
    decided: Outcome | None = None  # set when only a lone dot went: nothing was delivered

    def answered(self, reply: Reply) -> Outcome:
        return self.decided or sent_outcome(reply, self.refused)

    def lost(self, why: str) -> Outcome:
        if self.decided is not None:
            return self.decided
        return Outcome.unknown(f"connection lost after the data was sent: {why}")


def _lost_before(why: str) -> Outcome:
    return Outcome.transient(None, f"connection lost before the data was sent: {why}")


async def send_pipelined(
    reader: ReplyReader, messages: Sequence[Message], *, timeout: float
) -> tuple[list[Outcome], bool]:
    """Send ``messages`` on one pipelining connection.

    :returns: outcomes for the first ``len(outcomes)`` messages (all of them
        unless the connection was lost or closed with 421; at least one), and
        whether the connection can carry more.
    """
    for position, message in enumerate(messages):
        unsafe = [a for a in (message.envelope_from, *message.envelope_to) if _UNSAFE_ADDRESS.search(a)]
        if unsafe:  # render never lets these through; refuse rather than inject commands
            if position == 0:
                return [Outcome.permanent(None, f"unsafe envelope address {unsafe[0]!r}")], True
            messages = messages[:position]  # the caller comes back for the rest
            break
    outcomes: list[Outcome] = []
    try:
        reader.write(commands(messages[0]))
    except Gone as gone:
        return [_lost_before(str(gone))], False
    flight: _InFlight | None = None
    reset_sent = False
    for index, message in enumerate(messages):
        await reader.ready((flight is not None) + reset_sent + len(message.envelope_to) + 2, timeout)
        # 1. The previous message's end-of-data reply.
        if flight is not None:
            try:
                reply = await reader.read(timeout)
            except Gone as gone:
                return [*outcomes, flight.lost(str(gone)), _lost_before(str(gone))], False
            outcomes.append(flight.answered(reply))
            flight = None
            if reply.code == SMTPStatus.domain_unavailable:  # 421: closing (RFC 5321 3.8)
                outcomes.append(classify(reply.code, reply.text))
                return outcomes, False
        # 2. This message's replies: [RSET], MAIL, RCPT…, DATA.
        replies: list[Reply] = []
        try:
            for _ in range(len(message.envelope_to) + 2 + reset_sent):
                reply = await reader.read(timeout)
                if reply.code == SMTPStatus.domain_unavailable:  # 421: closing
                    return [*outcomes, classify(reply.code, reply.text)], False
                replies.append(reply)
        except Gone as gone:
            return [*outcomes, _lost_before(str(gone))], False
        mail, *rcpts, data = replies[reset_sent:]
        refused = {
            recipient: reply
            for recipient, reply in zip(message.envelope_to, rcpts, strict=True)
            if reply.code not in RCPT_ACCEPTED
        }
        failure: Outcome | None = None
        if mail.code != SMTPStatus.completed:
            failure = classify(mail.code, mail.text)
        elif len(refused) == len(message.envelope_to):
            failure = refused_outcome(refused)
        elif data.code != SMTPStatus.start_input:
            failure = classify(data.code, data.text)
        # 3. Next write: this message's content (or a lone dot), RSET after a failure,
        #    and the next message's commands.
        out = bytearray()
        if data.code == SMTPStatus.start_input:
            flight = _InFlight(message, refused, failure)
            out += b".\r\n" if failure is not None else content(message)
        else:
            assert failure is not None
            outcomes.append(failure)
        reset_sent = failure is not None
        if reset_sent:
            out += b"RSET\r\n"
        if index + 1 < len(messages):
            out += commands(messages[index + 1])
        try:
            reader.write(bytes(out))
        except Gone as gone:
            # Nothing of this write left: the content was not sent.
            if flight is not None:
                outcomes.append(flight.decided or _lost_before(str(gone)))
            return outcomes, False
    # The last message's end-of-data reply, and the trailing RSET's.
    await reader.ready((flight is not None) + reset_sent, timeout)
    if flight is not None:
        try:
            reply = await reader.read(timeout)
        except Gone as gone:
            return [*outcomes, flight.lost(str(gone))], False
        outcomes.append(flight.answered(reply))
        if reply.code == SMTPStatus.domain_unavailable:
            return outcomes, False
    if reset_sent:
        try:
            await reader.read(timeout)
        except Gone:
            return outcomes, False
    return outcomes, reader.alive
