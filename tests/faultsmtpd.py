"""A hostile SMTP server for tests: aiosmtpd with faults injected where a test asks.

:class:`Faults` lists what goes wrong; a test builds one, starts a
:class:`FaultServer` with it and may change it between runs (the server reads it
on every command), e.g. clear it to play a server that has recovered.

Faults keyed by recipient fire for the message addressed to that recipient, at
a stage of its dialogue:

- ``rcpt``: at its RCPT command;
- ``data``: at the DATA command, before the 354 (nothing of the message sent);
- ``during-data``: after the 354, part-way through the content (the server
  never sees the final dot, so it cannot have taken the message);
- ``after-data``: after the final dot, the server has *taken* the message
  (it is in :attr:`FaultHandler.messages`) but its reply is lost.

``drop`` closes the connection at that stage without a reply, ``stall`` stops
answering (the client's ``?timeout=`` ends it); ``permanent`` answers the given
5xx reply at ``rcpt`` or ``data`` (after the content, like a content filter).

Replies out of step with the commands, for every message (issue 13):
``stray_after_data`` sends one more line after each end-of-data reply;
``unsolicited`` sends a line ahead of a command's reply (``MAIL``, ``RCPT`` or
``DATA``: to the client, a line that came before its command, or one reply too
many in a pipelined group); ``reply_for`` replaces the reply to ``RCPT``, to
``DATA`` (answered without 354, the server stays in command mode, so content
sent anyway would be read as commands) or to the ``end-of-data`` (the server has
taken the message: its reply counts as lost, as at ``after-data``). ``pipelining`` advertises
PIPELINING (RFC 2920), which aiosmtpd reads correctly but does not announce.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.smtpd import Received, free_port

DROP = "<drop>"  # a hook's answer that makes the server close the connection without a reply
STALL = "<stall>"  # ... that makes it stop answering
STALL_SECONDS = 60.0  # longer than any client timeout a test sets; bounded so no test hangs


@dataclass
class Faults:
    """What the server does wrong; every knob is off by default."""

    greeting_421: int = 0  # the first N connections are greeted "421" and closed
    greeting_stall: int = 0  # the first N connections get no greeting at all
    per_connection: int | None = None  # messages a connection may carry; then MAIL gets 421 + close
    drop: dict[str, str] = field(default_factory=dict)  # recipient -> stage
    stall: dict[str, str] = field(default_factory=dict)  # recipient -> stage
    permanent: dict[str, tuple[str, str]] = field(default_factory=dict)  # recipient -> (stage, reply)
    rcpt_transient_rate: float = 0.0  # share of RCPTs answered ``transient_reply``
    data_transient_rate: float = 0.0  # share of messages answered ``transient_reply`` after the data
    transient_reply: str = "451 4.3.0 temporary local problem, try again later"
    starttls: str | None = None  # offer STARTTLS and break it: "454", "drop" or "garbage"
    data_delay: float = 0.0  # seconds to sit on each message's content before answering
    stray_after_data: str | None = None  # one more reply line after each end-of-data reply
    unsolicited: dict[str, str] = field(default_factory=dict)  # verb -> a line sent ahead of its reply
    reply_for: dict[str, str] = field(default_factory=dict)  # "RCPT", "DATA", "end-of-data" -> reply
    pipelining: bool = False  # advertise PIPELINING; kept by clear(): a capability, not a fault
    # Called with the server's message number (1, 2, …) when the 354 has gone out and the content
    # is coming (``"during-data"``), and once it has taken the message but before replying
    # (``"after-data"``); the crash trials use it to SIGKILL the client at exactly those moments.
    on_data: Callable[[str, int], None] | None = None
    seed: int = 7

    def clear(self) -> None:
        """The server has recovered: no more faults."""
        fresh = Faults(seed=self.seed, pipelining=self.pipelining)
        for name in vars(fresh):
            setattr(self, name, getattr(fresh, name))


@dataclass
class FaultHandler:
    """Records what the server took and what it did wrong."""

    faults: Faults
    messages: list[Received] = field(default_factory=list)
    lost_replies: list[Received] = field(default_factory=list)  # taken, but the 250 never went out
    refused: list[tuple[str, str]] = field(default_factory=list)  # (recipient or stage, reply)
    # Every line read as message content (after a 354), also of messages never completed: a client
    # out of step with the server sends its next commands here.
    content_lines: list[bytes] = field(default_factory=list)
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.random = random.Random(self.faults.seed)

    def _stage(self, address: str, stage: str) -> str | None:
        if self.faults.drop.get(address) == stage:
            return DROP
        if self.faults.stall.get(address) == stage:
            return STALL
        found = self.faults.permanent.get(address)
        if found and found[0] == stage:
            self.refused.append((address, found[1]))
            return found[1]
        return None

    def stage_for(self, envelope: Envelope, stage: str) -> str | None:
        for address in envelope.rcpt_tos:
            answer = self._stage(address, stage)
            if answer:
                return answer
        return None

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.faults.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before the closing "250 HELP"
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if "RCPT" in self.faults.reply_for:
            return self.faults.reply_for["RCPT"]
        answer = self._stage(address, "rcpt")
        if answer:
            return answer
        with self.lock:
            transient = self.random.random() < self.faults.rcpt_transient_rate
        if transient:
            self.refused.append((address, self.faults.transient_reply))
            return self.faults.transient_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.faults.data_delay:
            await asyncio.sleep(self.faults.data_delay)
        received = Received(
            str(envelope.mail_from), list(envelope.rcpt_tos), bytes(envelope.original_content or b"")
        )
        answer = self.stage_for(envelope, "data")  # a content refusal (552, 554) after the data
        if answer and answer not in (DROP, STALL):
            return answer
        with self.lock:
            transient = self.random.random() < self.faults.data_transient_rate
        if transient:
            self.refused.append(("data", self.faults.transient_reply))
            return self.faults.transient_reply
        lost = self.stage_for(envelope, "after-data") or self.faults.reply_for.get("end-of-data")
        with self.lock:
            self.messages.append(received)  # taken: from here on the server has it
            number = len(self.messages)
            if lost:
                self.lost_replies.append(received)
        if self.faults.on_data is not None:
            self.faults.on_data("after-data", number)
        if lost:
            return lost
        stray = self.faults.stray_after_data
        return f"250 2.0.0 Ok: queued as F{number}" + (f"\r\n{stray}" if stray else "")

    def by_recipient(self) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {}
        for message in self.messages:
            for rcpt in message.rcpt_tos:
                found.setdefault(rcpt, []).append(message)
        return found


class FaultSMTP(SMTP):
    """aiosmtpd's server with the connection-level faults: greeting, caps, drops, stalls, STARTTLS."""

    handler: FaultHandler

    def __init__(self, handler: FaultHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.handler = handler
        self.carried = 0  # messages this connection has carried
        self.ahead: str | None = None  # an unsolicited line to send before the next reply
        self.in_data = False  # a 354 went out: the lines read now are message content

    def _record_content(self) -> None:
        """Wrap the stream reader so every line read after a 354 lands in ``content_lines``."""
        readuntil = self._reader.readuntil

        async def recording(separator: bytes = b"\n") -> bytes:
            line = await readuntil(separator)
            if self.in_data:
                with self.handler.lock:
                    self.handler.content_lines.append(line)
            return line

        self._reader.readuntil = recording  # type: ignore[method-assign]

    async def _handle_client(self) -> None:
        with self.handler.lock:
            self.handler.connections += 1
            number = self.handler.connections
        faults = self.handler.faults
        if number <= faults.greeting_421:
            await self.push("421 4.3.2 test.invalid service not available, closing connection")
            return
        if number <= faults.greeting_stall:
            await self._stall()
            return
        self._record_content()
        await super()._handle_client()

    async def push(self, status: Any) -> None:
        if status == DROP:
            self._close()
            return
        if status == STALL:
            await self._stall()
            return
        if self.ahead is not None:
            status, self.ahead = f"{self.ahead}\r\n{status}", None
        self.in_data = str(status).rsplit("\n", 1)[-1].startswith("354")
        await super().push(status)
        if str(status).startswith("421"):  # RFC 5321 3.8: 421 means the server closes the channel
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _stall(self) -> None:
        try:
            await asyncio.sleep(STALL_SECONDS)
        finally:  # also when the client gives up: close our half of the connection
            self._close()

    async def smtp_MAIL(self, arg: str | None) -> None:
        cap = self.handler.faults.per_connection
        if cap is not None and self.carried >= cap:
            await self.push(f"421 4.7.0 test.invalid too many messages on one connection (at most {cap})")
            return
        self.ahead = self.handler.faults.unsolicited.get("MAIL")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.ahead = self.handler.faults.unsolicited.get("RCPT")
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        faults = self.handler.faults
        if "DATA" in faults.reply_for:  # no 354: the server stays in command mode
            await self.push(faults.reply_for["DATA"])
            return
        self.ahead = faults.unsolicited.get("DATA")
        envelope = self.envelope
        if envelope is not None and envelope.rcpt_tos:
            answer = self.handler.stage_for(envelope, "data")
            if answer in (DROP, STALL):
                await self.push(answer)
                return
            if self.handler.stage_for(envelope, "during-data") in (DROP, STALL):
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                await self._reader.readuntil(b"\r\n")  # the first line of the content, then gone
                await self.push(self.handler.stage_for(envelope, "during-data"))
                return
        if self.handler.faults.on_data is not None:
            await self._data_with_hook(arg)
        else:
            await super().smtp_DATA(arg)
        self.carried += 1

    async def _data_with_hook(self, arg: str) -> None:
        """Let ``on_data`` act as soon as the 354 has gone out (the client is sending the content)."""
        hook = self.handler.faults.on_data
        assert hook is not None
        with self.handler.lock:
            number = len(self.handler.messages) + 1
        original_push = self.push

        async def push_then_hook(status: Any) -> None:
            await original_push(status)
            if str(status).startswith("354"):
                hook("during-data", number)

        self.push = push_then_hook  # type: ignore[method-assign]
        try:
            await super().smtp_DATA(arg)
        finally:
            del self.push

    async def smtp_STARTTLS(self, arg: str) -> None:
        mode = self.handler.faults.starttls
        if mode == "454":
            await self.push("454 4.7.0 TLS not available due to local problem")
        elif mode == "drop":
            await self.push("220 2.0.0 Ready to start TLS")
            self._close()
        elif mode == "garbage":
            await self.push("220 2.0.0 Ready to start TLS")
            assert self.transport is not None
            self._writer.write(b"this is not a TLS handshake\r\n" * 20)
            await self._writer.drain()
            self.transport.abort()
        else:
            await super().smtp_STARTTLS(arg)


class FaultServer:
    """The hostile server on a free loopback port; ``faults`` may change while it runs."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.handler = FaultHandler(self.faults)
        handler = self.handler
        tls_context: ssl.SSLContext | None = None
        if self.faults.starttls:
            # Only offered so it can be broken: the context is never used for a handshake.
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

        def factory() -> SMTP:
            return FaultSMTP(
                handler, hostname="test.invalid", tls_context=tls_context, require_starttls=False
            )

        self.controller = Controller(handler, hostname="127.0.0.1", port=free_port())
        self.controller.factory = factory  # type: ignore[method-assign]

    def start(self) -> FaultServer:
        greeting_faults = self.faults.greeting_421, self.faults.greeting_stall
        # The Controller's own readiness probe must not meet the greeting faults.
        self.faults.greeting_421 = self.faults.greeting_stall = 0
        self.controller.start()
        self.handler.connections = 0
        self.faults.greeting_421, self.faults.greeting_stall = greeting_faults
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def port(self) -> int:
        return int(self.controller.port)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages
