"""``ses://REGION``: Amazon SES v2 ``SendEmail`` with the raw MIME message.

``ses://[ACCESS_KEY_ID:SECRET@]REGION[?configuration_set=…&base_url=…]``.
Credentials come from the URL or the standard AWS chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the
shared files); the region from the URL or ``AWS_REGION``/``AWS_DEFAULT_REGION``.

Reference: https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html,
https://docs.aws.amazon.com/ses/latest/APIReference-V2/CommonErrors.html,
https://docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas-errors.html.

Why ``SendEmail`` (raw) and not ``SendBulkEmail``: the raw form sends the exact
bytes mergekit rendered (its deterministic ``Message-ID``, every header, any
attachment), where ``SendBulkEmail`` needs an SES template and has no per-entry
raw content. Each message is one signed request
``POST /v2/email/outbound-emails`` with ``{"FromEmailAddress", "Destination":
{"ToAddresses": [every envelope recipient, Bcc included]}, "Content": {"Raw":
{"Data": base64}}}``, answered ``{"MessageId": …}``; ``concurrency`` go at
once. ``max_batch`` is 50, the bulk call's entry cap, as the dispatch batch.

Requests are signed with AWS Signature Version 4 by botocore's ``SigV4Auth``
(a maintained signer), at the moment each request leaves, so a request that
waited out a 429 is not sent with a stale signature. Throttling
(``TooManyRequestsException``, "Maximum sending rate exceeded") is HTTP 429:
transient; ``MessageRejected`` and the like are 400: permanent.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Generator, Sequence
from typing import Any, ClassVar
from urllib.parse import unquote

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.session import Session

from ..errors import ConfigError
from .base import Message, Outcome, TransportURL
from .http import ApiRequest, HttpTransport, json_body, url_host
from .scrub import ScrubbingFilter

# botocore's signer logs the canonical request (the session token's header in it) at DEBUG:
# every SES secret is scrubbed from its lines too (``mergekit --debug``).
_SIGNER_LOG = ScrubbingFilter()


class _SigV4(httpx.Auth):
    """httpx auth that signs each request with botocore's SigV4 signer."""

    requires_request_body = True

    def __init__(self, credentials: Credentials, region: str) -> None:
        self._signer = SigV4Auth(credentials, "ses", region)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        unsigned = AWSRequest(
            method=request.method,
            url=str(request.url),
            data=request.content,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        )
        self._signer.add_auth(unsigned)
        for name, value in unsigned.headers.items():
            request.headers[name] = value
        yield request


class SesTransport(HttpTransport):
    """SES v2 ``SendEmail`` (raw), one signed request per message."""

    schemes: ClassVar[tuple[str, ...]] = ("ses",)
    max_batch: ClassVar[int] = 50
    name: ClassVar[str] = "ses"

    def __init__(self, url: TransportURL, *, concurrency: int = 1) -> None:
        self.region = (
            url_host(url) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        )
        if not self.region:
            raise ConfigError(
                f"{url.redacted} names no region",
                option="--transport",
                hint="Use ses://REGION (e.g. ses://eu-west-1) or set AWS_REGION",
            )
        self.default_base_url = f"https://email.{self.region}.amazonaws.com"  # type: ignore[misc]
        super().__init__(url, concurrency=concurrency)
        self.configuration_set = url.query.get("configuration_set")
        if url.parts.username and url.parts.password:
            credentials = Credentials(unquote(url.parts.username), unquote(url.parts.password))
        else:
            found = Session().get_credentials()
            credentials = found.get_frozen_credentials() if found is not None else None
        if credentials is None or not credentials.access_key or not credentials.secret_key:
            raise ConfigError(
                "ses:// needs AWS credentials and none were found",
                option="--transport",
                hint="Set the environment variables AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)",
            )
        for secret in (credentials.secret_key, credentials.token):
            self.scrub.add(secret)
            _SIGNER_LOG.scrub.add(secret)
        logging.getLogger("botocore.auth").addFilter(_SIGNER_LOG)  # once: the same filter is kept once
        self._credentials = Credentials(credentials.access_key, credentials.secret_key, credentials.token)

    def auth(self) -> httpx.Auth:
        return _SigV4(self._credentials, self.region)

    def payload(self, message: Message) -> dict[str, Any]:
        data: dict[str, Any] = {
            "FromEmailAddress": message.envelope_from,
            "Destination": {"ToAddresses": list(message.envelope_to)},
            "Content": {"Raw": {"Data": base64.b64encode(message.raw).decode("ascii")}},
        }
        if self.configuration_set:
            data["ConfigurationSetName"] = self.configuration_set
        return data

    def build_requests(self, messages: Sequence[Message]) -> list[ApiRequest]:
        return [
            ApiRequest([i], "/v2/email/outbound-emails", json=self.payload(m)) for i, m in enumerate(messages)
        ]

    def parse_response(
        self, request: ApiRequest, response: httpx.Response, messages: Sequence[Message]
    ) -> list[Outcome]:
        return [Outcome.sent(str(json_body(response)["MessageId"]))]
