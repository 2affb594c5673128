"""``nylas://GRANT_ID``: Nylas v3 send, one message per request.

``nylas://[:KEY@]GRANT_ID[?base_url=https://api.eu.nylas.com]``; the API key
comes from the URL's password or ``$NYLAS_API_KEY``.

Reference: https://developer.nylas.com/docs/reference/api/messages/send-message/
and https://developer.nylas.com/docs/dev-guide/platform/rate-limits/.

- ``POST /v3/grants/{grant_id}/messages/send`` with ``Authorization: Bearer``.
  Nylas has no batch: the message leaves through the user's own mailbox, so a
  batch becomes one request per message, ``concurrency`` at a time.
- JSON body: ``to/cc/bcc/reply_to/from [{name, email}]``, ``subject``,
  ``body`` (HTML, or text with ``is_plaintext: true``), ``custom_headers
  [{name, value}]``, ``attachments [{filename, content_type, content}]``.
- The reply is ``{"request_id", "grant_id", "data": {"id", ...}}``.
- ``Idempotency-Key`` per message, derived from its Message-ID: a replay is
  answered with ``Idempotent-Response: true`` and no second send.
- 429 (``nylas_rate_limit_exceeded`` / the mailbox provider's
  ``rate_limit_error``) is transient with ``Retry-After`` when given.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from ..errors import ConfigError
from .base import Message, Outcome, TransportURL
from .http import ApiRequest, HttpTransport, batch_key, custom_headers, json_body, recipients, url_host


class NylasTransport(HttpTransport):
    """Nylas v3 ``messages/send`` for one grant; one request per message."""

    schemes: ClassVar[tuple[str, ...]] = ("nylas",)
    max_batch: ClassVar[int] = 1  # Nylas has no batch: one message per request
    name: ClassVar[str] = "nylas"
    default_base_url: ClassVar[str] = "https://api.us.nylas.com"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        self.grant = url_host(url)
        if not self.grant:
            raise ConfigError(
                f"{url.redacted} names no grant", option="--transport", hint="Use nylas://GRANT_ID"
            )
        self._key = self.secret("NYLAS_API_KEY", url_value=url.parts.password)

    def default_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    def payload(self, message: Message) -> dict[str, Any]:
        people = recipients(message)

        def contacts(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
            return [{"email": address, **({"name": name} if name else {})} for name, address in pairs]

        data: dict[str, Any] = {
            "from": contacts([people.sender]),
            "to": contacts(people.to),
            "subject": message.header("Subject"),
            "custom_headers": [{"name": n, "value": v} for n, v in custom_headers(message)],
        }
        if message.html is not None:
            data["body"] = message.html
        else:
            data["body"] = message.text or ""
            data["is_plaintext"] = True
        for field_name, pairs in (("cc", people.cc), ("bcc", people.bcc), ("reply_to", people.reply_to)):
            if pairs:
                data[field_name] = contacts(pairs)
        if message.attachments:
            data["attachments"] = [
                {
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "content": base64.b64encode(a.content).decode("ascii"),
                    **({"content_id": a.content_id, "is_inline": True} if a.content_id else {}),
                }
                for a in message.attachments
            ]
        return data

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        path = f"/v3/grants/{quote(self.grant, safe='')}/messages/send"
        return [
            ApiRequest(
                [i], path, json=self.payload(m), headers={"Idempotency-Key": batch_key("mergekit", [m])}
            )
            for i, m in enumerate(messages)
        ]

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        body = json_body(response)
        text = "idempotent replay" if response.headers.get("idempotent-response") == "true" else ""
        return [Outcome.sent(str(body["data"]["id"]), text=text)]
