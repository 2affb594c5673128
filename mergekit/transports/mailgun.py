"""``mailgun://DOMAIN``: Mailgun messages API; one message per request, or up to 1,000 by substitution.

``mailgun://[:KEY@]DOMAIN[?base_url=https://api.eu.mailgun.net&testmode=true&substitution=false]``;
the API key comes from the URL's password or ``$MAILGUN_API_KEY``.

Reference: https://documentation.mailgun.com/docs/mailgun/api-reference/openapi-final/tag/Messages/,
https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/batch-sending,
https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/test-mode.

- ``POST /v3/{domain}/messages`` as ``multipart/form-data``, the only
  request body its API document accepts, attachments or not (the base sends
  every form so); Basic auth with user
  ``api`` and the key as password. Fields: ``from``, ``to`` (repeated),
  ``cc``, ``bcc``, ``subject``, ``text``, ``html``, ``h:<Header>``,
  ``attachment`` (files), ``o:testmode``.
- The reply is 200 ``{"id": "<…>", "message": "Queued. Thank you."}``: one id
  for the request; an invalid address fails the whole call with 400.
- Batch sending: "specifying multiple recipient email addresses as to
  parameters and using Recipient Variables [...] Mailgun will send an
  individual to each recipient"; values are referenced as
  ``%recipient.yourkey%`` and given as ``recipient-variables``, a JSON object
  keyed by address. "The maximum number of recipients allowed for Batch
  Sending is 1,000." With a plain-substitution template
  (:mod:`mergekit.substitution`) the Subject and body carry
  ``%recipient.sN%``/``%recipient.tN%``/``%recipient.hN%`` and each recipient
  the values Jinja printed. Mailgun takes no per-recipient header in this
  form, so messages sent this way carry Mailgun's Message-ID, not mergekit's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from ..errors import ConfigError
from ..substitution import SubstitutionPlan, group_messages
from .base import Message, Outcome, TransportURL
from .http import (
    ApiRequest,
    HttpTransport,
    custom_headers,
    format_address,
    format_addresses,
    json_body,
    recipients,
    url_host,
)

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 1000  # "The maximum number of recipients allowed for Batch Sending is 1,000"
RECIPIENT_SYNTAX = "%recipient."  # Mailgun's variable syntax: neither template text nor a value may hold it


def _tag(part: str, names: tuple[str, ...]) -> Callable[[str], str]:
    """``%recipient.<part><n>%`` for the n-th variable of a template part."""
    return lambda name: f"{RECIPIENT_SYNTAX}{part}{names.index(name)}%"


class MailgunTransport(HttpTransport):
    """Mailgun ``POST /v3/{domain}/messages`` (form); one id per request."""

    schemes: ClassVar[tuple[str, ...]] = ("mailgun",)
    max_batch: ClassVar[int] = MAX_RECIPIENTS
    name: ClassVar[str] = "mailgun"
    default_base_url: ClassVar[str] = "https://api.mailgun.net"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        super().__init__(url, concurrency=concurrency)
        self.domain = url_host(url)
        if not self.domain:
            raise ConfigError(
                f"{url.redacted} names no sending domain", option="--transport", hint="Use mailgun://DOMAIN"
            )
        self._key = self.secret("MAILGUN_API_KEY", url_value=url.parts.password)
        self.testmode = url.flag("testmode", False)
        self.use_substitution = url.flag("substitution", True)
        self.plan: SubstitutionPlan | None = None
        self.path = f"/v3/{quote(self.domain, safe='')}/messages"

    def auth(self) -> httpx.Auth:
        return httpx.BasicAuth("api", self._key)

    def prepare(self, template: Any) -> None:
        if not self.use_substitution:
            return
        plan, reason = SubstitutionPlan.analyse(template)
        if plan is not None and RECIPIENT_SYNTAX in plan.body.text() + plan.subject.text():
            plan, reason = None, f"the template's own text contains {RECIPIENT_SYNTAX!r}"
        self.plan = plan
        log.info("mailgun: substitution path %s: %s", "on" if plan else "off", reason)

    def _fields(self, message: Message, *, to: list[str]) -> list[tuple[str, str]]:
        people = recipients(message)
        fields = [("from", format_address(*people.sender))]
        fields += [("to", address) for address in to]
        fields += [("cc", format_address(*p)) for p in people.cc]
        fields += [("bcc", address) for _, address in people.bcc]
        if people.reply_to:
            fields.append(("h:Reply-To", format_addresses(people.reply_to)))
        if self.testmode:
            fields.append(("o:testmode", "yes"))
        return fields

    def _single(self, index: int, message: Message) -> ApiRequest:
        people = recipients(message)
        fields = self._fields(message, to=[format_address(*p) for p in people.to])
        fields.append(("subject", message.header("Subject")))
        if message.text is not None:
            fields.append(("text", message.text))
        if message.html is not None:
            fields.append(("html", message.html))
        fields += [(f"h:{name}", value) for name, value in custom_headers(message)]
        # Mailgun names an ``inline`` file's Content-ID after its file name: the HTML's cid:.
        files = [
            ("inline", (a.content_id, a.content, a.content_type))
            if a.content_id
            else ("attachment", (a.filename, a.content, a.content_type))
            for a in message.attachments
        ]
        return ApiRequest([index], self.path, data=fields, files=files)

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        if self.plan is None:
            return [self._single(i, m) for i, m in enumerate(messages)]
        plan = self.plan
        grouping = group_messages(
            plan, messages, max_size=MAX_RECIPIENTS, unsafe=lambda v: RECIPIENT_SYNTAX in v
        )
        requests = []
        for group in grouping.groups:
            first = messages[group[0][0]]

            to = []
            variables: dict[str, dict[str, str]] = {}
            for index, values in group:
                message = messages[index]
                name, address = recipients(message).to[0]
                to.append(format_address(name, address))
                entry = {f"s{plan.subject.names.index(k)}": v for k, v in values.subject.items()}
                entry.update({f"t{plan.body.names.index(k)}": v for k, v in values.text.items()})
                entry.update({f"h{plan.body.names.index(k)}": v for k, v in values.html.items()})
                variables[address] = entry
            fields = self._fields(first, to=to)
            fields.append(("subject", plan.subject.compile(_tag("s", plan.subject.names))))
            if first.text is not None:
                fields.append(("text", plan.body.compile(_tag("t", plan.body.names))))
            if first.html is not None:
                fields.append(("html", plan.body.compile(_tag("h", plan.body.names))))
            fields += [(f"h:{name}", value) for name, value in custom_headers(first, message_id=False)]
            fields.append(("recipient-variables", json.dumps(variables, ensure_ascii=False)))
            indexes = [index for index, _ in group]
            fallback = [self._single(i, messages[i]) for i in indexes]
            requests.append(ApiRequest(indexes, self.path, data=fields, fallback=fallback))
        requests.extend(self._single(i, messages[i]) for i in grouping.singles)
        return requests

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        # {"id": "<20111114174239.25659.5817@samples.mailgun.org>", "message": "Queued. Thank you."}
        provider_id = str(json_body(response)["id"])
        return [Outcome.sent(provider_id) for _ in messages]
