"""The SMTP dialogue on a connection aiosmtplib has set up: every reply accounted for.

aiosmtplib connects, says EHLO, upgrades with STARTTLS and logs in; its
protocol object reads one reply per command written, drops a line that arrives
between commands and pairs a line left over in its buffer with the next
command, so it can neither read the replies of a pipelined group nor notice a
server that has got out of step. Once a connection is ready,
:class:`ReplyReader` takes the transport over (``transport.set_protocol``) and
matches every reply, in order, to the command it answers.

A reply that cannot answer the command it is matched to means the connection is
out of step with the server, and the reader drops it at once: a reply with no
command awaiting one (an unsolicited line, or one too many in a pipelined
group), a code of the wrong class (DATA answered with anything but 354 or a
refusal; MAIL, RCPT, RSET or the end of the data with a 3yz), or a malformed
reply (RFC 5321 4.2: a code outside 2-5/0-5/0-9, the lines of one reply with
different codes). Nothing more is written on a dropped connection, so no
command can go out as message content. The outcomes are those of a lost
connection: ``unknown`` for a message whose content went out and whose
end-of-data reply was not read, ``transient`` for the others; never ``failed``
or ``sent`` from a reply that did not fit. (SMTP replies carry no tag: a stray
line that arrives while a reply is awaited and has the class that command
expects is taken for its reply; the real one then arrives with no command
awaiting it, and the connection is dropped there.)

:func:`send_pipelined` spends one round trip per message (RFC 2920): MAIL FROM,
every RCPT TO and DATA go in one write (RFC 2920 3.1: DATA ends a group); once
the 354 is in, the message content, its end-of-data dot and the next message's
MAIL/RCPT/DATA go in the next write, so the end-of-data reply of one message
and the command replies of the next come back together. :func:`send_lockstep`
awaits each reply before the next command, for servers that do not offer
PIPELINING (or ``?pipelining=false``).

A refused MAIL or DATA, or every recipient refused, is that message's outcome
(a lone dot is sent if the server said 354 anyway, RFC 2920 3.1), and the
connection is reset (RSET) for the next message. A connection lost, a reply
timed out or out of step after a message's content was written makes that
message ``unknown``; a message whose commands went out but whose content did
not is ``transient``; messages not begun are left to the caller.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiosmtplib import SMTPStatus

from .base import Message, Outcome, Status

_DOT_LINE = re.compile(rb"(?m)^\.")  # RFC 5321 4.5.2: a line starting with '.' gets another
# A reply is at most this long (all its lines): bounds memory against a babbling server.
MAX_REPLY_BYTES = 32 * 1024
_UNSAFE_ADDRESS = re.compile(r"[\r\n\x00<>]")  # would break out of a command line
# RFC 5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39, then "-" (more lines follow), SP text, or nothing.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.DOTALL)
END_OF_DATA = "the end of the data"  # what the reply after the content answers
OUT_OF_STEP = "replies out of step with the commands, connection dropped"


class Gone(Exception):
    """The connection closed, timed out or got out of step with the server; the text says which."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str


class ReplyReader(asyncio.Protocol):
    """The connection's protocol once it is set up: writes commands, and queues each complete
    reply that can answer the oldest command awaiting one; any other reply drops the connection."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: collections.deque[Reply] = collections.deque()
        self._code = b""  # the code of the reply whose lines are being read
        self._awaiting: collections.deque[str] = collections.deque()  # commands written, unanswered
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 1  # replies queued before the waiter is woken
        self._gone: str | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport, leftover: bytes = b"") -> ReplyReader:
        """Read the connection from now on; ``leftover`` is what the previous protocol had
        buffered and not read: lines no command asked for, so the reader drops them."""
        reader = cls(transport)
        transport.set_protocol(reader)
        if leftover:
            reader.data_received(leftover)
        return reader

    @property
    def alive(self) -> bool:
        return self._gone is None and not self.transport.is_closing()

    # -- asyncio.Protocol ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._gone is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            self._take_line(line)
        if self._gone is None and len(self._buffer) + sum(map(len, self._lines)) > MAX_REPLY_BYTES:
            self._drop("reply too long")
        self._wake()

    def _take_line(self, line: bytes) -> None:
        match = _REPLY_LINE.fullmatch(line)
        if match is None or (self._lines and match[1] != self._code):
            self._drop(f"{OUT_OF_STEP}: malformed reply line {line[:60]!r}")
            return
        self._code = match[1]
        self._lines.append((match[3] or b"").decode("utf-8", "surrogateescape"))
        if match[2] != b"-":
            self._answer(Reply(int(match[1]), "\n".join(self._lines)))
            self._lines = []

    def _answer(self, reply: Reply) -> None:
        """Queue ``reply`` as the answer to the oldest command awaiting one, if it can be."""
        if not self._awaiting:
            self._drop(f"{OUT_OF_STEP}: {_shown(reply)} answers no command")
        elif not fits(command := self._awaiting.popleft(), reply.code):
            self._drop(f"{OUT_OF_STEP}: {_shown(reply)} cannot answer {command}")
        else:
            self._replies.append(reply)

    def eof_received(self) -> bool:
        self._fail("the server closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection lost")

    # -- use -----------------------------------------------------------------

    def write(self, data: bytes, *answering: str) -> None:
        """Write ``data``, whose replies answer the commands named in ``answering``, in order."""
        if not self.alive:
            raise Gone(self._gone or "connection closing")
        self._awaiting.extend(answering)
        self.transport.write(data)

    async def ask(self, data: bytes, command: str, timeout: float) -> Reply:
        """Write one command and read its reply."""
        self.write(data, command)
        return await self.read(timeout)

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
        self._drop(f"no reply within {timeout:g} s")

    async def read(self, timeout: float) -> Reply:
        """The next reply, in order; raise :class:`Gone` if none can come."""
        while not self._replies:
            if self._gone is not None:
                raise Gone(self._gone)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                self._drop(f"no reply within {timeout:g} s")
                raise Gone(self._gone or "timeout") from None
            finally:
                self._waiter = None
        return self._replies.popleft()

    async def quit(self, timeout: float) -> None:
        """QUIT politely, then close; never raises."""
        try:
            await self.ask(b"QUIT\r\n", "QUIT", min(timeout, 5.0))
        except Gone:
            pass
        finally:
            self.transport.close()

    def _fail(self, text: str) -> None:
        if self._gone is None:
            self._gone = text
        self._wake()

    def _drop(self, text: str) -> None:
        """Give the connection up: nothing more is written on it, and what was queued stays readable."""
        self._fail(text)
        self.transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and (len(self._replies) >= self._wanted or self._gone is not None)
        ):
            waiter.set_result(None)


def _shown(reply: Reply) -> str:
    """A reply's code and first line, short, for an error text."""
    return repr(f"{reply.code} {reply.text.partition(chr(10))[0]}".strip()[:80])


def fits(command: str, code: int) -> bool:
    """Whether a reply with ``code`` can answer ``command`` (RFC 5321 4.2.1, 4.3.2).

    DATA is answered 354 or a refusal (4yz, 5yz); MAIL, RCPT, RSET, QUIT and the
    end of the data a completion (2yz) or a refusal; nothing is answered 1yz.
    """
    if code >= 400:
        return True
    if command == "DATA":
        return code == SMTPStatus.start_input
    return 200 <= code < 300


def _commands(message: Message) -> tuple[bytes, tuple[str, ...]]:
    """MAIL FROM, one RCPT TO per recipient, DATA (one pipelined group, RFC 2920 3.1), and
    the commands their replies answer."""
    parts = [f"MAIL FROM:<{message.envelope_from}>\r\n"]
    parts.extend(f"RCPT TO:<{recipient}>\r\n" for recipient in message.envelope_to)
    parts.append("DATA\r\n")
    return "".join(parts).encode("ascii"), ("MAIL", *("RCPT" for _ in message.envelope_to), "DATA")


def _content(message: Message) -> bytes:
    """The message, dot-stuffed (RFC 5321 4.5.2), ending in CRLF and the end-of-data dot."""
    raw = message.raw if message.raw.endswith(b"\r\n") else message.raw + b"\r\n"
    if raw.startswith(b".") or b"\n." in raw:  # most messages have no line to stuff
        raw = _DOT_LINE.sub(b"..", raw)
    return raw + b".\r\n"


def _unsafe(message: Message) -> Outcome | None:
    """Refuse an envelope address that would break out of its command line; render never
    lets one through, so this guards against a bug rather than input."""
    for address in (message.envelope_from, *message.envelope_to):
        if _UNSAFE_ADDRESS.search(address):
            return Outcome.permanent(None, f"unsafe envelope address {address!r}")
    return None


def classify(code: int, text: str) -> Outcome:
    """RFC 5321 4.2.1: 4yz is transient, 5yz permanent."""
    if 400 <= code < 500:
        return Outcome.transient(code, text)
    return Outcome.permanent(code, text)


def _refused(message: Message, replies: Sequence[Reply]) -> dict[str, Reply]:
    """The recipients whose RCPT was refused (4yz or 5yz), with their replies."""
    return {
        recipient: reply
        for recipient, reply in zip(message.envelope_to, replies, strict=True)
        if reply.code >= 400
    }


def _refused_outcome(refused: dict[str, Reply]) -> Outcome:
    """Every recipient refused: transient if any refusal was, so a retry may still reach them."""
    replies = list(refused.values())
    transient = [reply for reply in replies if 400 <= reply.code < 500]
    chosen = transient[0] if transient else replies[0]
    text = "; ".join(f"{recipient}: {reply.code} {reply.text}" for recipient, reply in refused.items())
    return classify(chosen.code, text)


def _sent_outcome(reply: Reply, refused: dict[str, Reply]) -> Outcome:
    """The end-of-data reply's outcome; a 2yz names the recipients refused on the way."""
    if reply.code >= 400:
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
        return self.decided or _sent_outcome(reply, self.refused)

    def lost(self, why: str) -> Outcome:
        if self.decided is not None:
            return self.decided
        return _lost_after(why)


def _lost_before(why: str) -> Outcome:
    return Outcome.transient(None, f"connection lost before the data was sent: {why}")


def _lost_after(why: str) -> Outcome:
    return Outcome.unknown(f"connection lost after the data was sent: {why}")


def _closing(reply: Reply) -> bool:
    """421: the server is closing the connection (RFC 5321 3.8)."""
    return reply.code == SMTPStatus.domain_unavailable


def _group_failure(message: Message, mail: Reply, refused: dict[str, Reply], data: Reply) -> Outcome | None:
    """The outcome of a message whose MAIL, every RCPT or DATA was refused; None if it may go."""
    if mail.code >= 400:
        return classify(mail.code, mail.text)
    if len(refused) == len(message.envelope_to):
        return _refused_outcome(refused)
    if data.code != SMTPStatus.start_input:
        return classify(data.code, data.text)
    return None


async def send_pipelined(
    reader: ReplyReader, messages: Sequence[Message], *, timeout: float
) -> tuple[list[Outcome], bool]:
    """Send ``messages`` on one pipelining connection.

    :returns: outcomes for the first ``len(outcomes)`` messages (all of them
        unless the connection was lost or closed with 421; at least one), and
        whether the connection can carry more.
    """
    unsafe = _unsafe(messages[0])
    if unsafe is not None:
        return [unsafe], True
    # Up to the next unsafe message: the caller comes back for the rest.
    messages = messages[: next((i for i in range(1, len(messages)) if _unsafe(messages[i])), len(messages))]
    outcomes: list[Outcome] = []
    group, answers = _commands(messages[0])
    try:
        reader.write(group, *answers)
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
            if _closing(reply):
                outcomes.append(classify(reply.code, reply.text))
                return outcomes, False
        # 2. This message's replies: [RSET], MAIL, RCPT…, DATA.
        replies: list[Reply] = []
        try:
            for _ in range(len(message.envelope_to) + 2 + reset_sent):
                reply = await reader.read(timeout)
                if _closing(reply):
                    return [*outcomes, classify(reply.code, reply.text)], False
                replies.append(reply)
        except Gone as gone:
            return [*outcomes, _lost_before(str(gone))], False
        mail, *rcpts, data = replies[reset_sent:]
        refused = _refused(message, rcpts)
        failure = _group_failure(message, mail, refused, data)
        # 3. Next write: this message's content (or a lone dot), RSET after a failure,
        #    and the next message's commands.
        out = bytearray()
        answering: list[str] = []
        if data.code == SMTPStatus.start_input:
            flight = _InFlight(message, refused, failure)
            out += b".\r\n" if failure is not None else _content(message)
            answering.append(END_OF_DATA)
        else:
            assert failure is not None
            outcomes.append(failure)
        reset_sent = failure is not None
        if reset_sent:
            out += b"RSET\r\n"
            answering.append("RSET")
        if index + 1 < len(messages):
            group, answers = _commands(messages[index + 1])
            out += group
            answering.extend(answers)
        try:
            reader.write(bytes(out), *answering)
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
        if _closing(reply):
            return outcomes, False
    if reset_sent:
        try:
            await reader.read(timeout)
        except Gone:
            return outcomes, False
    return outcomes, reader.alive


async def send_lockstep(
    reader: ReplyReader, messages: Sequence[Message], *, timeout: float
) -> tuple[list[Outcome], bool]:
    """Send ``messages`` one command at a time, each reply read before the next command
    (RFC 5321 without PIPELINING); returns what :func:`send_pipelined` returns."""
    outcomes: list[Outcome] = []
    for message in messages:
        if outcomes and not reader.alive:
            break  # dropped after the last message: the caller reconnects for the rest
        outcome = _unsafe(message) or await _transaction(reader, message, timeout)
        outcomes.append(outcome)
        if outcome.code == SMTPStatus.domain_unavailable:
            return outcomes, False
    return outcomes, reader.alive


async def _transaction(reader: ReplyReader, message: Message, timeout: float) -> Outcome:
    """MAIL, RCPT…, DATA and the content of one message, each reply awaited; a refusal is
    the outcome, and the connection is reset (RSET) for the next message."""
    try:
        mail = await reader.ask(f"MAIL FROM:<{message.envelope_from}>\r\n".encode("ascii"), "MAIL", timeout)
        if mail.code >= 400:
            return await _reset(reader, classify(mail.code, mail.text), timeout)
        rcpts = []
        for recipient in message.envelope_to:
            rcpts.append(await reader.ask(f"RCPT TO:<{recipient}>\r\n".encode("ascii"), "RCPT", timeout))
        refused = _refused(message, rcpts)
        if len(refused) == len(message.envelope_to):
            return await _reset(reader, _refused_outcome(refused), timeout)
        data = await reader.ask(b"DATA\r\n", "DATA", timeout)
        if data.code != SMTPStatus.start_input:
            return await _reset(reader, classify(data.code, data.text), timeout)
        reader.write(_content(message), END_OF_DATA)
    except Gone as gone:
        return _lost_before(str(gone))
    try:
        reply = await reader.read(timeout)
    except Gone as gone:
        return _lost_after(str(gone))
    return await _reset(reader, _sent_outcome(reply, refused), timeout)


async def _reset(reader: ReplyReader, outcome: Outcome, timeout: float) -> Outcome:
    """RSET after a failed transaction so the connection can carry the next message; none
    after a success, or a 421 (the server is closing)."""
    if outcome.status is not Status.SENT and outcome.code != SMTPStatus.domain_unavailable:
        # If RSET goes unanswered, the next message finds the connection gone: the caller reconnects.
        with contextlib.suppress(Gone):
            await reader.ask(b"RSET\r\n", "RSET", timeout)
    return outcome
