"""Transports by URL: the scheme picks the class, the rest of the URL configures it."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Attachment, Message, Outcome, Status, Transport, TransportURL, redact_url
from .maildir import MaildirTransport
from .mailgun import MailgunTransport
from .mailjet import MailjetTransport
from .null import NullTransport
from .nylas import NylasTransport
from .postmark import PostmarkTransport
from .resend import ResendTransport
from .sendgrid import SendgridTransport
from .ses import SesTransport
from .smtp import SmtpTransport
from .webhook import WebhookTransport

TRANSPORTS: dict[str, type[Transport]] = {
    scheme: cls
    for cls in (
        SmtpTransport,
        MaildirTransport,
        NullTransport,
        PostmarkTransport,
        ResendTransport,
        MailjetTransport,
        SendgridTransport,
        MailgunTransport,
        SesTransport,
        NylasTransport,
        WebhookTransport,
    )
    for scheme in cls.schemes
}


def transport_from_url(text: str, *, concurrency: int = 1) -> Transport:
    """The transport for ``text``; an unknown scheme's error lists the accepted ones."""
    url = TransportURL.parse(text)
    cls = TRANSPORTS.get(url.scheme)
    if cls is None:
        accepted = ", ".join(f"{scheme}://" for scheme in sorted(TRANSPORTS))
        raise ConfigError(
            f"unknown transport scheme {url.scheme!r}", option="--transport", hint=f"Use one of {accepted}"
        )
    return cls(url, concurrency=concurrency)


__all__ = [
    "TRANSPORTS",
    "Attachment",
    "Message",
    "Outcome",
    "Status",
    "Transport",
    "TransportURL",
    "redact_url",
    "transport_from_url",
]
