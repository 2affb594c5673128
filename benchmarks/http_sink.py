"""The fake email-API server of the tests, in its own process: a local stand-in for Postmark & co.

``python -m benchmarks.http_sink`` prints the port it listens on, then serves
until killed. ``GET /stats`` answers the requests seen per provider and the
messages delivered. It checks auth, limits and fields as the tests' server
does (tests/transports/fakeapi.py), with the tests' keys.
"""

from __future__ import annotations

import time

from tests.transports.fakeapi import FakeApi


def main() -> None:
    with FakeApi() as api:
        print(api.port, flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
