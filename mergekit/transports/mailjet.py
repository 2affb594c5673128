"""``mailjet://``: Mailjet Send API v3.1, up to 50 messages per request.

``mailjet://[PUBLIC:PRIVATE@][?sandbox=true&base_url=…]``; the key pair comes
from the URL or ``$MJ_APIKEY_PUBLIC`` / ``$MJ_APIKEY_PRIVATE``.

Reference: https://dev.mailjet.com/email/reference/send-emails/ and
https://dev.mailjet.com/email/guides/send-api-v31/.

- ``POST /v3.1/send`` with ``{"Messages": [...], "SandboxMode": bool}``; Basic
  auth with the API key and secret key. At most 50 messages per call.
- One message per entry: ``From{Email,Name}``, ``To/Cc/Bcc[{Email,Name}]``,
  ``ReplyTo``, ``Subject``, ``TextPart``, ``HTMLPart``, ``Headers{}``,
  ``Attachments[{ContentType,Filename,Base64Content}]``, ``CustomID``.
- The reply's ``Messages[]`` is in request order, each with ``Status``
  "success" (``To[].MessageID``) or "error" with ``Errors[{ErrorCode,
  StatusCode, ErrorMessage}]``. One failing message does not stop the others;
  Mailjet then answers HTTP 400 with the same per-message array, which
  :meth:`MailjetTransport.parse_error` reads.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx

from ..errors import ConfigError
from .base import Message, Outcome, TransportURL
from .http import ApiRequest, HttpTransport, custom_headers, json_body, recipients


class MailjetTransport(HttpTransport):
    """Mailjet ``POST /v3.1/send``: Status and Errors per message."""

    schemes: ClassVar[tuple[str, ...]] = ("mailjet",)
    max_batch: ClassVar[int] = 50
    name: ClassVar[str] = "mailjet"
    default_base_url: ClassVar[str] = "https://api.mailjet.com"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        username = url.parts.username or None
        if url.parts.password and not username:
            raise ConfigError(
                "mailjet:// takes PUBLIC:PRIVATE@, not a private key alone", option="--transport"
            )
        self._public = self.secret("MJ_APIKEY_PUBLIC", url_value=username, query=())
        self._private = self.secret("MJ_APIKEY_PRIVATE", url_value=url.parts.password, query=("secret",))
        self.sandbox = url.flag("sandbox", False)

    def auth(self) -> httpx.Auth:
        return httpx.BasicAuth(self._public, self._private)

    def payload(self, message: Message) -> dict[str, Any]:
        people = recipients(message)

        def contacts(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
            return [{"Email": address, **({"Name": name} if name else {})} for name, address in pairs]

        data: dict[str, Any] = {
            "From": contacts([people.sender])[0],
            "To": contacts(people.to),
            "Subject": message.header("Subject"),
            "Headers": dict(custom_headers(message)),
            "CustomID": message.message_id,
        }
        if people.cc:
            data["Cc"] = contacts(people.cc)
        if people.bcc:
            data["Bcc"] = contacts(people.bcc)
        if people.reply_to:
            data["ReplyTo"] = contacts(people.reply_to[:1])[0]
        if message.text is not None:
            data["TextPart"] = message.text
        if message.html is not None:
            data["HTMLPart"] = message.html
        for name, files in (
            ("Attachments", [a for a in message.attachments if not a.content_id]),
            ("InlinedAttachments", [a for a in message.attachments if a.content_id]),
        ):
            if files:
                data[name] = [
                    {
                        "ContentType": a.content_type,
                        "Filename": a.filename,
                        "Base64Content": base64.b64encode(a.content).decode("ascii"),
                        **({"ContentID": a.content_id} if a.content_id else {}),
                    }
                    for a in files
                ]
        return data

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        body: dict[str, Any] = {"Messages": [self.payload(m) for m in messages]}
        if self.sandbox:
            body["SandboxMode"] = True
        return [ApiRequest(list(range(len(messages))), "/v3.1/send", json=body)]

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        return self._per_message(response, messages)

    def parse_error(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome] | None:
        if response.status_code != 400:
            return None
        return self._per_message(response, messages)

    def _per_message(self, response: httpx.Response, messages: Sequence[Message]) -> list[Outcome]:
        results = json_body(response)["Messages"]
        if len(results) != len(messages):
            raise ValueError(f"expected {len(messages)} results")
        outcomes = []
        for result in results:
            if result["Status"] == "success":
                ids = [str(to.get("MessageUUID") or to["MessageID"]) for to in result.get("To", [])]
                outcomes.append(Outcome.sent(",".join(ids) or None))
                continue
            errors = result.get("Errors") or [{}]
            first = errors[0]
            code = int(first.get("StatusCode") or response.status_code)
            text = "; ".join(f"{e.get('ErrorCode', '')} {e.get('ErrorMessage', '')}".strip() for e in errors)
            text = f"mailjet: {text or result['Status']}"
            if code == 429 or code >= 500:
                outcomes.append(Outcome.transient(code, text))
            else:
                outcomes.append(Outcome.permanent(code, text))
        return outcomes
