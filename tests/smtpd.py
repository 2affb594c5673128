"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, recording what it receives.

Tests steer it per recipient (``refuse`` answers 550 to RCPT, ``defer`` 451)
and read back every message, envelope and connection it saw.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


@dataclass
class Received:
    """One message as the server took it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def message_id(self) -> str:
        found = re.search(rb"(?im)^Message-ID:\s*(\S+)", self.data)
        return found.group(1).decode() if found else ""

    def parsed(self, *, strict: bool = False) -> EmailMessage:
        policy = email.policy.strict if strict else email.policy.default
        message = email.message_from_bytes(self.data, policy=policy)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class RecordingHandler:
    """Records messages; answers RCPT with 550/451 for the addresses tests name."""

    refuse: dict[str, str] = field(default_factory=dict)
    defer: dict[str, str] = field(default_factory=dict)
    defer_data_times: int = 0  # answer 451 to this many DATA transactions first
    data_delay: float = 0.0  # seconds to sit on each message before answering (a slow server)
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pipelining: bool = True  # advertise PIPELINING (RFC 2920), as Postfix does
    transactions: int = 0  # MAIL commands seen

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # aiosmtpd reads pipelined commands correctly but does not say so.
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before the closing "250 HELP"
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        with self.lock:
            self.transactions += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        if address in self.defer:
            return self.defer[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self.lock:
            if self.defer_data_times > 0:
                self.defer_data_times -= 1
                return "451 4.3.0 try again later"
            self.messages.append(
                Received(
                    str(envelope.mail_from), list(envelope.rcpt_tos), bytes(envelope.original_content or b"")
                )
            )
            number = len(self.messages)
        return f"250 2.0.0 Ok: queued as Q{number}"

    def by_recipient(self) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {}
        for message in self.messages:
            for rcpt in message.rcpt_tos:
                found.setdefault(rcpt, []).append(message)
        return found


class ConnectionStats:
    """How many connections were opened and how many were open at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.open_now = 0
        self.most_at_once = 0

    def opened_one(self) -> None:
        with self.lock:
            self.opened += 1
            self.open_now += 1
            self.most_at_once = max(self.most_at_once, self.open_now)

    def closed_one(self) -> None:
        with self.lock:
            self.open_now -= 1


class CountingSMTP(SMTP):
    stats: ConnectionStats

    def connection_made(self, transport: Any) -> None:
        self.stats.opened_one()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed_one()
        super().connection_lost(exc)


def free_port() -> int:
    """A loopback port nobody listens on (aiosmtpd's Controller cannot report a port-0 bind)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SmtpServer:
    """aiosmtpd on a free loopback port; ``tls_context`` makes it implicit TLS (smtps)."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        starttls_context: ssl.SSLContext | None = None,
        login: tuple[str, str] | None = None,
        data_delay: float = 0.0,
    ) -> None:
        self.handler = RecordingHandler()
        self.stats = ConnectionStats()
        stats = self.stats
        handler = self.handler

        class Factory(CountingSMTP):
            pass

        Factory.stats = stats

        handler.data_delay = data_delay

        def authenticate(
            server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
        ) -> AuthResult:
            good = login is not None and (auth_data.login, auth_data.password) == (
                login[0].encode(),
                login[1].encode(),
            )
            return AuthResult(success=good, handled=False)

        def factory() -> SMTP:
            return Factory(
                handler,
                tls_context=starttls_context,
                require_starttls=False,
                hostname="test.invalid",
                authenticator=authenticate if login else None,
                auth_require_tls=False,
            )

        self.controller = Controller(
            handler,
            hostname="127.0.0.1",
            port=free_port(),
            ssl_context=tls_context,
            server_hostname="localhost",
        )
        self.controller.factory = factory  # type: ignore[method-assign]

    def start(self) -> SmtpServer:
        self.controller.start()
        # The Controller connects once to see the server is up; forget that connection.
        deadline = time.monotonic() + 5
        while self.stats.open_now and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stats.opened = self.stats.most_at_once = 0
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def port(self) -> int:
        return int(self.controller.port)

    def snapshot(self) -> list[tuple[float, str, str]]:
        """``(monotonic time, recipient, Message-ID)`` for every recipient received so far."""
        with self.handler.lock:
            received = list(self.handler.messages)
        return [(m.at, rcpt, m.message_id) for m in received for rcpt in m.rcpt_tos]

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?starttls=never"

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages
