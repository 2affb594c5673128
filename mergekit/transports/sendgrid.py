"""``sendgrid://``: SendGrid v3 Mail Send; one message per request, or up to 1,000 by substitution.

``sendgrid://[:KEY@][?sandbox=true&substitution=false&base_url=https://api.eu.sendgrid.com]``;
the API key comes from the URL's password or ``$SENDGRID_API_KEY``.

Reference: https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send,
https://www.twilio.com/docs/sendgrid/for-developers/sending-email/personalizations,
https://twilio.com/docs/sendgrid/api-reference/mail-send/errors,
https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits.

- ``POST /v3/mail/send``, ``Authorization: Bearer``; "202 Accepted" with an
  empty body and one ``X-Message-Id`` header for the whole request. "Any error
  fails the whole request": a 4xx is every carried message's outcome.
- A message is ``personalizations[{to, cc, bcc, headers}]``, ``from``,
  ``reply_to_list``, ``subject``, ``content[{type, value}]`` (text/plain
  first), ``attachments[{content, type, filename}]``, ``headers``.
- Bulk form: "The personalization block is limited to 1000 personalizations
  per API request" and "a limit of 1000 total recipients (to + cc + bcc) per
  request"; "Each address may appear only once". Each personalization has
  its own ``subject``, ``headers`` (our Message-ID and every custom header,
  so a per-row List-Unsubscribe does not split a request) and ``substitutions``,
  which "apply to the text and html content of the body of your email". With
  a plain-substitution template (:mod:`mergekit.substitution`), one shared
  ``content`` carries tags like ``-<nonce>t0-`` and each personalization the
  values Jinja printed; the total of a personalization's substitutions is
  capped at 10,000 bytes, so a message past it goes on its own.
- 429 carries ``X-RateLimit-Reset`` (a Unix time).
- The request schema gives ``subject`` and each ``content`` value
  ``minLength: 1``: a message with an empty Subject or an empty body is
  ``permanent`` without a request (:meth:`SendgridTransport.inexpressible`),
  and an empty text part beside an HTML one is left out.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx

from ..substitution import MessageValues, SubstitutionPlan, group_messages
from .base import Message, Outcome, TransportURL
from .http import ApiRequest, HttpTransport, custom_headers, recipients

log = logging.getLogger(__name__)

MAX_PERSONALIZATIONS = 1000  # "limited to 1000 personalizations per API request"
MAX_SUBSTITUTION_BYTES = 10_000  # "may not exceed 10,000 bytes per personalization object"


def _contact(name: str, address: str) -> dict[str, str]:
    return {"email": address, **({"name": name} if name else {})}


class SendgridTransport(HttpTransport):
    """SendGrid ``POST /v3/mail/send``; per request outcomes, keyed to ``X-Message-Id``."""

    schemes: ClassVar[tuple[str, ...]] = ("sendgrid",)
    max_batch: ClassVar[int] = MAX_PERSONALIZATIONS
    name: ClassVar[str] = "sendgrid"
    default_base_url: ClassVar[str] = "https://api.sendgrid.com"
    reset_header: ClassVar[str | None] = "x-ratelimit-reset"
    reset_is_epoch: ClassVar[bool] = True

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        self._key = self.secret("SENDGRID_API_KEY", url_value=url.parts.password)
        self.sandbox = url.flag("sandbox", False)
        self.use_substitution = url.flag("substitution", True)
        self.plan: SubstitutionPlan | None = None
        self._nonce = secrets.token_hex(4)

    def default_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    def prepare(self, template: Any) -> None:
        if not self.use_substitution:
            return
        plan, reason = SubstitutionPlan.analyse(template)
        while plan is not None and self._nonce in plan.body.text() + plan.subject.text():
            self._nonce = secrets.token_hex(4)
        self.plan = plan
        log.info("sendgrid: substitution path %s: %s", "on" if plan else "off", reason)

    def inexpressible(self, message: Message) -> str | None:
        # The API document's request schema: "subject": {"minLength": 1}, and "content" items'
        # "value": {"minLength": 1}; without a template_id there is no other way to send.
        if not message.header("Subject"):
            return "SendGrid's API takes no empty Subject (its subject has minLength 1); give the row one"
        if not message.text and not message.html:
            return "SendGrid's API takes no empty body (its content value has minLength 1)"
        return None

    def _tag(self, part: str, name: str) -> str:
        assert self.plan is not None
        return f"-{self._nonce}{part}{self.plan.body.names.index(name)}-"

    def _base(self, message: Message) -> dict[str, Any]:
        people = recipients(message)
        data: dict[str, Any] = {"from": _contact(*people.sender), "subject": message.header("Subject")}
        if people.reply_to:
            data["reply_to_list"] = [_contact(*p) for p in people.reply_to]
        content = []
        if message.text:  # "value": {"minLength": 1}: an empty part is left out
            content.append({"type": "text/plain", "value": message.text})
        if message.html:
            content.append({"type": "text/html", "value": message.html})
        data["content"] = content
        if message.attachments:
            data["attachments"] = [
                {
                    "content": base64.b64encode(a.content).decode("ascii"),
                    "type": a.content_type,
                    "filename": a.filename,
                    **({"disposition": "inline", "content_id": a.content_id} if a.content_id else {}),
                }
                for a in message.attachments
            ]
        if self.sandbox:
            data["mail_settings"] = {"sandbox_mode": {"enable": True}}
        return data

    def _personalization(self, message: Message) -> dict[str, Any]:
        people = recipients(message)
        entry: dict[str, Any] = {"to": [_contact(*p) for p in people.to]}
        if people.cc:
            entry["cc"] = [_contact(*p) for p in people.cc]
        if people.bcc:
            entry["bcc"] = [_contact(*p) for p in people.bcc]
        # Headers go per personalization, so rows whose List-Unsubscribe (or any header) differs
        # can still share one request.
        entry["headers"] = dict(custom_headers(message))
        entry["custom_args"] = {"mergekit_message_id": message.message_id}
        return entry

    def _single(self, index: int, message: Message) -> ApiRequest:
        body = self._base(message)
        body["personalizations"] = [self._personalization(message)]
        return ApiRequest([index], "/v3/mail/send", json=body)

    def _substitutions(self, values: MessageValues) -> dict[str, str]:
        subs = {self._tag("t", k): v for k, v in values.text.items()}
        subs.update({self._tag("h", k): v for k, v in values.html.items()})
        return subs

    def _fits(self, values: MessageValues) -> bool:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in self._substitutions(values).items())
        return size <= MAX_SUBSTITUTION_BYTES

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        if self.plan is None:
            return [self._single(i, m) for i, m in enumerate(messages)]
        plan = self.plan
        grouping = group_messages(
            plan,
            messages,
            max_size=MAX_PERSONALIZATIONS,
            unsafe=lambda v: self._nonce in v,
            fits=self._fits,
            per_recipient_headers=True,
        )
        requests = []
        for group in grouping.groups:
            first = messages[group[0][0]]
            body = self._base(first)
            content = [{"type": "text/plain", "value": plan.body.compile(lambda n: self._tag("t", n))}]
            if first.html is not None:
                content.append({"type": "text/html", "value": plan.body.compile(lambda n: self._tag("h", n))})
            body["content"] = content
            personalizations = []
            for index, values in group:
                message = messages[index]
                entry = self._personalization(message)
                entry["subject"] = message.header("Subject")
                entry["substitutions"] = self._substitutions(values)
                personalizations.append(entry)
            body["personalizations"] = personalizations
            indexes = [index for index, _ in group]
            fallback = [self._single(i, messages[i]) for i in indexes]
            requests.append(ApiRequest(indexes, "/v3/mail/send", json=body, fallback=fallback))
        requests.extend(self._single(i, messages[i]) for i in grouping.singles)
        return requests

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        # "202 Accepted" (200 in sandbox mode) with no body: the status is the receipt,
        # X-Message-Id the request's id.
        provider_id = response.headers.get("x-message-id")
        return [Outcome.sent(provider_id, code=response.status_code) for _ in messages]
