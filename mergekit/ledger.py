"""The ledger: the campaign's queue and its record at once.

One row per recipient holds the row's data, its state, attempts, next-attempt
time, last reply, provider id and Message-ID. Dispatch talks to the small
:class:`Ledger` interface only, so another engine (PostgreSQL) differs just in
how it claims and stores.

States::

    pending ──claim──► sending ──► sent | deferred | failed | unknown
    deferred (due) / unknown (by --unknown resend) ──claim──► sending
    invalid, duplicate, suppressed: recorded at ingest or render, never sent
    pending / deferred / unknown ──suppress──► suppressed (an address on a --suppress list,
        this run's or an earlier run's: the ledger remembers every list it was given)

Each rendered message claims its address for the campaign (``claim_addresses``,
the ``envelopes`` table) before it leaves, so two rows that reach one mailbox are
never both sent, whatever their keys (README "Recipients: one mailbox, one
recipient").

``sending`` is committed before the first byte of a batch leaves, and outcomes
are committed per batch in one transaction each, so a crash can only leave rows
in ``sending``; the next run turns them into ``unknown``.

Durability (SQLite): WAL with ``synchronous=FULL``, so a committed ``sent``
survives a power loss as well as a process kill. ``NORMAL`` would survive a
process kill only: a power loss could roll ``sending`` back to ``pending`` and
resend rows uncounted, so mergekit does not offer it (README "Guarantees").
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import secrets
import socket
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from . import rekey
from .addresses import canonical_address
from .errors import LedgerBusyError, LedgerError
from .ledger_faults import OPERATIONS, FileIdentity, guarded, save_orphan, sqlite_errors, sqlite_uri
from .ledger_file import LedgerFile
from .source import (
    IngestColumns,
    Layout,
    SeenKeys,
    SourceChunk,
    SourceRow,
    ingest_columns,
    json_objects,
    keys_of,
    pending_keys,
    quote_json,
)

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")
STATES = ("pending", "sending", "sent", "deferred", "failed", "invalid", "duplicate", "suppressed", "unknown")
# Rows still to be delivered: a campaign with any of these is resumable (exit 3).
OPEN_STATES = frozenset({"pending", "sending", "deferred", "unknown"})
# 2: a first ingest's pending rows in blocks (source_blocks); 3: campaigns.identity, canonical
# recipient keys (older ledgers are re-keyed on open, see mergekit.rekey) and the addresses
# claimed (envelopes)
SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Campaign:
    """A campaign as the ledger knows it; ``transport`` is the redacted URL of its last run.

    ``identity`` is random, made when the campaign is created and kept for good: its
    Message-IDs derive from it (:func:`~mergekit.render.make_message_id`), so every copy
    within the campaign has one id and no other campaign, of any name, repeats it. A
    campaign created before identities existed has its name as identity, which derives
    the Message-IDs it was already sending with.
    """

    id: int
    name: str
    template_path: str
    template_source: str
    template_fingerprint: str
    transport: str
    created_at: float
    identity: str
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Campaign:
        """From ``id, name, template_path, template_source, template_fingerprint, transport,
        created_at, settings, identity`` (settings as JSON text), the column order both engines select."""
        campaign_id, name, path, source, fingerprint, transport, created_at, settings, identity = row
        return cls(
            campaign_id,
            name,
            path,
            source,
            fingerprint,
            transport,
            created_at,
            identity,
            json.loads(settings),
        )


def new_identity() -> str:
    """A new campaign's identity: 128 random bits, never a name's (names are what it replaces)."""
    return f"campaign:{secrets.token_hex(16)}"


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """A row handed to dispatch in state ``sending``; ``previous`` is the state it came from."""

    id: int
    row: int
    key: str
    data: dict[str, str]
    attempts: int
    previous: str


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """What to write back for one claimed row; ``attempted`` adds one to its attempts."""

    id: int
    state: str
    attempted: bool = True
    code: int | None = None
    text: str = ""
    provider_id: str | None = None
    message_id: str | None = None
    next_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One recipient's record, as ``report`` shows it."""

    row: int
    key: str
    email: str
    state: str
    attempts: int
    last_code: int | None
    last_text: str
    provider_id: str
    message_id: str
    next_attempt_at: float | None
    unknown_count: int
    updated_at: float | None


class AddressClaim(NamedTuple):
    """A rendered row's claim on its envelope address (canonical: see mergekit.addresses)."""

    id: int
    row: int
    address: str


@dataclass(frozen=True)
class IngestCounts:
    """How many rows an ingest added, and how many it found already in the ledger."""

    added: int
    known: int


class SharedRateLimiter(Protocol):
    """A rate limiter that every process sending a campaign shares (see ``Ledger.rate_limiter``)."""

    per_second: float | None

    async def acquire(self, count: int) -> None:
        """Return when ``count`` more messages may leave."""

    def accepted(self, count: int) -> None:
        """Note ``count`` messages the server took just now."""

    def throttle(self, retry_after: float | None = None, reply: str = "") -> None:
        """Slow down after a throttling reply (``reply``): pause for ``retry_after``, lower the rate."""


class Ledger(ABC):
    """What dispatch and the commands need from a ledger; each call is one transaction.

    Every operation runs through the engine's :meth:`_guard` (wrapped here, for each
    engine's own methods), so a driver error always reaches the caller as a
    :class:`~mergekit.errors.LedgerError` (:mod:`.ledger_faults`).
    """

    path: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in OPERATIONS:
            if name in cls.__dict__:
                setattr(cls, name, guarded(cls.__dict__[name]))

    @abstractmethod
    def _guard(self, operation: str, call: Callable[[], T]) -> T:
        """``call()`` (the ledger operation named), its driver's errors raised as mergekit's."""

    @abstractmethod
    def open_campaign(
        self,
        name: str,
        *,
        template_path: str,
        template_source: str,
        fingerprint: str,
        transport: str,
        allow_template_change: bool,
        settings: dict[str, Any] | None = None,
    ) -> Campaign:
        """Create the campaign or check it against the template it was started with."""

    @guarded
    def find_campaign(self, name: str | None) -> Campaign:
        """The campaign named, or the only one, or else the most recent."""
        if name is None:
            found = self._latest_campaign()
            if found is None:
                raise LedgerError(
                    "the ledger holds no campaign yet",
                    path=self.path,
                    hint="Run mergekit send first, or pass the right --ledger",
                )
            return found
        found = self._campaign_named(name)
        if found is None:
            names = self._campaign_names()
            raise LedgerError(
                f"there is no campaign {name!r}"
                + (f"; it holds {', '.join(map(repr, names))}" if names else "; it is empty"),
                path=self.path,
                hint="Name one of its campaigns with --campaign",
            )
        return found

    @abstractmethod
    def _campaign_named(self, name: str) -> Campaign | None:
        """The campaign called ``name``, if any."""

    @abstractmethod
    def _latest_campaign(self) -> Campaign | None:
        """The campaign most recently opened by a ``send``, if any."""

    @abstractmethod
    def _campaign_names(self) -> list[str]:
        """Every campaign's name, sorted."""

    def _check_template(self, existing: Campaign, fingerprint: str, allow_template_change: bool) -> None:
        """Refuse to resume ``existing`` with another template unless allowed."""
        if existing.template_fingerprint != fingerprint and not allow_template_change:
            raise LedgerError(
                f"the template changed since campaign {existing.name!r} started ({existing.template_path})",
                path=self.path,
                hint="Pass --allow-template-change to send the remaining rows with the new "
                "template, or --campaign NAME to start a new campaign",
            )

    @abstractmethod
    def ingest(self, campaign: Campaign, chunks: Iterable[Sequence[SourceRow]]) -> IngestCounts:
        """Add rows not yet recorded (by key and occurrence); leave known rows untouched.

        ``chunks`` are :func:`~mergekit.source.read_rows`' chunks (inserted from
        their columns) or any sequences of rows; one transaction per chunk.
        """

    @abstractmethod
    def suppress(self, campaign: Campaign, addresses: Mapping[str, str]) -> int:
        """Remember ``addresses`` (lower-cased address -> source file) for the campaign, and mark
        every row still to send (pending, deferred, unknown) whose address is remembered
        ``suppressed``, including addresses remembered by earlier runs; return how many rows.
        """

    @abstractmethod
    def claim_addresses(self, campaign: Campaign, claims: Sequence[AddressClaim]) -> dict[int, int]:
        """Claim each rendered row's envelope address for the campaign, in one transaction, unless
        another row holds it; return, for each row whose address another row holds, that row's number.

        The database's unique constraint on (campaign, address) decides between processes
        claiming at once; a row claiming the address it holds (a resend) keeps it.
        """

    @abstractmethod
    def recover(self, campaign: Campaign) -> int:
        """Turn rows left in ``sending`` by a crash into ``unknown``; return how many."""

    @abstractmethod
    def claim(
        self,
        campaign: Campaign,
        limit: int,
        *,
        states: Sequence[str],
        due_before: float | None,
        settled_before: float | None = None,
    ) -> list[ClaimedRow]:
        """Mark up to ``limit`` rows of ``states`` as ``sending`` and return them, in the order
        they were recorded (SQLite: rows still in a first ingest's blocks first, in file order).

        ``deferred`` rows are claimed only when due (``next_attempt_at <= due_before``)
        unless ``due_before`` is None. With ``settled_before`` (a run's start), rows
        other than ``pending`` are claimed only if last updated before it, so a run
        never takes back a row it has itself left ``deferred``, ``unknown`` or
        ``failed``: that row waits for the next run.
        """

    @abstractmethod
    def record(self, campaign: Campaign, updates: Sequence[RowUpdate]) -> None:
        """Write a batch's outcomes in one transaction."""

    @abstractmethod
    def counts(self, campaign: Campaign) -> dict[str, int]:
        """Rows per state (every state present, zero where none)."""

    @abstractmethod
    def recovered_unknown(self, campaign: Campaign) -> int:
        """How many rows were ever found in ``sending`` after a crash."""

    @abstractmethod
    def next_due(self, campaign: Campaign) -> float | None:
        """The earliest ``next_attempt_at`` of a deferred row."""

    @abstractmethod
    def rows(self, campaign: Campaign, states: Sequence[str] | None = None) -> Iterator[LedgerRow]:
        """Every recipient's record in row order, optionally only those in ``states``."""

    @abstractmethod
    def lock_for_send(self, campaign: str) -> None:
        """Hold the ledger for sending campaign ``campaign`` (a name) until close; raise
        LedgerBusyError if another run holds it. Called before anything is recorded, so a
        refused run changes nothing."""

    @abstractmethod
    def is_locked(self, campaign: Campaign) -> bool:
        """True while some process holds the ledger for sending this campaign."""

    leases = False  # True where claims are leases that can lapse under a live process (PostgreSQL)

    def still_held(self, rows: Sequence[ClaimedRow]) -> list[ClaimedRow]:
        """The claimed ``rows`` this process still holds (with ``leases``: whose lease has not
        lapsed and been taken over); dispatch sends no other."""
        return list(rows)

    def rate_limiter(self, campaign: Campaign, per_second: float | None) -> SharedRateLimiter | None:
        """The campaign-wide limiter at ``per_second``, when several processes send one campaign.

        None (the default, and SQLite's answer: one process holds a campaign) means
        the run's own local limiter is the campaign's.
        """
        return None

    @abstractmethod
    def close(self) -> None:
        """Release locks and connections."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS campaigns (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    template_path TEXT NOT NULL,
    template_source TEXT NOT NULL,
    template_fingerprint TEXT NOT NULL,
    transport TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    identity TEXT NOT NULL DEFAULT ''  -- see Campaign; '' only before migration (_add_identities)
);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
    row INTEGER NOT NULL,
    key TEXT NOT NULL,
    occurrence INTEGER NOT NULL,
    email TEXT NOT NULL,
    data TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_code INTEGER,
    last_text TEXT NOT NULL DEFAULT '',
    provider_id TEXT NOT NULL DEFAULT '',
    message_id TEXT NOT NULL DEFAULT '',
    unknown_count INTEGER NOT NULL DEFAULT 0,
    updated_at REAL,
    UNIQUE (campaign_id, key, occurrence)
);
-- A first ingest's pending rows, one Arrow IPC stream per chunk of the file (issue 6: a
-- million rows inserted one by one were most of ingest's time). A row moves into
-- recipients when a claim takes it (rows [0, taken) of a block have), or when a
-- --suppress list names it first (ahead: such rows beyond taken). A block is deleted
-- once every row has moved.
CREATE TABLE IF NOT EXISTS source_blocks (
    id INTEGER PRIMARY KEY,
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
    size INTEGER NOT NULL,
    taken INTEGER NOT NULL DEFAULT 0,
    ahead INTEGER NOT NULL DEFAULT 0,
    layout TEXT NOT NULL,  -- the file's column names, and where its address and key are
    created_at REAL NOT NULL,
    rows BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS source_blocks_by_campaign ON source_blocks (campaign_id, id);
-- The envelope address each rendered row claimed: one row of a campaign per address (issue 13).
CREATE TABLE IF NOT EXISTS envelopes (
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
    address TEXT NOT NULL,
    recipient_id INTEGER NOT NULL,
    row INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, address)
);
CREATE TABLE IF NOT EXISTS suppressions (
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
    email TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (campaign_id, email)
);
-- claim() takes rows of a state in id order: with (campaign_id, state,
-- next_attempt_at), the index of earlier versions, every claim sorted all the
-- rows in that state (a temp b-tree), a cost that grew with the campaign.
DROP INDEX IF EXISTS recipients_by_state;
CREATE INDEX IF NOT EXISTS recipients_to_claim ON recipients (campaign_id, state, id);
"""


# A row's canonical address in SQL (the function is registered on every connection): SQLite's
# lower() folds ASCII letters only, which is the canonical form of an ASCII address.
_ADDRESS_SQL = "CASE WHEN email GLOB '*[^ -~]*' THEN mergekit_address(email) ELSE lower(email) END"
_KEYED_COLUMNS = "id, campaign_id, row, key, occurrence, email, state"


class SqliteLedger(Ledger):
    """The embedded ledger: one SQLite file in WAL mode, safe against a process kill."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        """Open (or with ``create``, create) the ledger file at ``path``."""
        self.path = path
        self._sending: str | None = None  # the campaign this ledger holds the file for
        self._decoded: tuple[int, pa.RecordBatch] | None = None  # the block last read
        self._identity: FileIdentity | None = None
        # Before SQLite opens it: the send lock's descriptor must outlive every connection.
        self._file = LedgerFile.open(path, create=create) if path != ":memory:" else None
        try:
            with sqlite_errors(path, opening=True):
                plain = create or path == ":memory:"
                target, uri = (path, False) if plain else (sqlite_uri(path, "rw"), True)
                self._db = sqlite3.connect(
                    target, isolation_level=None, check_same_thread=False, timeout=30, uri=uri
                )
                try:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("PRAGMA synchronous=FULL")
                    self._db.execute("PRAGMA foreign_keys=ON")
                    # What suppression compares a row's address by; SQL's own lower() for ASCII (the same)
                    self._db.create_function("mergekit_address", 1, canonical_address, deterministic=True)
                    self._db.executescript(_SCHEMA)
                    self._check_version()
                except BaseException:
                    self._db.close()
                    raise
        except BaseException:
            if self._file is not None:
                self._file.release()
            raise
        if path != ":memory:":
            self._identity = FileIdentity(path)

    def _check_version(self) -> None:
        found = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if found is not None and int(found[0]) == SCHEMA_VERSION:
            return
        with self._transaction():  # one process migrates; another waits, then finds it done
            found = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if found is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(found[0]) > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger was written by a newer mergekit (schema {found[0]}, "
                    f"this one reads {SCHEMA_VERSION})",
                    path=self.path,
                    hint="Upgrade mergekit, or use another --ledger",
                )
            elif int(found[0]) < 3:
                self._add_identities()
                self._rekey()
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
                )

    def _add_identities(self) -> None:
        """Schema 3 gives campaigns an identity; one created before keeps its name as identity,
        which derives the Message-IDs it has been sending with (unknown rows are resent with those)."""
        self._db.execute("ALTER TABLE campaigns ADD COLUMN identity TEXT NOT NULL DEFAULT ''")
        self._db.execute("UPDATE campaigns SET identity = name WHERE identity = ''")

    def _rekey(self) -> None:
        """Give a ledger of schema 2 canonical keys (see mergekit.rekey) and claim the addresses of
        rows that may have left. Rows in blocks are unpacked first (under their old keys) where
        any address is not ASCII, so that none shares a key with another unseen."""
        for (campaign_id,) in self._db.execute("SELECT DISTINCT campaign_id FROM source_blocks").fetchall():
            campaign = self._campaign_where("id = ?", (campaign_id,))
            assert campaign is not None
            self._unpack_blocks_if_not_ascii(campaign)
        changes = rekey.plan(
            self._db.execute(f"SELECT {_KEYED_COLUMNS} FROM recipients WHERE email GLOB '*[^ -~]*'"),
            lambda campaign_id, key: self._db.execute(
                f"SELECT {_KEYED_COLUMNS} FROM recipients WHERE campaign_id = ? AND key = ?",
                (campaign_id, key),
            ).fetchall(),
        )
        # Out of the way first (occurrences are never negative), so no step meets a unique key twice.
        self._db.executemany(
            "UPDATE recipients SET occurrence = -1 - id WHERE id = ?", [(c.id,) for c in changes]
        )
        self._db.executemany(
            "UPDATE recipients SET key = ?, occurrence = ?, state = coalesce(?, state),"
            " last_text = coalesce(?, last_text) WHERE id = ?",
            [(c.key, c.occurrence, c.state, c.reason, c.id) for c in changes],
        )
        listed = self._db.execute("SELECT campaign_id, email, source FROM suppressions").fetchall()
        self._db.executemany(
            "INSERT INTO suppressions VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [(campaign_id, canonical_address(email), source) for campaign_id, email, source in listed],
        )
        self._db.execute(
            "INSERT INTO envelopes (campaign_id, address, recipient_id, row) SELECT campaign_id,"
            f" {_ADDRESS_SQL}, id, row FROM recipients WHERE state IN {rekey.MAY_HAVE_LEFT}"
            " OR unknown_count > 0 ORDER BY state = 'sent' DESC, row ON CONFLICT DO NOTHING"
        )

    def _unpack_blocks_if_not_ascii(self, campaign: Campaign) -> None:
        """Move a campaign's rows in blocks into recipients under their keys of schema 2 (the
        address lower-cased) if any of their addresses is not ASCII."""
        blocks = self._blocks(campaign)
        if all(block.layout.key_at is not None or self._untaken(block).ascii_only() for block in blocks):
            return
        for block in blocks:
            columns = self._untaken(block).columns()
            if block.layout.key_at is None:
                columns = columns._replace(keys=[email.lower() for email in columns.emails])
            self._insert_rows(campaign, columns)
            self._db.execute("DELETE FROM source_blocks WHERE id = ?", (block.id,))
        self._decoded = None

    # -- campaigns -----------------------------------------------------------

    def open_campaign(
        self,
        name: str,
        *,
        template_path: str,
        template_source: str,
        fingerprint: str,
        transport: str,
        allow_template_change: bool,
        settings: dict[str, Any] | None = None,
    ) -> Campaign:
        now = time.time()
        # One write transaction: two sends started together must not both find the campaign
        # missing and both insert it (the second would fail on the unique name).
        with self._transaction():
            existing = self._campaign_where("name = ?", (name,))
            if existing is None:
                self._db.execute(
                    "INSERT INTO campaigns (name, template_path, template_source, template_fingerprint,"
                    " transport, settings, created_at, updated_at, identity)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        template_path,
                        template_source,
                        fingerprint,
                        transport,
                        json.dumps(settings or {}),
                        now,
                        now,
                        new_identity(),
                    ),
                )
            else:
                self._check_template(existing, fingerprint, allow_template_change)
                self._db.execute(
                    "UPDATE campaigns SET template_path = ?, template_source = ?, "
                    "template_fingerprint = ?, transport = ?, settings = ?, updated_at = ? WHERE id = ?",
                    (
                        template_path,
                        template_source,
                        fingerprint,
                        transport,
                        json.dumps(settings or existing.settings),
                        now,
                        existing.id,
                    ),
                )
        found = self._campaign_where("name = ?", (name,))
        assert found is not None
        return found

    def _campaign_named(self, name: str) -> Campaign | None:
        return self._campaign_where("name = ?", (name,))

    def _latest_campaign(self) -> Campaign | None:
        return self._campaign_where("1 = 1 ORDER BY updated_at DESC, id DESC LIMIT 1", ())

    def _campaign_names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM campaigns ORDER BY name")]

    def _campaign_where(self, where: str, args: tuple[Any, ...]) -> Campaign | None:
        row = self._db.execute(
            "SELECT id, name, template_path, template_source, template_fingerprint, transport,"
            f" created_at, settings, identity FROM campaigns WHERE {where}",
            args,
        ).fetchone()
        if row is None:
            return None
        return Campaign.from_row(row)

    # -- rows ----------------------------------------------------------------

    def ingest(self, campaign: Campaign, chunks: Iterable[Sequence[SourceRow]]) -> IngestCounts:
        """A campaign's first ingest stores each chunk's pending rows as one block, all in one
        transaction (a file with a bad row leaves nothing); later ones compare row by row."""
        if self._holds_rows(campaign):
            return self._ingest_rows(campaign, chunks, self._keys_in_blocks(campaign))
        added = 0
        by_rows = False  # once a chunk is not a SourceChunk, every row is compared by key
        with self._transaction():
            for chunk in chunks:
                if by_rows or not isinstance(chunk, SourceChunk):
                    if not by_rows:
                        self._unpack_blocks(campaign)
                        by_rows = True
                    added += self._insert_rows(campaign, ingest_columns(chunk))
                    continue
                added += self._insert_rows(campaign, ingest_columns(chunk.settled()))
                added += self._store_block(campaign, chunk)
        return IngestCounts(added, 0)

    def _ingest_rows(
        self, campaign: Campaign, chunks: Iterable[Sequence[SourceRow]], in_blocks: SeenKeys
    ) -> IngestCounts:
        """Insert the rows that are neither recipients (by key and occurrence, ON CONFLICT) nor
        in a block (a pending row there has occurrence 0, and its key in ``in_blocks``)."""
        import numpy as np

        added = known = 0
        for chunk in chunks:
            keys, occurrences = keys_of(chunk)
            held = in_blocks.holds(keys) & (np.asarray(occurrences) == 0)
            known += int(held.sum())
            if held.all():
                continue
            columns = ingest_columns(chunk)
            if held.any():
                columns = columns.only((~held).tolist())
            with self._transaction():
                inserted = self._insert_rows(campaign, columns)
            added += inserted
            known += len(columns.rows) - inserted
        return IngestCounts(added, known)

    def _keys_in_blocks(self, campaign: Campaign) -> SeenKeys:
        """The keys of the rows still in blocks (every one's occurrence is 0)."""
        keys = SeenKeys()
        for block in self._blocks(campaign):
            keys.count(self._untaken(block).identities()[2])
        return keys

    def _insert_rows(self, campaign: Campaign, chunk: IngestColumns) -> int:
        """Insert the rows not yet recorded (by key and occurrence); how many."""
        before = self._db.total_changes
        # One list per column, zipped: no tuple of a row built ahead of the driver's own.
        self._db.executemany(
            "INSERT INTO recipients (campaign_id, row, key, occurrence, email, data, state,"
            " last_text, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (campaign_id, key, occurrence) DO NOTHING",
            zip(
                repeat(campaign.id),
                chunk.rows,
                chunk.keys,
                chunk.occurrences,
                chunk.emails,
                chunk.data,
                chunk.states,
                chunk.reasons,
                repeat(time.time()),
            ),
        )
        return self._db.total_changes - before

    def _holds_rows(self, campaign: Campaign) -> bool:
        return bool(
            self._db.execute(
                "SELECT EXISTS (SELECT 1 FROM recipients WHERE campaign_id = ?)"
                " OR EXISTS (SELECT 1 FROM source_blocks WHERE campaign_id = ?)",
                (campaign.id, campaign.id),
            ).fetchone()[0]
        )

    def _store_block(self, campaign: Campaign, chunk: SourceChunk) -> int:
        """Store the chunk's pending rows as one Arrow IPC stream; how many."""
        import pyarrow as pa

        batch = chunk.pending_batch()
        if not batch.num_rows:
            return 0
        sink = pa.BufferOutputStream()
        # zstd: a third of the bytes to write twice (WAL, then the file) for 5 ms per 100,000 rows
        with pa.ipc.new_stream(
            sink, batch.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")
        ) as writer:
            writer.write_batch(batch)
        self._db.execute(
            "INSERT INTO source_blocks (campaign_id, size, layout, created_at, rows) VALUES (?, ?, ?, ?, ?)",
            (campaign.id, batch.num_rows, json.dumps(chunk.layout), time.time(), memoryview(sink.getvalue())),
        )
        return int(batch.num_rows)

    def _blocks(self, campaign: Campaign) -> list[_Block]:
        """The campaign's blocks (each has rows still in it), in file order."""
        return [
            _Block(block_id, size, taken, ahead, Layout(*json.loads(layout)), created_at)
            for block_id, size, taken, ahead, layout, created_at in self._db.execute(
                "SELECT id, size, taken, ahead, layout, created_at FROM source_blocks WHERE campaign_id = ?"
                " ORDER BY id",
                (campaign.id,),
            )
        ]

    def _untaken(self, block: _Block, limit: int | None = None) -> _BlockRows:
        """Rows ``[taken, taken + limit)`` of a block. The block last read stays decoded:
        a claim takes a few hundred of its rows at a time."""
        import pyarrow as pa

        if self._decoded is None or self._decoded[0] != block.id:
            (blob,) = self._db.execute("SELECT rows FROM source_blocks WHERE id = ?", (block.id,)).fetchone()
            self._decoded = (block.id, pa.ipc.open_stream(blob).read_next_batch())
        return _BlockRows(block.layout, self._decoded[1].slice(block.taken, limit))

    def _unpack_blocks(self, campaign: Campaign) -> None:
        """Move every row still in a block into recipients as ``pending``, to compare rows by key."""
        for block in self._blocks(campaign):
            self._insert_rows(campaign, self._untaken(block).columns())
            self._db.execute("DELETE FROM source_blocks WHERE id = ?", (block.id,))
        self._decoded = None

    def suppress(self, campaign: Campaign, addresses: Mapping[str, str]) -> int:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO suppressions (campaign_id, email, source) VALUES (?, ?, ?)"
                " ON CONFLICT (campaign_id, email) DO NOTHING",
                [(campaign.id, email, source) for email, source in addresses.items()],
            )
            cursor = self._db.execute(
                "UPDATE recipients SET state = 'suppressed', updated_at = ?,"
                " last_text = 'address listed in ' || (SELECT source FROM suppressions s"
                f"  WHERE s.campaign_id = recipients.campaign_id AND s.email = {_ADDRESS_SQL})"
                " || ' (--suppress)'"
                " WHERE campaign_id = ? AND state IN ('pending', 'deferred', 'unknown')"
                f" AND {_ADDRESS_SQL} IN (SELECT email FROM suppressions WHERE campaign_id = ?)",
                (time.time(), campaign.id, campaign.id),
            )
            return cursor.rowcount + self._suppress_in_blocks(campaign)

    def _suppress_in_blocks(self, campaign: Campaign) -> int:
        """Move the rows still in blocks whose address is remembered into recipients as ``suppressed``."""
        blocks = self._blocks(campaign)
        listed: dict[str, str] = {}
        if blocks:
            listed = dict(
                self._db.execute(
                    "SELECT email, source FROM suppressions WHERE campaign_id = ?", (campaign.id,)
                )
            )
        count = 0
        for block in blocks if listed else ():
            part = self._untaken(block)
            listed_here = [canonical_address(email) in listed for email in part.identities()[1]]
            if not any(listed_here):
                continue
            suppressed = part.columns().only(listed_here)
            suppressed = suppressed._replace(
                states=["suppressed"] * len(suppressed.rows),
                reasons=[
                    f"address listed in {listed[canonical_address(email)]} (--suppress)"
                    for email in suppressed.emails
                ],
            )
            inserted = self._insert_rows(campaign, suppressed)
            self._db.execute("UPDATE source_blocks SET ahead = ahead + ? WHERE id = ?", (inserted, block.id))
            count += inserted
        return count

    def claim_addresses(self, campaign: Campaign, claims: Sequence[AddressClaim]) -> dict[int, int]:
        table = json.dumps(claims)
        with self._transaction():
            self._db.execute(
                "INSERT INTO envelopes (campaign_id, address, recipient_id, row)"
                " SELECT ?, value ->> 2, value ->> 0, value ->> 1 FROM json_each(?) WHERE true"
                " ON CONFLICT (campaign_id, address) DO NOTHING",
                (campaign.id, table),
            )
            held = self._db.execute(
                # CROSS JOIN: the claims outside, each a search of the primary key (SQLite's own
                # plan scanned the campaign's addresses for each batch, 10x slower at 20,000 rows)
                "SELECT c.value ->> 0, e.recipient_id, e.row FROM json_each(?) AS c CROSS JOIN envelopes e"
                " ON e.campaign_id = ? AND e.address = c.value ->> 2",
                (table, campaign.id),
            ).fetchall()
        return {claimer: row for claimer, holder, row in held if holder != claimer}

    def recover(self, campaign: Campaign) -> int:
        with self._transaction():
            cursor = self._db.execute(
                "UPDATE recipients SET state = 'unknown', unknown_count = unknown_count + 1,"
                " last_text = 'found in sending after an interrupted run: the message may or may'"
                " || ' not have left', updated_at = ? WHERE campaign_id = ? AND state = 'sending'",
                (time.time(), campaign.id),
            )
        return cursor.rowcount

    def claim(
        self,
        campaign: Campaign,
        limit: int,
        *,
        states: Sequence[str],
        due_before: float | None,
        settled_before: float | None = None,
    ) -> list[ClaimedRow]:
        claimed: list[ClaimedRow] = []
        now = time.time()
        with self._transaction():
            for state in states:
                if state == "pending":  # the first ingest's rows first, in file order
                    claimed.extend(self._claim_from_blocks(campaign, limit - len(claimed), now))
                if len(claimed) >= limit:
                    break
                condition, bound = claim_condition(state, due_before, settled_before)
                # One JSON array per claim, not one fetched row per recipient: every step of a
                # statement lets go of the GIL, and this runs on the ledger thread while the
                # sending loop holds it; a per-row fetch waited for it once per row.
                found = self._db.execute(
                    "SELECT json_group_array(json_array(id, row, key, json(data), attempts)) FROM"
                    f" (SELECT id, row, key, data, attempts FROM recipients WHERE campaign_id = ?"
                    f" AND state = ? {condition.replace('%s', '?')} ORDER BY id LIMIT ?)",
                    (campaign.id, state, *bound, limit - len(claimed)),
                ).fetchone()[0]
                rows = json.loads(found)
                if not rows:
                    continue
                self._db.execute(
                    "UPDATE recipients SET state = 'sending', updated_at = ?"
                    " WHERE id IN (SELECT value FROM json_each(?))",
                    (now, json.dumps([r[0] for r in rows])),
                )
                claimed.extend(ClaimedRow(i, r, k, d, a, state) for i, r, k, d, a in rows)
        return claimed

    def _claim_from_blocks(self, campaign: Campaign, limit: int, now: float) -> list[ClaimedRow]:
        """Move up to ``limit`` rows from the blocks into recipients as ``sending``, in file order."""
        claimed: list[ClaimedRow] = []
        blocks = self._blocks(campaign)
        while blocks and len(claimed) < limit:
            block = blocks[0]
            part = self._untaken(block, limit - len(claimed))
            columns = part.columns()
            # One statement per part, as claim and record do (see claim); a row that a
            # --suppress list took ahead conflicts and is left out.
            inserted = self._db.execute(
                "INSERT INTO recipients (campaign_id, row, key, occurrence, email, data, state, updated_at)"
                " SELECT ?, value ->> 0, value ->> 1, value ->> 2, value ->> 3, value -> 4, 'sending', ?"
                " FROM json_each(?) WHERE true ON CONFLICT (campaign_id, key, occurrence) DO NOTHING"
                " RETURNING id, key, occurrence",
                (campaign.id, now, part.json_array(columns)),
            ).fetchall()
            at = {pair: i for i, pair in enumerate(zip(columns.keys, columns.occurrences, strict=True))}
            data = part.dicts()
            for row_id, key, occurrence in inserted:
                i = at[key, occurrence]
                claimed.append(ClaimedRow(row_id, columns.rows[i], key, data[i], 0, "pending"))
            skipped = len(part) - len(inserted)
            if block.taken + len(part) >= block.size:
                self._db.execute("DELETE FROM source_blocks WHERE id = ?", (block.id,))
                self._decoded = None
                blocks.pop(0)
                continue
            self._db.execute(
                "UPDATE source_blocks SET taken = taken + ?, ahead = ahead - ? WHERE id = ?",
                (len(part), skipped, block.id),
            )
            blocks[0] = block._replace(taken=block.taken + len(part), ahead=block.ahead - skipped)
        return claimed

    def record(self, campaign: Campaign, updates: Sequence[RowUpdate]) -> None:
        # One statement over a JSON array rather than executemany: one step, so the ledger
        # thread takes the GIL back once per round instead of once per row (see claim).
        # ensure_ascii=False: SQLite would store an escaped lone surrogate (a reply's
        # undecodable byte) as invalid UTF-8; here it becomes "?" instead.
        table = (
            json.dumps(
                [
                    [
                        u.id,
                        u.state,
                        int(u.attempted),
                        u.code,
                        u.text,
                        u.provider_id,
                        u.message_id,
                        u.next_attempt_at,
                        int(u.state == "unknown"),  # every unknown episode counts, crash or lost reply
                    ]
                    for u in updates
                ],
                ensure_ascii=False,
            )
            .encode("utf-8", "replace")
            .decode("utf-8")
        )
        with self._transaction():
            self._db.execute(
                "UPDATE recipients SET state = u.value ->> 1, attempts = attempts + (u.value ->> 2),"
                " last_code = u.value ->> 3, last_text = u.value ->> 4,"
                " provider_id = COALESCE(u.value ->> 5, provider_id),"
                " message_id = COALESCE(u.value ->> 6, message_id), next_attempt_at = u.value ->> 7,"
                " updated_at = ?, unknown_count = unknown_count + (u.value ->> 8)"
                # ``+campaign_id``: by the primary key per update, not a scan of the campaign's index
                " FROM json_each(?) AS u WHERE recipients.id = u.value ->> 0 AND +campaign_id = ?",
                (time.time(), table, campaign.id),
            )

    def counts(self, campaign: Campaign) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, count in self._db.execute(
            "SELECT state, count(*) FROM recipients WHERE campaign_id = ? GROUP BY state",
            (campaign.id,),
        ):
            counts[state] = count
        counts["pending"] += self._db.execute(
            "SELECT coalesce(sum(size - taken - ahead), 0) FROM source_blocks WHERE campaign_id = ?",
            (campaign.id,),
        ).fetchone()[0]
        return counts

    def recovered_unknown(self, campaign: Campaign) -> int:
        return int(
            self._db.execute(
                "SELECT count(*) FROM recipients WHERE campaign_id = ? AND unknown_count > 0",
                (campaign.id,),
            ).fetchone()[0]
        )

    def next_due(self, campaign: Campaign) -> float | None:
        found = self._db.execute(
            "SELECT min(next_attempt_at) FROM recipients WHERE campaign_id = ? AND state = 'deferred'",
            (campaign.id,),
        ).fetchone()[0]
        return float(found) if found is not None else None

    def rows(self, campaign: Campaign, states: Sequence[str] | None = None) -> Iterator[LedgerRow]:
        where, args = "campaign_id = ?", [campaign.id, *(states or ())]
        if states:
            where += f" AND state IN ({', '.join('?' * len(states))})"
        cursor = self._db.execute(
            "SELECT row, occurrence, key, email, state, attempts, last_code, last_text, provider_id,"
            f" message_id, next_attempt_at, unknown_count, updated_at FROM recipients WHERE {where}"
            " ORDER BY row, occurrence",
            args,
        )
        recorded = ((record[:2], LedgerRow(record[0], *record[2:])) for record in cursor)
        if states and "pending" not in states:
            yield from (row for _, row in recorded)
            return
        merged = heapq.merge(recorded, self._pending_in_blocks(campaign), key=lambda item: item[0])
        yield from (row for _, row in merged)

    def _pending_in_blocks(self, campaign: Campaign) -> Iterator[tuple[tuple[int, int], LedgerRow]]:
        """The rows still in blocks as ``report`` lists them, after their (row, occurrence 0)."""
        blocks = self._blocks(campaign)
        ahead: set[str] = set()  # keys of rows a --suppress list took: recipients lists those
        if any(block.ahead for block in blocks):
            ahead = {
                key
                for (key,) in self._db.execute(
                    "SELECT key FROM recipients WHERE campaign_id = ? AND state = 'suppressed'"
                    " AND occurrence = 0",
                    (campaign.id,),
                )
            }
        for block in blocks:
            for row, email, key in zip(*self._untaken(block).identities(), strict=True):
                if key not in ahead:
                    ledger_row = LedgerRow(
                        row, key, email, "pending", 0, None, "", "", "", None, 0, block.created_at
                    )
                    yield (row, 0), ledger_row

    # -- locking -------------------------------------------------------------

    def lock_for_send(self, campaign: str) -> None:
        """One send per ledger FILE (any campaign): ``flock`` on the database file (see
        :mod:`mergekit.ledger_file`), and who holds it in the ``meta`` table for the message."""
        if self._file is None:
            self._sending = campaign
            return
        if not self._file.try_lock():
            raise LedgerBusyError(
                self._busy_message(),
                path=self.path,
                hint="Wait for it to finish (mergekit status shows progress), or stop it first; "
                "one send at a time per ledger file",
            )
        self._sending = campaign
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "campaign": campaign}
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('sender', ?)", (json.dumps(holder),))

    def _busy_message(self) -> str:
        """Who holds the lock (campaign, pid, host if not this one), as the holder recorded it."""
        holder = self._holder_record()
        if not holder:
            return "the ledger is being sent by another mergekit"
        pid = str(holder["pid"])
        if holder["host"] != socket.gethostname():
            pid += f" on {holder['host']}"
        return f"campaign {holder['campaign']!r} is being sent by another mergekit (pid {pid})"

    def _holder_record(self) -> dict[str, Any]:
        """What the run holding the lock recorded, unless it is an earlier (dead) run's record:
        the holder may not have written its own yet."""
        found = self._db.execute("SELECT value FROM meta WHERE key = 'sender'").fetchone()
        holder: dict[str, Any] = json.loads(found[0]) if found else {}
        if not holder or (holder["host"] == socket.gethostname() and not _alive(holder["pid"])):
            return {}
        return holder

    def is_locked(self, campaign: Campaign) -> bool:
        if self._sending is not None:
            return self._sending == campaign.name
        if self._file is None or not self._file.is_locked():
            return False
        holder = self._holder_record()
        return not holder or holder["campaign"] == campaign.name

    def close(self) -> None:
        self._db.close()
        if self._file is not None:
            if self._sending is not None:
                self._file.unlock()
            self._file.release()
            self._file = None
        self._sending = None

    # -- helpers -------------------------------------------------------------

    def _guard(self, operation: str, call: Callable[[], T]) -> T:
        with sqlite_errors(self.path):
            return call()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on error): one write transaction.

        The file is checked before and after: SQLite goes on writing into a ledger
        file deleted meanwhile, so a run would record into nothing (ledger_faults).
        """
        self._check_file()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full) leaves the transaction open; a failed statement may
            # have rolled it back already. The first error is the one to report.
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise
        self._check_file()

    def _check_file(self) -> None:
        if self._identity is not None and self._identity.changed():
            raise save_orphan(self._db, self._identity)


class _Block(NamedTuple):
    """A block's bookkeeping: rows ``[0, taken)`` are in recipients, and ``ahead`` of the rest."""

    id: int
    size: int
    taken: int
    ahead: int
    layout: Layout
    created_at: float


class _BlockRows:
    """Consecutive rows of a block: Arrow columns ``row``, then the CSV's (see SourceChunk.pending_batch)."""

    def __init__(self, layout: Layout, batch: pa.RecordBatch) -> None:
        self._layout = layout
        self._batch = batch
        self._values: list[list[str]] | None = None

    def __len__(self) -> int:
        return int(self._batch.num_rows)

    def _data_values(self) -> list[list[str]]:
        if self._values is None:
            self._values = [column.to_pylist() for column in self._batch.columns[1:]]
        return self._values

    def ascii_only(self) -> bool:
        """True when every row's address is ASCII (its key is the same in schemas 2 and 3)."""
        import pyarrow.compute as pc

        emails = self._batch.column(1 + self._layout.email_at)
        return pc.all(pc.string_is_ascii(emails)).as_py() is not False

    def identities(self) -> tuple[list[int], list[str], list[str]]:
        """The rows' numbers, addresses and keys (each row's occurrence is 0)."""
        return self._batch.column(0).to_pylist(), *pending_keys(self._layout, self._data_values())

    def columns(self) -> IngestColumns:
        """The rows as ``pending`` rows are inserted, their data as JSON text."""
        rows, emails, keys = self.identities()
        count = len(rows)
        return IngestColumns(
            rows,
            keys,
            [0] * count,
            emails,
            json_objects(self._layout.names, self._data_values()),
            ["pending"] * count,
            [""] * count,
        )

    def dicts(self) -> list[dict[str, str]]:
        """Each row's data as ``dict(zip(names, row))`` (a name given twice: its last value)."""
        names = self._layout.names
        return [dict(zip(names, values, strict=True)) for values in zip(*self._data_values(), strict=True)]

    @staticmethod
    def json_array(columns: IngestColumns) -> str:
        """``[[row, key, occurrence, email, data], …]`` as JSON text, for an INSERT … FROM json_each."""
        entries = zip(
            columns.rows,
            map(quote_json, columns.keys),
            columns.occurrences,
            map(quote_json, columns.emails),
            columns.data,
            strict=True,
        )
        return "[" + ",".join(map("[%d,%s,%d,%s,%s]".__mod__, entries)) + "]"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def claim_condition(
    state: str, due_before: float | None, settled_before: float | None
) -> tuple[str, tuple[float, ...]]:
    """The extra ``AND …`` (with ``%s`` placeholders) that limits a claim of ``state``, and its values."""
    condition = ""
    values: tuple[float, ...] = ()
    if state == "deferred" and due_before is not None:
        condition, values = "AND next_attempt_at <= %s", (due_before,)
    if state != "pending" and settled_before is not None:
        condition, values = f"{condition} AND updated_at < %s", (*values, settled_before)
    return condition, values


def open_ledger(location: str) -> Ledger:
    """The ledger at ``location``: a ``postgresql://`` URL, or else a SQLite file path."""
    if location.startswith(("postgresql://", "postgres://")):
        try:
            from .ledger_postgres import PostgresLedger
        except ImportError as err:
            from .errors import ConfigError

            raise ConfigError(
                f"PostgreSQL ledgers need psycopg, which is not installed ({err})",
                option="--ledger",
                hint="Install it with: pip install 'mergekit[postgres]'",
            ) from None
        return PostgresLedger(location)
    if "://" in location:
        from .errors import ConfigError

        raise ConfigError(
            f"{location.split('://', 1)[0]}:// is not a ledger engine mergekit knows",
            option="--ledger",
            hint="Use a SQLite file path (default mergekit.db) or postgresql://USER@HOST/DB",
        )
    return SqliteLedger(location)
