"""``resend://``: Resend's batch endpoint, up to 100 emails per request.

``resend://[:KEY@][?base_url=…]``; the API key comes from the URL's password or
``$RESEND_API_KEY``.

Reference: https://resend.com/docs/api-reference/emails/send-batch-emails,
https://resend.com/changelog/batch-validation-modes,
https://resend.com/docs/dashboard/emails/idempotency-keys,
https://resend.com/docs/api-reference/emails/send-email.

- "Trigger up to 100 batch emails at once": ``max_batch`` is 100; the body is a
  JSON array of emails (``from``, ``to``, ``cc``, ``bcc``, ``reply_to``,
  ``subject``, ``text``, ``html``, ``headers``); auth is ``Authorization: Bearer``.
- Batch does not take attachments, so a message with attachments goes on its
  own to ``POST /emails``, which answers ``{"id": …}``.
- ``x-batch-validation: permissive``: "valid emails will be queued and invalid
  emails will be returned in the ``errors`` array" as ``{index, message}``;
  ``data`` lists the ids of the queued emails in order.
- ``Idempotency-Key`` (up to 256 characters, kept 24 hours) is derived from
  the batch's Message-IDs, so a retried or resumed batch carries the same key.
  A 409 for a key still in progress ("concurrent_idempotent_requests") is
  transient; Resend's other 409 (the key reused with another payload) stays
  permanent.
- 429 carries ``retry-after`` and ``ratelimit-reset`` (seconds).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx

from .base import Message, Outcome, TransportURL
from .http import ApiRequest, HttpTransport, batch_key, custom_headers, format_address, json_body, recipients


class ResendTransport(HttpTransport):
    """Resend ``POST /emails/batch`` (permissive), ``POST /emails`` for attachments."""

    schemes: ClassVar[tuple[str, ...]] = ("resend",)
    max_batch: ClassVar[int] = 100
    name: ClassVar[str] = "resend"
    default_base_url: ClassVar[str] = "https://api.resend.com"
    reset_header: ClassVar[str | None] = "ratelimit-reset"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        self._key = self.secret("RESEND_API_KEY", url_value=url.parts.password)

    def default_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    def payload(self, message: Message) -> dict[str, Any]:
        people = recipients(message)
        data: dict[str, Any] = {
            "from": format_address(*people.sender),
            "to": [format_address(*p) for p in people.to],
            "subject": message.header("Subject"),
            "headers": dict(custom_headers(message)),
        }
        if people.cc:
            data["cc"] = [format_address(*p) for p in people.cc]
        if people.bcc:
            data["bcc"] = [address for _, address in people.bcc]
        if people.reply_to:
            data["reply_to"] = [format_address(*p) for p in people.reply_to]
        if message.text is not None:
            data["text"] = message.text
        if message.html is not None:
            data["html"] = message.html
        if message.attachments:
            data["attachments"] = [
                {
                    "filename": a.filename,
                    "content": base64.b64encode(a.content).decode("ascii"),
                    "content_type": a.content_type,
                    # "Content ID for embedding inline images using cid references"
                    **({"content_id": a.content_id} if a.content_id else {}),
                }
                for a in message.attachments
            ]
        return data

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        batched = [i for i, m in enumerate(messages) if not m.attachments]
        requests = []
        if batched:
            carried = [messages[i] for i in batched]
            requests.append(
                ApiRequest(
                    batched,
                    "/emails/batch",
                    json=[self.payload(m) for m in carried],
                    headers={
                        "x-batch-validation": "permissive",
                        "Idempotency-Key": batch_key("mergekit", carried),
                    },
                    context="batch",
                )
            )
        for i, message in enumerate(messages):
            if message.attachments:
                requests.append(
                    ApiRequest(
                        [i],
                        "/emails",
                        json=self.payload(message),
                        headers={"Idempotency-Key": batch_key("mergekit", [message])},
                        context="single",
                    )
                )
        return requests

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        body = json_body(response)
        if request.context == "single":
            return [Outcome.sent(str(body["id"]))]
        ids = [str(entry["id"]) for entry in body.get("data") or []]
        errors = {int(e["index"]): str(e.get("message", "")) for e in body.get("errors") or []}
        outcomes = [Outcome.unknown("resend: no id or error for this email")] * len(messages)
        for index, text in errors.items():
            outcomes[index] = Outcome.permanent(422, f"resend: {text}")
        accepted = [i for i in range(len(messages)) if i not in errors]
        if len(ids) == len(messages):
            accepted = list(range(len(messages)))  # one id per email, errored ones included
        elif len(ids) != len(accepted):
            return outcomes  # cannot tell which id is whose: unknown, never sent
        for index, provider_id in zip(accepted, ids, strict=True):
            if index not in errors:
                outcomes[index] = Outcome.sent(provider_id)
        return outcomes

    def parse_error(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome] | None:
        if response.status_code == 409:
            body = json_body(response)
            if body.get("name") == "concurrent_idempotent_requests":
                text = f"resend: {body.get('message', 'request with this key still in progress')}"
                return [Outcome.transient(409, text, 1.0)] * len(messages)
        return None
