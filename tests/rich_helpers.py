"""Shared by the rich-content tests: a real aiosmtpd server on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    """One message as the server got it: envelope and raw bytes."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    def parsed(self, *, strict: bool = False) -> EmailMessage:
        policy = email.policy.strict if strict else email.policy.default
        message = email.message_from_bytes(self.data, policy=policy)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class Inbox:
    port: int
    messages: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?starttls=never"


class _Handler:
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.inbox.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 OK"


@contextmanager
def smtp_inbox() -> Iterator[Inbox]:
    """A running aiosmtpd server on 127.0.0.1, port 0 (the OS picks), collecting every message."""
    inbox = Inbox(0)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            loop.create_server(lambda: SMTP(_Handler(inbox), hostname="127.0.0.1"), "127.0.0.1", 0)
        )
        holder["server"] = server
        inbox.port = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "aiosmtpd did not start"
    try:
        yield inbox
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
