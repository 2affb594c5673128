"""``null://``: accepts every message and sends nothing (benchmarks, pipeline checks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from .base import Message, Outcome, Transport


class NullTransport(Transport):
    """Every message is ``sent`` at once; the provider id is its Message-ID."""

    schemes: ClassVar[tuple[str, ...]] = ("null",)
    max_batch: ClassVar[int] = 1000
    name: ClassVar[str] = "null"

    async def send_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        return [Outcome.sent(message.message_id) for message in messages]
