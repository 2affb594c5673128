"""``maildir://DIR``: deliver each message as a file into a Maildir.

The quick start's default: a newcomer with no mail server runs a real campaign
and opens what was "sent" (any mail client reads a Maildir; each file in
``DIR/new`` is one RFC 5322 message). ``maildir://outbox`` is relative to the
working directory, ``maildir:///var/mail/out`` absolute. Files are written to
``tmp/`` and renamed into ``new/``, the Maildir way to never expose half a file.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from ..errors import ConfigError, TransportError
from .base import Message, Outcome, Transport, TransportURL


class MaildirTransport(Transport):
    """Writes messages into ``DIR/new``; the provider id is the file name."""

    schemes: ClassVar[tuple[str, ...]] = ("maildir",)
    max_batch: ClassVar[int] = 500
    name: ClassVar[str] = "maildir"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        location = url.text.split("://", 1)[1].split("?", 1)[0]
        if not location:
            raise ConfigError("maildir:// needs a folder, e.g. maildir://outbox", option="--transport")
        self.directory = Path(location)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._sequence = 0

    async def open(self) -> None:
        try:
            for sub in ("tmp", "new", "cur"):
                (self.directory / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TransportError(
                f"cannot create the Maildir: {err.strerror}",
                transport=self.name,
                endpoint=str(self.directory),
            ) from err

    async def send_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        return await asyncio.to_thread(self._write_all, messages)

    def _write_all(self, messages: Sequence[Message]) -> list[Outcome]:
        outcomes = []
        for message in messages:
            self._sequence += 1
            name = f"{time.time_ns() // 1000}.P{os.getpid()}Q{self._sequence}.{self._host}"
            temporary = self.directory / "tmp" / name
            try:
                temporary.write_bytes(message.raw)
                temporary.rename(self.directory / "new" / name)
            except OSError as err:
                outcomes.append(Outcome.transient(None, f"cannot write {temporary}: {err.strerror}"))
            else:
                outcomes.append(Outcome.sent(name))
        return outcomes
