"""``webhook+https://host/path``: POST rendered messages as JSON to your own endpoint.

``webhook+https://host/path[?batch_size=100&secret=…]`` (``webhook+http://``
only to a loopback host). The optional HMAC secret comes from ``?secret=`` or
``$MERGEKIT_WEBHOOK_SECRET``; without one, requests are not signed.

The format is mergekit's own (docs/http-transports.md). Request::

    POST /path
    Content-Type: application/json
    X-Mergekit-Timestamp: 1732500000
    X-Mergekit-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>
    Idempotency-Key: mergekit-<hash of the batch's Message-IDs>

    {"messages": [{"message_id", "row", "key", "from", "to": [...],
                   "headers": [[name, value], ...], "subject", "text", "html",
                   "raw": base64 RFC 5322 bytes,
                   "attachments": [{"filename", "content_type", "content",
                                    "content_id" (set when the HTML shows it as cid:)}]}]}

Reply: ``200`` with ``{"results": [{"status": "sent"|"transient"|"permanent",
"id": "…", "error": "…", "retry_after": seconds}]}`` in request order, or
``204 No Content`` meaning every message was accepted. Any other 2xx body is
``unknown``; 429/5xx/4xx are classed as for every HTTP transport.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlunsplit

import httpx

from ..errors import ConfigError
from .base import Message, Outcome, TransportURL
from .http import ApiRequest, HttpTransport, batch_key, json_body, recipients

DEFAULT_BATCH = 100  # messages per request unless ?batch_size= says otherwise
MAX_BATCH = 1000


class WebhookTransport(HttpTransport):
    """Your endpoint, your batch size; one result per message in our documented format."""

    schemes: ClassVar[tuple[str, ...]] = ("webhook+https", "webhook+http")
    max_batch: ClassVar[int] = MAX_BATCH
    name: ClassVar[str] = "webhook"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        inner = url.parts._replace(scheme=url.scheme.removeprefix("webhook+"), query="", fragment="")
        # The endpoint's origin is the base URL (``?base_url=`` may move it); its path is the path.
        self.default_base_url = urlunsplit(inner._replace(path=""))  # type: ignore[misc]
        super().__init__(url, concurrency=concurrency)
        self.path = inner.path or "/"
        try:
            size = int(url.query.get("batch_size", DEFAULT_BATCH))
        except ValueError:
            size = 0
        if not 1 <= size <= MAX_BATCH:
            raise ConfigError(f"?batch_size= must be 1 to {MAX_BATCH}", option="--transport")
        self.max_batch = size  # type: ignore[misc]
        secret = url.query.get("secret")
        try:
            self._secret: str | None = self.secret("MERGEKIT_WEBHOOK_SECRET", url_value=secret)
        except ConfigError:
            self._secret = None  # signing is optional

    def payload(self, message: Message) -> dict[str, Any]:
        people = recipients(message)
        return {
            "message_id": message.message_id,
            "row": message.row,
            "key": message.key,
            "from": message.envelope_from,
            "to": list(message.envelope_to),
            "bcc": [address for _, address in people.bcc],
            "headers": [list(pair) for pair in message.headers],
            "subject": message.header("Subject"),
            "text": message.text,
            "html": message.html,
            "raw": base64.b64encode(message.raw).decode("ascii"),
            "attachments": [
                {
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "content": base64.b64encode(a.content).decode("ascii"),
                    "content_id": a.content_id,
                }
                for a in message.attachments
            ],
        }

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        body = json.dumps({"messages": [self.payload(m) for m in messages]}, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": batch_key("mergekit", messages)}
        if self._secret:
            stamp = str(int(time.time()))
            digest = hmac.new(self._secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers["X-Mergekit-Timestamp"] = stamp
            headers["X-Mergekit-Signature"] = f"sha256={digest}"
        return [ApiRequest(list(range(len(messages))), self.path, content=body, headers=headers)]

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        if response.status_code == 204:
            return [Outcome.sent(None, code=204) for _ in messages]
        results = json_body(response)["results"]
        if len(results) != len(messages):
            raise ValueError(f"expected {len(messages)} results")
        outcomes = []
        for result in results:
            status = result["status"]
            text = str(result.get("error") or "")
            if status == "sent":
                outcomes.append(Outcome.sent(str(result["id"]) if result.get("id") else None))
            elif status == "transient":
                retry = result.get("retry_after")
                outcomes.append(Outcome.transient(None, f"webhook: {text}", float(retry) if retry else None))
            elif status == "permanent":
                outcomes.append(Outcome.permanent(None, f"webhook: {text}"))
            else:
                outcomes.append(Outcome.unknown(f"webhook: unknown status {status!r}"))
        return outcomes
