"""Mailbox identity: an address as it goes on the wire, and the canonical form rows are keyed by.

One normalisation serves the renderer's envelope and the ledger's identity, so
two spellings that reach one envelope address are one recipient (issue 13):

- :func:`wire_address` is what the renderer puts in the envelope: the local
  part as written (an ASCII dot-atom; others go to email-validator, which
  refuses what needs SMTPUTF8), the domain through UTS-46 (NFC, case and width
  folded, e.g. a full-width ``b`` to ``b``) to its IDNA A-label form (``bücher`` to
  ``xn--bcher-kva``), as email-validator gives it.
- :func:`canonical_address` is the recipient key of an address row, the address
  a ``--suppress`` entry is compared by, and what a rendered message claims in
  the ledger: Unicode NFC, the domain as the wire has it, then lower-cased. The
  local part is only NFC-normalised and lower-cased, never NFKC-folded: a
  non-ASCII local part cannot go out without SMTPUTF8 (such rows are
  ``invalid``), and folding a full-width ``a`` into ``a`` would let an unsendable spelling
  take the key, and so the place, of a sendable one.

An all-ASCII address's canonical form is its lower-case: UTS-46 maps ASCII
letters to lower case and leaves the other ASCII characters alone, and IDNA
keeps an ASCII label as it is (an ``xn--`` label is only checked); a domain
either check refuses is kept as written, lower-cased, like any other. So ingest
lower-cases ASCII addresses a column at a time and sends only the others
through :func:`canonical_address` (``tests/test_addresses.py`` checks the two
agree).
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

# RFC 5321 4.5.3.1.1 and 4.5.3.1.3: a local part of at most 64 octets, a path of at most 254.
_LOCAL_PART_MAX = 64
_ADDRESS_MAX = 254
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


def wire_address(address: str) -> str:
    """The address as it goes on the wire (IDNA domain), or ValueError with the reason.

    An ASCII dot-atom local part (RFC 5322 3.4.1), the common case, needs no more
    than a regex; its domain's verdict is email-validator's, cached per domain
    (a campaign has few domains and one address per row, so caching whole
    addresses would never hit). Anything else goes to email-validator whole.
    """
    local, at, domain = address.rpartition("@")
    if at and len(local) <= _LOCAL_PART_MAX and _DOT_ATOM.match(local):
        ascii_domain = wire_domain(domain)
        if len(local) + 1 + len(ascii_domain) <= _ADDRESS_MAX:
            return f"{local}@{ascii_domain}"
    return validate_address(address)


@lru_cache(maxsize=4096)
def wire_domain(domain: str) -> str:
    """A domain's ASCII (IDNA) form as email-validator judges it, or ValueError with its reason."""
    return validate_address(f"a@{domain}").rpartition("@")[2]


def validate_address(address: str) -> str:
    """email-validator's ASCII form of a whole address (no DNS, no SMTPUTF8), or ValueError."""
    try:
        result = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as err:
        raise ValueError(str(err)) from None
    return result.ascii_email or result.normalized


def canonical_address(address: str) -> str:
    """The mailbox ``address`` (stripped) reaches, as rows are keyed and compared: see the module."""
    if address.isascii():  # what _canonical gives an ASCII address, without its work
        return address.lower()
    return _canonical(address)


def _canonical(address: str) -> str:
    """NFC, the domain as the wire has it (when the wire takes it), lower-cased."""
    address = unicodedata.normalize("NFC", address)
    local, at, domain = address.rpartition("@")
    if at:
        with contextlib.suppress(ValueError):  # not a domain the wire takes: invalid when rendered
            domain = wire_domain(domain)
    return f"{local}{at}{domain}".lower()
