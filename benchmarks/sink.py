"""A counting aiosmtpd sink in its own process, so it does not share a core's GIL with the sender.

``python -m benchmarks.sink PORT`` accepts every message and discards it; it
prints ``ready`` once listening. It is a Python server, so it bounds what any
client can reach; the Postfix ``smtp-sink`` benchmarks remove that bound.
"""

from __future__ import annotations

import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class Discard:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok: queued"


def main() -> None:
    controller = Controller(Discard(), hostname="127.0.0.1", port=int(sys.argv[1]))
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
