"""Re-keying a ledger written before recipient keys were canonical (issue 13), for both engines.

Before, an address row's key was its address stripped and lower-cased, so
``a@bücher.example`` and ``a@xn--bcher-kva.example`` were two recipients. A
ledger of that schema is re-keyed when it is opened: every address row whose
key changes under :func:`~mergekit.addresses.canonical_address` takes the
canonical key. Rows that end up sharing a key form one recipient:

- their occurrences are renumbered in file order (row, then old occurrence),
  as a fresh ingest of the file would number them, so a resumed ingest still
  matches every row by key and occurrence;
- the row that stands for the recipient is the first one already ``sent``, or
  else the first in file order; every other row still to send (``pending``,
  ``deferred``, ``unknown``) becomes ``duplicate``, naming it. Rows already
  sent under two spellings stay ``sent`` (both went out before the upgrade);
  nothing more goes to that address.

Rows keyed by a ``--key`` column (a key that is not the lower-cased address)
keep their key; the envelope claims (see ``Ledger.claim_addresses``) then keep
two of them from reaching one address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from .addresses import canonical_address

STILL_TO_SEND = frozenset({"pending", "deferred", "unknown"})
# States of a row whose message may have left: their addresses are claimed for the campaign.
MAY_HAVE_LEFT = ("sent", "unknown", "sending")


class KeyedRow(NamedTuple):
    """A recipient row as re-keying reads it."""

    id: int
    campaign_id: int
    row: int
    key: str
    occurrence: int
    email: str
    state: str


class KeyChange(NamedTuple):
    """What re-keying writes back for one row; ``state`` and ``reason`` are None when unchanged."""

    id: int
    key: str
    occurrence: int
    state: str | None
    reason: str | None


def is_old_address_key(row: KeyedRow) -> bool:
    """True for a row keyed by its address the old way (and whose canonical key differs)."""
    return row.key == row.email.lower() and canonical_address(row.email) != row.key


def plan(
    candidates: Iterable[Sequence[Any]], holders: Callable[[int, str], Iterable[Sequence[Any]]]
) -> list[KeyChange]:
    """The changes for the ``candidates`` (rows of non-ASCII addresses, as the engine selected
    them) whose keys are old address keys, grouped with the rows already holding their new keys
    (``holders(campaign_id, key)``, same campaign): one group per campaign and canonical key."""
    changing = [row for row in map(KeyedRow._make, candidates) if is_old_address_key(row)]
    new_keys = {(row.campaign_id, canonical_address(row.email)) for row in changing}
    holding = [KeyedRow._make(found) for campaign_id, key in new_keys for found in holders(campaign_id, key)]
    groups: dict[tuple[int, str], list[KeyedRow]] = {}
    for row in changing:
        groups.setdefault((row.campaign_id, canonical_address(row.email)), []).append(row)
    for row in holding:
        if (row.campaign_id, row.key) in groups:
            groups[row.campaign_id, row.key].append(row)
    changes: list[KeyChange] = []
    for (_, key), rows in groups.items():
        rows.sort(key=lambda r: (r.row, r.occurrence))
        keeper = next((r for r in rows if r.state == "sent"), rows[0])
        for occurrence, row in enumerate(rows):
            state = reason = None
            if row is not keeper and row.state in STILL_TO_SEND:
                state, reason = "duplicate", f"same recipient as row {keeper.row} ({key})"
            changes.append(KeyChange(row.id, key, occurrence, state, reason))
    return changes
