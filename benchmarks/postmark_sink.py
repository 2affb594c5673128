"""A fast local stand-in for Postmark's batch endpoint, for the HTTP-path benchmark (issue 6).

``python -m benchmarks.postmark_sink`` prints the port it listens on (127.0.0.1),
then serves ``POST /email/batch`` until killed; ``GET /stats`` answers the
requests and messages it took. uvicorn (httptools, uvloop) and starlette, in its
own process, with TCP_NODELAY on every connection: the benchmark measures the
client's transport, so the server must answer quickly and off the client's core.

It still does a real server's share, per request: parse the JSON, check the
server token and the batch limit, check each message's required fields as
Postmark does (``From``, ``To``, and ``TextBody`` or ``HtmlBody``), and answer
one result per message in Postmark's shape (``ErrorCode``, ``Message``,
``MessageID``, ``SubmittedAt``, ``To``), in request order. The tests' stand-in
(tests/transports/fakeapi.py) speaks every provider and injects faults; this
one speaks Postmark only, fast.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.transports.fakeapi import KEYS, LIMITS

try:
    from orjson import dumps, loads
except ImportError:  # the stdlib does the same, slower
    from json import loads

    def dumps(value: Any, /) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


_ids = itertools.count(1)
_seen = {"requests": 0, "messages": 0}


def _reply(status: int, body: Any) -> Response:
    return Response(dumps(body), status, media_type="application/json")


def _result(message: Any) -> dict[str, Any]:
    """Postmark's per-message result: ErrorCode 0 and a MessageID, or ErrorCode 300 and why."""
    if not isinstance(message, dict) or not message.get("From") or not message.get("To"):
        return {"ErrorCode": 300, "Message": "Invalid email request"}
    if not (message.get("TextBody") or message.get("HtmlBody")):
        return {"ErrorCode": 300, "Message": "Provide either email TextBody or HtmlBody or both."}
    return {
        "ErrorCode": 0,
        "Message": "OK",
        "MessageID": f"bench-{next(_ids):08d}",
        "SubmittedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "To": message["To"],
    }


async def batch(request: Request) -> Response:
    # https://postmarkapp.com/developer/api/overview: ErrorCode 10 = bad or missing server token (HTTP 401)
    if request.headers.get("x-postmark-server-token") != KEYS["postmark"]:
        return _reply(401, {"ErrorCode": 10, "Message": "No Account or Server API tokens were supplied"})
    try:
        messages = loads(await request.body())
    except ValueError:
        return _reply(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    if not isinstance(messages, list):
        return _reply(422, {"ErrorCode": 402, "Message": "Received invalid JSON input."})
    if len(messages) > LIMITS["postmark"]:
        return _reply(422, {"ErrorCode": 410, "Message": "Too many batch messages."})
    _seen["requests"] += 1
    _seen["messages"] += len(messages)
    return _reply(200, [_result(message) for message in messages])


async def stats(request: Request) -> Response:
    return _reply(200, _seen)


app = Starlette(routes=[Route("/email/batch", batch, methods=["POST"]), Route("/stats", stats)])


def main() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
    listener.bind(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, loop="uvloop", http="httptools")
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
