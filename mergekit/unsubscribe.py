"""One-click unsubscribe (RFC 8058) and the suppression list.

Every message of a campaign sent with ``--unsubscribe-url`` and/or
``--unsubscribe-mailto`` carries ``List-Unsubscribe`` (RFC 2369) and, with an
HTTPS URL, ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058 3.1:
the one-click POST needs an HTTPS URI), and ``List-Id`` (RFC 2919, see
:func:`list_id_address`). The URL's ``{token}`` is
``HMAC-SHA256(secret, campaign NUL key)``, truncated to 128 bits and written in
URL-safe base64: the receiving endpoint recomputes it from the campaign and
recipient key (``{campaign}``, ``{key}`` and ``{email}``, the row's ``email``
column, are available in the URL too) to check a request is genuine. The token
uses the campaign's NAME, not its identity (which Message-IDs use): the
endpoint knows the name, and a recipient of next month's campaign of the same
name is the same subscriber of the same list. The secret comes from
:data:`SECRET_VARIABLE` only, never from an option, so it stays out of shell
history and the ledger.

A suppression file is a CSV with an email column (``email`` or the
``--email-column`` name, any case) or a plain list, one address per line
(blank lines and ``#`` comments skipped). Addresses compare stripped and
lower-cased.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from .addresses import canonical_address
from .errors import ConfigError, InputError

SECRET_VARIABLE = "MERGEKIT_UNSUBSCRIBE_SECRET"
# Bytes of the HMAC kept in a token: 128 bits resist guessing, and keep URLs short.
TOKEN_BYTES = 16
# A List-Id label keeps this much of the campaign name (RFC 2919 bounds the whole id to 255 octets).
LABEL_CHARACTERS = 64
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_-]+")  # runs a label writes as "-" (a dot-atom, less dots and symbols)


@dataclass(frozen=True)
class Unsubscribe:
    """Where recipients unsubscribe, and the secret that signs their tokens."""

    url: str | None
    mailto: str | None
    secret: bytes

    @classmethod
    def from_options(
        cls, url: str | None, mailto: str | None, *, environ: Mapping[str, str] | None = None
    ) -> Unsubscribe | None:
        """The configuration for ``--unsubscribe-url`` / ``--unsubscribe-mailto``, or None if neither.

        :raises ConfigError: the secret variable is unset, the URL is not HTTPS
            or its placeholders are unknown, or the mailto is not an address.
        """
        if not url and not mailto:
            return None
        option = "--unsubscribe-url" if url else "--unsubscribe-mailto"
        secret = (os.environ if environ is None else environ).get(SECRET_VARIABLE, "")
        if not secret:
            raise ConfigError(
                f"needs a secret to sign unsubscribe tokens: the environment variable {SECRET_VARIABLE} "
                "is not set",
                option=option,
                hint=f"Set {SECRET_VARIABLE} to a long random string, and keep it for the whole campaign",
            )
        if url:
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.netloc:
                raise ConfigError(
                    f"{url!r} is not an https:// URL",
                    option="--unsubscribe-url",
                    hint="RFC 8058 one-click unsubscribe needs an HTTPS URL, e.g. https://example.com/u/{token}",
                )
            try:
                url.format(token="t", campaign="c", key="k", email="e")
            except (KeyError, IndexError, ValueError) as err:
                raise ConfigError(
                    f"{url!r} has an unknown placeholder ({err})",
                    option="--unsubscribe-url",
                    hint="Use {token}, {campaign}, {key} or {email}; write {{ and }} for literal braces",
                ) from None
        if mailto:
            mailto = mailto.removeprefix("mailto:")
            if "@" not in mailto or any(ch in mailto for ch in "<>\r\n ,"):
                raise ConfigError(f"{mailto!r} is not an email address", option="--unsubscribe-mailto")
        return cls(url or None, mailto or None, secret.encode())

    def token(self, campaign: str, key: str) -> str:
        """The recipient's token: URL-safe base64 of the truncated HMAC of campaign and key."""
        digest = hmac.new(self.secret, f"{campaign}\x00{key}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:TOKEN_BYTES]).rstrip(b"=").decode("ascii")

    def url_for(self, campaign: str, key: str, email: str) -> str | None:
        if not self.url:
            return None
        return self.url.format(
            token=self.token(campaign, key),
            campaign=quote(campaign, safe=""),
            key=quote(key, safe=""),
            email=quote(email, safe="@"),
        )

    def headers(self, campaign: str, key: str, email: str) -> list[tuple[str, str]]:
        """``List-Unsubscribe`` (and ``List-Unsubscribe-Post`` with a URL) for one recipient."""
        targets = []
        url = self.url_for(campaign, key, email)
        if url:
            targets.append(f"<{url}>")
        if self.mailto:
            subject = quote(f"unsubscribe {self.token(campaign, key)}")
            targets.append(f"<mailto:{self.mailto}?subject={subject}>")
        headers = [("List-Unsubscribe", ", ".join(targets))]
        if url:
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        return headers


def list_id_address(campaign: str, domain: str) -> str:
    """``label.domain``, the part of ``List-Id`` in angle brackets (RFC 2919 2): ``domain`` is the
    sender's (the From address's), the label the campaign name where it is a plain word
    (letters, digits, ``-``, ``_``), else its runs of other characters as ``-`` and 8 hex digits
    of its hash, so two names never share a list id. One campaign name, one list: next month's
    campaign of the same name keeps it (receivers group and filter by it)."""
    label = _NOT_LABEL.sub("-", campaign).strip("-")[:LABEL_CHARACTERS]
    if label != campaign:
        suffix = hashlib.sha256(campaign.encode()).hexdigest()[:8]
        label = f"{label}-{suffix}" if label else f"campaign-{suffix}"
    return f"{label}.{domain}"


def read_suppression(paths: Iterable[str | Path], *, email_column: str = "email") -> dict[str, str]:
    """Every suppressed address, in its canonical form (any spelling of a mailbox suppresses every
    spelling: see :mod:`mergekit.addresses`), mapped to the file that lists it.

    :raises InputError: a file is missing, not UTF-8, or a CSV without an email column.
    """
    found: dict[str, str] = {}
    for path in paths:
        name = str(path)
        try:
            with open(path, encoding="utf-8-sig", newline="") as file:
                rows = [row for row in csv.reader(file) if row and any(cell.strip() for cell in row)]
        except FileNotFoundError:
            raise InputError("suppression file not found", path=name, hint="Check --suppress") from None
        except UnicodeDecodeError:
            raise InputError(
                "the suppression file is not UTF-8 text", path=name, hint="Save it as UTF-8"
            ) from None
        except (OSError, csv.Error) as err:
            raise InputError(f"cannot read the suppression file: {err}", path=name) from None
        rows = [row for row in rows if not row[0].lstrip().startswith("#")]
        if not rows:
            continue
        header = [cell.strip().lower() for cell in rows[0]]
        wanted = email_column.lower() if email_column.lower() in header else "email"
        if wanted in header:
            matching = [written for written, folded in zip(rows[0], header, strict=True) if folded == wanted]
            if len(matching) > 1:  # which one lists the addresses is not certain: refuse, as for recipients
                raise InputError(
                    f"columns {matching[0]!r} and {matching[1]!r} both match the address column {wanted!r} "
                    "(names compare in any case)",
                    path=name,
                    line=1,
                    hint="Rename or remove one of them, so that the column to use is certain",
                )
            column = header.index(wanted)
            addresses = [row[column] for row in rows[1:] if len(row) > column]
        elif all(len(row) == 1 for row in rows):
            addresses = [row[0] for row in rows]
        else:
            raise InputError(
                f"the suppression CSV has no {email_column!r} column; its columns are {', '.join(rows[0])}",
                path=name,
                line=1,
                hint="Name the address column 'email', or list one address per line",
            )
        for address in addresses:
            address = canonical_address(address.strip())
            if address:
                found.setdefault(address, name)
    return found
