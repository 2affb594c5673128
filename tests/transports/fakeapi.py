"""A real HTTP server on 127.0.0.1 (port 0) that answers as the email APIs' references say.

One server speaks every provider, by path: Postmark ``/email/batch``, Resend
``/emails/batch`` and ``/emails``, Mailjet ``/v3.1/send``, SendGrid
``/v3/mail/send``, Mailgun ``/v3/{domain}/messages``, SES
``/v2/email/outbound-emails``, Nylas ``/v3/grants/{grant}/messages/send``,
and our webhook ``/hook``. Each handler checks the auth header, the batch
limit and the required fields the way the provider does, and records every
message it would deliver, *after* the provider's own substitution (SendGrid
``substitutions``, Mailgun ``%recipient.x%``), so tests compare what a
recipient would get with what Jinja rendered.

Failures are injected with :meth:`FakeApi.fail` (the next N requests get a
given status, headers and body) and :attr:`FakeApi.bad` (addresses the
provider refuses, answered per message where the provider does so).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

KEYS = {
    "postmark": "pm-token-SECRET-1111",
    "resend": "re_SECRET_2222",
    "mailjet_public": "mj-public-3333",
    "mailjet_private": "mj-private-SECRET-4444",
    "sendgrid": "SG.SECRET.5555",
    "mailgun": "key-SECRET-6666",
    "aws_id": "AKIDEXAMPLE7777",
    "aws_secret": "aws-SECRET-8888",
    "nylas": "nyk_SECRET_9999",
    "webhook": "whsec-SECRET-0000",
}
LIMITS = {"postmark": 500, "resend": 100, "mailjet": 50, "sendgrid": 1000, "mailgun": 1000}
_MAILGUN_VAR = re.compile(r"%recipient\.([A-Za-z0-9_]+)%")


@dataclass
class Delivery:
    """One message as its recipient would get it."""

    provider: str
    to: list[str]
    subject: str
    text: str | None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Captured:
    """One request exactly as it reached the server, to check against the provider's own API document."""

    method: str
    path: str
    headers: list[tuple[str, str]]  # as received, names in their case, in order
    body: bytes


RESET = -1  # an injected "status": the connection drops in the middle of the reply
TRUNCATED = -2  # an injected "status": a 200 whose body is cut short
STREAMED = -3  # an injected "status": a body streamed slowly (trickle) or without end (flood)


@dataclass
class Injected:
    status: int  # 0: no reply of its own, only a delay
    headers: dict[str, str]
    body: bytes
    delay: float = 0.0
    echo: Callable[[dict[str, str]], bytes] | None = None  # the body, made from the request's headers
    # status, bytes, bytes a write, seconds between writes, Content-Length sent
    stream: tuple[int, int, int, float, bool] | None = None


class Reply(Exception):
    """Raised by a handler to answer at once."""

    def __init__(self, status: int, body: Any = b"", headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = headers or {}


class FakeApi:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.requests: Counter[str] = Counter()  # provider -> requests received
        self.request_times: list[tuple[str, float]] = []
        self.bad: set[str] = set()
        self.captured: list[Captured] = []  # every POST, raw (tests/transports/specs.py checks them)
        self.seen_idempotency: dict[str, int] = {}
        self.keys_seen: list[str] = []  # Idempotency-Key of every request that had one
        self._injected: deque[Injected] = deque()
        self._lock = threading.Lock()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def fail(
        self,
        times: int,
        status: int,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
        raw: bytes | None = None,
    ) -> None:
        """The next ``times`` requests get ``status`` (before any check); ``raw`` is the body as is."""
        if raw is None:
            raw = json.dumps(body if body is not None else {"message": f"injected {status}"}).encode()
        for _ in range(times):
            self._injected.append(Injected(status, headers or {}, raw))

    def echo(self, status: int, body: Callable[[dict[str, str]], bytes]) -> None:
        """The next request gets ``status`` and ``body(its headers)``: a proxy that quotes the request."""
        self._injected.append(Injected(status, {"Content-Type": "text/plain"}, b"", echo=body))

    def stream(
        self, status: int, size: int, *, chunk: int = 1 << 20, interval: float = 0.0, declared: bool = True
    ) -> None:
        """The next request gets ``status`` and a body of ``size`` bytes, written ``chunk`` bytes at a
        time ``interval`` seconds apart (a trickle, or a flood); its length declared up front, or
        (``declared=False``) only by the connection's close."""
        self._injected.append(Injected(STREAMED, {}, b"", stream=(status, size, chunk, interval, declared)))

    def delay(self, seconds: float) -> None:
        """The next request is handled normally, but only after ``seconds``."""
        self._injected.append(Injected(0, {}, b"", seconds))

    def next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"id-{self._counter:06d}"

    def deliver(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    # -- the HTTP plumbing -----------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # /stats: what the server saw, for benchmarks
                payload = json.dumps(
                    {"requests": dict(api.requests), "deliveries": len(api.deliveries)}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with api._lock:
                    api.captured.append(Captured("POST", self.path, list(self.headers.items()), body))
                try:
                    status, payload, headers = api.handle(self.path, dict(self.headers.items()), body)
                except Reply as reply:
                    status, payload, headers = reply.status, reply.body, reply.headers
                if status in (RESET, TRUNCATED):
                    self.broken_reply(status, payload)
                    return
                if status == STREAMED:
                    self.streamed_reply(*json.loads(payload))
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if status != 204:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def streamed_reply(
                self, status: int, size: int, chunk: int, interval: float, declared: bool
            ) -> None:
                """``size`` bytes of blanks, ``chunk`` at a time; stops when the client goes."""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if declared:
                    self.send_header("Content-Length", str(size))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                piece = b" " * chunk
                try:
                    while size > 0:
                        self.wfile.write(piece[:size])
                        self.wfile.flush()
                        size -= chunk
                        time.sleep(interval)
                except OSError:  # the client gave up: what the tests want
                    pass
                self.close_connection = True
                if not declared:
                    with contextlib.suppress(OSError):  # the client may have closed first
                        self.connection.shutdown(socket.SHUT_RDWR)

            def broken_reply(self, how: int, payload: bytes) -> None:
                """RESET: half a status line, then the connection closes. TRUNCATED: a 200 whose
                body stops short of its Content-Length (the request may well have been acted on)."""
                if how == RESET:
                    self.wfile.write(b"HTTP/1.1 2")
                else:
                    self.wfile.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(payload) + 100}\r\n\r\n".encode()
                        + payload[: len(payload) // 2]
                    )
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        return Handler

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, dict[str, str]]:
        headers = {k.lower(): v for k, v in headers.items()}
        provider = self._provider(path)
        with self._lock:
            self.requests[provider] += 1
            self.request_times.append((provider, time.monotonic()))
            if "idempotency-key" in headers:
                self.keys_seen.append(headers["idempotency-key"])
            injected = self._injected.popleft() if self._injected else None
        if injected is not None and injected.delay:
            time.sleep(injected.delay)
        if injected is not None and injected.echo is not None:
            raise Reply(injected.status, injected.echo(headers), injected.headers)
        if injected is not None and injected.stream is not None:
            return STREAMED, json.dumps(injected.stream).encode(), {}
        if injected is not None and injected.status and injected.status != TRUNCATED:
            raise Reply(injected.status, injected.body, injected.headers)
        handler = getattr(self, f"_{provider}", None)
        if handler is None:
            raise Reply(404, {"message": f"no such endpoint {path}"})
        result = handler(path, headers, body)
        status, payload = result[0], result[1]
        if injected is not None and injected.status == TRUNCATED:
            status = TRUNCATED  # the messages were taken; only the reply is cut short
        extra = result[2] if len(result) > 2 else {}
        return status, payload if isinstance(payload, bytes) else json.dumps(payload).encode(), extra

    @staticmethod
    def _provider(path: str) -> str:
        path = path.split("?")[0]
        if path == "/email/batch":
            return "postmark"
        if path in {"/emails/batch", "/emails"}:
            return "resend"
        if path == "/v3.1/send":
            return "mailjet"
        if path == "/v3/mail/send":
            return "sendgrid"
        if re.fullmatch(r"/v3/[^/]+/messages", path):
            return "mailgun"
        if path == "/v2/email/outbound-emails":
            return "ses"
        if re.fullmatch(r"/v3/grants/[^/]+/messages/send", path):
            return "nylas"
        if path == "/hook":
            return "webhook"
        return "unknown"

    # -- providers ---------------------------------------------------------------

    def _postmark(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        # https://postmarkapp.com/developer/api/overview: 10 = bad or missing server token (HTTP 401)
        if headers.get("x-postmark-server-token") != KEYS["postmark"]:
            raise Reply(401, {"ErrorCode": 10, "Message": "No Account or Server API tokens were supplied"})
        messages = json.loads(body)
        if len(messages) > LIMITS["postmark"]:
            raise Reply(422, {"ErrorCode": 410, "Message": "Too many batch messages."})
        results = []
        for message in messages:
            if not message.get("From") or not message.get("To"):
                results.append({"ErrorCode": 300, "Message": "Invalid email request"})
                continue
            if not (message.get("TextBody") or message.get("HtmlBody")):
                results.append(
                    {"ErrorCode": 300, "Message": "Provide either email TextBody or HtmlBody or both."}
                )
                continue
            to = [a.strip() for a in message["To"].split(",")]
            if any(_address(a) in self.bad for a in to):
                results.append(
                    {
                        "ErrorCode": 406,
                        "Message": "You tried to send to a recipient that has been marked as inactive.",
                    }
                )
                continue
            hdrs = {h["Name"]: h["Value"] for h in message.get("Headers", [])}
            self.deliver(
                Delivery(
                    "postmark", to, message["Subject"], message.get("TextBody"), message.get("HtmlBody"), hdrs
                )
            )
            results.append(
                {"ErrorCode": 0, "Message": "OK", "MessageID": self.next_id(), "To": message["To"]}
            )
        return 200, results

    def _resend(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if headers.get("authorization") != f"Bearer {KEYS['resend']}":
            raise Reply(401, {"statusCode": 401, "name": "missing_api_key", "message": "Missing API key"})
        key = headers.get("idempotency-key")
        if key:
            self.seen_idempotency[key] = self.seen_idempotency.get(key, 0) + 1
        emails = json.loads(body)
        single = path == "/emails"
        if single:
            emails = [emails]
        elif len(emails) > LIMITS["resend"]:
            raise Reply(422, {"statusCode": 422, "name": "validation_error", "message": "Too many emails"})
        permissive = headers.get("x-batch-validation") == "permissive"
        data, errors = [], []
        for index, email in enumerate(emails):
            missing = [f for f in ("from", "to", "subject") if not email.get(f)]
            if not single and "attachments" in email:
                raise Reply(
                    422, {"statusCode": 422, "name": "validation_error", "message": "attachments not allowed"}
                )
            if missing or any(_address(a) in self.bad for a in email["to"]):
                message = f"Missing `{missing[0]}` field." if missing else "Invalid `to` field."
                if single or not permissive:
                    raise Reply(422, {"statusCode": 422, "name": "validation_error", "message": message})
                errors.append({"index": index, "message": message})
                continue
            self.deliver(
                Delivery(
                    "resend",
                    email["to"],
                    email["subject"],
                    email.get("text"),
                    email.get("html"),
                    email.get("headers", {}),
                )
            )
            data.append({"id": self.next_id()})
        if single:
            return 200, data[0]
        return 200, {"data": data, **({"errors": errors} if permissive else {})}

    def _mailjet(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        expected = base64.b64encode(f"{KEYS['mailjet_public']}:{KEYS['mailjet_private']}".encode()).decode()
        if headers.get("authorization") != f"Basic {expected}":
            raise Reply(
                401,
                {
                    "ErrorIdentifier": "x",
                    "StatusCode": 401,
                    "ErrorMessage": "API key authentication/authorization failure.",
                },
            )
        messages = json.loads(body)["Messages"]
        if len(messages) > LIMITS["mailjet"]:
            raise Reply(400, {"ErrorMessage": "Too many messages", "StatusCode": 400})
        results = []
        any_error = False
        for message in messages:
            to = [c["Email"] for c in message.get("To", [])]
            if not message.get("From") or not to or any(a in self.bad for a in to):
                any_error = True
                results.append(
                    {
                        "Status": "error",
                        "Errors": [
                            {
                                "ErrorIdentifier": "f987008f-251a-4dff-8ffc-40f1583ad7bc",
                                "ErrorCode": "mj-0013",
                                "StatusCode": 400,
                                "ErrorMessage": '"bad@example.org" is an invalid email address.',
                                "ErrorRelatedTo": ["To[0].Email"],
                            }
                        ],
                    }
                )
                continue
            self.deliver(
                Delivery(
                    "mailjet",
                    to,
                    message["Subject"],
                    message.get("TextPart"),
                    message.get("HTMLPart"),
                    message.get("Headers", {}),
                )
            )
            results.append(
                {
                    "Status": "success",
                    "CustomID": message.get("CustomID", ""),
                    "To": [
                        {"Email": a, "MessageUUID": self.next_id(), "MessageID": 1, "MessageHref": ""}
                        for a in to
                    ],
                    "Cc": [],
                    "Bcc": [],
                }
            )
        return (400 if any_error else 200), {"Messages": results}

    def _sendgrid(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        if headers.get("authorization") != f"Bearer {KEYS['sendgrid']}":
            raise Reply(
                401,
                {
                    "errors": [
                        {
                            "message": "The provided authorization grant is invalid, expired, or revoked",
                            "field": None,
                        }
                    ]
                },
            )
        mail = json.loads(body)
        personalizations = mail.get("personalizations") or []
        if not personalizations:
            raise Reply(
                400,
                {
                    "errors": [
                        {
                            "message": "You must have at least one personalization.",
                            "field": "personalizations",
                        }
                    ]
                },
            )
        if len(personalizations) > LIMITS["sendgrid"]:
            raise Reply(
                400,
                {
                    "errors": [
                        {
                            "message": "The personalization block is limited to 1000 personalizations per API request.",  # noqa: E501
                            "field": "personalizations",
                        }
                    ]
                },
            )
        seen: set[str] = set()
        for p in personalizations:
            for contact in p.get("to", []) + p.get("cc", []) + p.get("bcc", []):
                address = contact["email"].lower()
                if address in seen:
                    raise Reply(
                        400,
                        {
                            "errors": [
                                {
                                    "message": "Each email address in the personalization block should be unique",  # noqa: E501
                                    "field": "personalizations",
                                }
                            ]
                        },
                    )
                seen.add(address)
                if address in self.bad:
                    raise Reply(
                        400,
                        {
                            "errors": [
                                {
                                    "message": "Does not contain a valid address.",
                                    "field": "personalizations.0.to.0.email",
                                }
                            ]
                        },
                    )
            subs = p.get("substitutions") or {}
            if sum(len(k.encode()) + len(v.encode()) for k, v in subs.items()) > 10_000:
                raise Reply(
                    400, {"errors": [{"message": "substitutions too large", "field": "personalizations"}]}
                )
        if not mail.get("from") or not mail.get("content"):
            raise Reply(
                400,
                {
                    "errors": [
                        {"message": "The from object must be provided for every email send.", "field": "from"}
                    ]
                },
            )
        for p in personalizations:
            subs = p.get("substitutions") or {}
            parts = {}
            for content in mail["content"]:
                value = content["value"]
                for tag, sub in subs.items():  # substitutions "apply to the text and html content"
                    value = value.replace(tag, sub)
                parts[content["type"]] = value
            subject = p.get("subject", mail.get("subject", ""))
            for tag, sub in subs.items():
                subject = subject.replace(tag, sub)
            hdrs = {**mail.get("headers", {}), **p.get("headers", {})}
            self.deliver(
                Delivery(
                    "sendgrid",
                    [c["email"] for c in p["to"]],
                    subject,
                    parts.get("text/plain"),
                    parts.get("text/html"),
                    hdrs,
                )
            )
        return 202, b"", {"X-Message-Id": self.next_id()}

    def _mailgun(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        expected = base64.b64encode(f"api:{KEYS['mailgun']}".encode()).decode()
        if headers.get("authorization") != f"Basic {expected}":
            raise Reply(401, b"Forbidden")
        form = _parse_form(headers.get("content-type", ""), body)
        to = form.get("to", [])
        if not form.get("from") or not to:
            raise Reply(400, {"message": "'from' parameter is missing"})
        if len(to) > LIMITS["mailgun"]:
            raise Reply(400, {"message": "Too many recipients"})
        if any(_address(a) in self.bad for a in to):
            raise Reply(400, {"message": "to parameter is not a valid address. please check documentation"})
        variables = None
        if "recipient-variables" in form:
            variables = {k.lower(): v for k, v in json.loads(form["recipient-variables"][0]).items()}
        subject = form.get("subject", [""])[0]
        text = form.get("text", [None])[0]
        html = form.get("html", [None])[0]
        hdrs = {k[2:]: v[0] for k, v in form.items() if k.startswith("h:")}
        if variables is None:
            self.deliver(Delivery("mailgun", to, subject, text, html, hdrs))
        else:
            for recipient in to:
                values = variables.get(_address(recipient), {})

                def sub(text: str | None, values: dict[str, str] = values) -> str | None:
                    if text is None:
                        return None
                    return _MAILGUN_VAR.sub(lambda m: str(values.get(m.group(1), m.group(0))), text)

                self.deliver(Delivery("mailgun", [recipient], sub(subject) or "", sub(text), sub(html), hdrs))
        return 200, {"id": f"<{self.next_id()}@mg.example.com>", "message": "Queued. Thank you."}

    def _ses(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if not self._sigv4_ok(path, headers, body):
            raise Reply(
                403,
                {"message": "The request signature we calculated does not match the signature you provided."},
                {"x-amzn-ErrorType": "SignatureDoesNotMatch"},
            )
        request = json.loads(body)
        raw = base64.b64decode(request["Content"]["Raw"]["Data"])
        parsed = BytesParser(policy=HTTP).parsebytes(raw)
        to = request["Destination"]["ToAddresses"]
        if any(a in self.bad for a in to):
            raise Reply(
                400, {"message": "Email address is not verified."}, {"x-amzn-ErrorType": "MessageRejected"}
            )
        text = parsed.get_body(("plain",))
        html = parsed.get_body(("html",))
        self.deliver(
            Delivery(
                "ses",
                to,
                str(parsed["Subject"]),
                text.get_content().replace("\r\n", "\n") if text is not None else None,
                html.get_content() if html is not None else None,
                {"Message-ID": str(parsed["Message-ID"])},
            )
        )
        return 200, {"MessageId": self.next_id()}

    def _sigv4_ok(self, path: str, headers: dict[str, str], body: bytes) -> bool:
        auth = headers.get("authorization", "")
        match = re.match(
            r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d+)/([^/]+)/ses/aws4_request, SignedHeaders=([^,]+), Signature=(\w+)",  # noqa: E501
            auth,
        )
        if not match or match.group(1) != KEYS["aws_id"]:
            return False
        signed = match.group(4).split(";")
        request = AWSRequest(
            method="POST",
            url=f"http://{headers['host']}{path}",
            data=body,
            headers={h: headers[h] for h in signed if h != "host"},
        )
        request.context["timestamp"] = headers["x-amz-date"]
        signer = SigV4Auth(Credentials(KEYS["aws_id"], KEYS["aws_secret"]), "ses", match.group(3))
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        return hmac.compare_digest(expected, match.group(5))

    def _nylas(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        if headers.get("authorization") != f"Bearer {KEYS['nylas']}":
            raise Reply(
                401, {"request_id": "r", "error": {"type": "unauthorized", "message": "Unauthorized"}}
            )
        key = headers.get("idempotency-key")
        replay = False
        if key:
            with self._lock:
                replay = key in self.seen_idempotency
                self.seen_idempotency[key] = self.seen_idempotency.get(key, 0) + 1
        message = json.loads(body)
        to = [c["email"] for c in message.get("to", [])]
        if not to:
            raise Reply(
                400,
                {"request_id": "r", "error": {"type": "invalid_request_error", "message": "to is required"}},
            )
        if any(a in self.bad for a in to):
            raise Reply(
                400,
                {
                    "request_id": "r",
                    "error": {"type": "invalid_request_error", "message": "invalid recipient"},
                },
            )
        grant = path.split("/")[3]
        if not replay:
            text = message["body"] if message.get("is_plaintext") else None
            html = None if message.get("is_plaintext") else message["body"]
            hdrs = {h["name"]: h["value"] for h in message.get("custom_headers", [])}
            self.deliver(Delivery("nylas", to, message["subject"], text, html, hdrs))
        return (
            200,
            {"request_id": "r", "grant_id": grant, "data": {"id": self.next_id()}},
            ({"Idempotent-Response": "true"} if replay else {}),
        )

    def _webhook(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        stamp = headers.get("x-mergekit-timestamp", "")
        expected = hmac.new(
            KEYS["webhook"].encode(), stamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        if headers.get("x-mergekit-signature") != f"sha256={expected}":
            raise Reply(401, {"message": "bad signature"})
        results = []
        for message in json.loads(body)["messages"]:
            if any(a in self.bad for a in message["to"]):
                results.append({"status": "permanent", "error": "recipient refused"})
                continue
            self.deliver(
                Delivery("webhook", message["to"], message["subject"], message["text"], message["html"])
            )
            results.append({"status": "sent", "id": self.next_id()})
        return 200, {"results": results}


def _address(value: str) -> str:
    match = re.search(r"<([^>]+)>\s*$", value)
    return (match.group(1) if match else value).strip().lower()


def _parse_form(content_type: str, body: bytes) -> dict[str, list[str]]:
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        form: dict[str, list[str]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                continue
            # A field's text is UTF-8 (RFC 7578 section 5.1; what HTML forms and httpx send),
            # not the us-ascii that a MIME text part without a charset would be read as
            payload = part.get_payload(decode=True)
            form.setdefault(str(name), []).append(payload.decode("utf-8") if payload else "")
        return form
    return parse_qs(body.decode(), keep_blank_values=True)
