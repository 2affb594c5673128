"""``postmark://``: Postmark's batch endpoint, up to 500 messages per request.

``postmark://[:TOKEN@][?message_stream=outbound&base_url=…]``; the server token
comes from the URL's password or ``$POSTMARK_SERVER_TOKEN``.

Reference: https://postmarkapp.com/developer/user-guide/send-email-with-api/batch-emails
and https://postmarkapp.com/developer/api/email-api (fields), .../api/overview (error codes).

- "the batch endpoint accepts up to 500 messages per API call, and up to 50 MB
  payload size, including attachments": ``max_batch`` is 500; a batch whose
  JSON is larger than 50 MB is split into several requests.
- The body is a JSON array of messages; auth is ``X-Postmark-Server-Token``.
- "the /batch endpoint will return a 200-level http status, even when
  validation for individual messages may fail [...] the results are ordered the
  same as the original messages": each entry's ``ErrorCode`` 0 means accepted
  with ``MessageID``; any other code is that message's permanent failure (e.g.
  406 "You tried to send to a recipient that has been marked as inactive"),
  except ErrorCode 429 ("Rate limit exceeded"), which is transient.
- Request-level problems (bad token: ErrorCode 10; malformed body) come back
  as HTTP 401 / 422 and fail every message of the request.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx

from .base import Message, Outcome, TransportURL
from .http import (
    JSON_CONTENT_TYPE,
    ApiRequest,
    HttpTransport,
    format_address,
    format_addresses,
    json_body,
    json_bytes,
    recipients,
    subject_and_headers,
)

MAX_REQUEST_BYTES = 50 * 1024 * 1024  # "up to 50 MB payload size, including attachments"
RATE_LIMITED = 429  # Postmark's per-message ErrorCode for "Rate limit exceeded"


class PostmarkTransport(HttpTransport):
    """Postmark ``POST /email/batch``: one result per message, in order."""

    schemes: ClassVar[tuple[str, ...]] = ("postmark",)
    max_batch: ClassVar[int] = 500
    name: ClassVar[str] = "postmark"
    default_base_url: ClassVar[str] = "https://api.postmarkapp.com"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        self._token = self.secret("POSTMARK_SERVER_TOKEN", url_value=url.parts.password)
        self.message_stream = url.query.get("message_stream")

    def default_headers(self) -> dict[str, str]:
        return {"X-Postmark-Server-Token": self._token}

    def payload(self, message: Message) -> dict[str, Any]:
        people = recipients(message)
        subject, headers = subject_and_headers(message)
        data: dict[str, Any] = {
            "From": format_address(*people.sender),
            "To": format_addresses(people.to),
            "Subject": subject,
        }
        if people.cc:
            data["Cc"] = format_addresses(people.cc)
        if people.bcc:
            data["Bcc"] = format_addresses(people.bcc)
        if people.reply_to:
            data["ReplyTo"] = format_addresses(people.reply_to)
        if message.text is not None:
            data["TextBody"] = message.text
        if message.html is not None:
            data["HtmlBody"] = message.html
        data["Headers"] = [{"Name": n, "Value": v} for n, v in headers]
        if message.attachments:
            data["Attachments"] = [
                {
                    "Name": a.filename,
                    "Content": base64.b64encode(a.content).decode("ascii"),
                    "ContentType": a.content_type,
                    # an inline image: "ContentID": "cid:…", which the HtmlBody's src names
                    **({"ContentID": f"cid:{a.content_id}"} if a.content_id else {}),
                }
                for a in message.attachments
            ]
        if self.message_stream:
            data["MessageStream"] = self.message_stream
        return data

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        """The batch as JSON arrays of at most 50 MB, each entry encoded as soon as it is built.

        An entry's bytes are the exact size the cap counts, and its dict dies at
        once instead of living through the request: 500 fewer objects per batch
        for the garbage collector to promote and scan (issue 6, the HTTP path).
        """
        requests: list[ApiRequest] = []
        entries: list[bytes] = []
        indexes: list[int] = []
        size = 2  # the array's brackets
        for index, message in enumerate(messages):
            entry = json_bytes(self.payload(message))
            if entries and size + len(entry) > MAX_REQUEST_BYTES:
                requests.append(_batch_request(indexes, entries))
                entries, indexes, size = [], [], 2
            entries.append(entry)
            indexes.append(index)
            size += len(entry) + 1  # and its comma
        if entries:
            requests.append(_batch_request(indexes, entries))
        return requests

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        results = json_body(response)
        if not isinstance(results, list) or len(results) != len(messages):
            raise ValueError(f"expected a list of {len(messages)} results")
        outcomes = []
        for result in results:
            code = int(result["ErrorCode"])
            if code == 0:
                outcomes.append(Outcome.sent(str(result["MessageID"])))
                continue
            text = str(result.get("Message", ""))
            if code == RATE_LIMITED:
                outcomes.append(Outcome.transient(429, f"postmark: {text}"))
            else:
                outcomes.append(Outcome.permanent(code, f"postmark: ErrorCode {code}: {text}"))
        return outcomes


def _batch_request(indexes: list[int], entries: list[bytes]) -> ApiRequest:
    """One ``POST /email/batch`` whose body is the JSON array of ``entries``, already encoded."""
    body = b"[" + b",".join(entries) + b"]"
    return ApiRequest(indexes, "/email/batch", content=body, headers=dict(JSON_CONTENT_TYPE))
