"""The PostgreSQL ledger: one campaign shared by any number of workers on any number of machines.

``--ledger postgresql://user@host/db`` (``postgres://`` too) selects it. The
states, their meaning and every command are those of :mod:`mergekit.ledger`;
what differs is how rows are claimed and how a dead sender is noticed:

- **Claiming** takes up to ``limit`` rows with ``SELECT … FOR UPDATE SKIP
  LOCKED`` (two workers never hold the same row, and neither waits for the
  other) and marks them ``sending`` with this worker's id and a **lease**: a
  server-clock expiry ``lease`` seconds ahead (``?lease=SECONDS`` in the URL,
  default :data:`DEFAULT_LEASE`).
- **Renewing**: while this ledger holds rows in ``sending``, a background
  thread pushes their expiry forward every third of a lease, so a batch may
  take longer than one lease as long as its worker lives.
- **A dead worker** stops renewing. When its lease has expired, the next
  claim (or ``recover``) by any worker turns its rows ``unknown``; the
  campaign's ``--unknown`` rule then resends them with the same Message-ID or
  leaves them.
- **Late outcomes** are fenced: a worker writes a row's outcome only while the
  row is still ``sending`` under its own id, whether or not its lease has
  lapsed meanwhile (nobody else took the row). Once another worker has
  recovered the row, only a late ``sent`` is still written, and only while the
  row is ``unknown`` under this worker's id (recovered, not yet claimed again):
  a row another worker holds or has settled keeps that worker's outcome.
- **A lost connection** (server restarted, backend terminated) is reconnected
  for up to :data:`RECONNECT_WINDOW` seconds and the operation run again, as
  every operation is idempotent (``record`` by its own timestamp) except a claim
  whose COMMIT was cut off: its outcome cannot be known, so the worker stops
  with a one-line error (exit 3) and those rows return ``unknown`` after a lease.
- **One rate for the campaign**: :class:`PostgresRateLimiter` keeps the token
  bucket in a row (``mergekit_rate``) that every worker updates per batch, so
  ``--rate`` is the total over all workers (providers limit per account).

Tables are prefixed ``mergekit_`` so the ledger can share a database; the
schema is created on first use under an advisory lock and versioned in
``mergekit_schema``: a ledger written by a newer mergekit is refused.
Times shown in reports are the workers' clocks; leases and the rate bucket use
the server's clock only, so machines' clocks need not agree for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from . import rekey
from .addresses import canonical_address
from .dispatch import THROTTLE_COOLDOWN, THROTTLE_FACTOR
from .errors import ConfigError, LedgerError, LedgerStorageError
from .ledger import (
    STATES,
    AddressClaim,
    Campaign,
    ClaimedRow,
    IngestCounts,
    Ledger,
    LedgerRow,
    RowUpdate,
    claim_condition,
    new_identity,
)
from .source import SourceRow, ingest_columns
from .transports.base import redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

# 2: mergekit_campaigns.identity (see Campaign), canonical recipient keys (older ledgers are
# re-keyed), mergekit_envelopes
SCHEMA_VERSION = 2
DEFAULT_LEASE = 60.0  # seconds a claimed row stays this worker's without a renewal
RECONNECT_WINDOW = 30.0  # seconds a worker tries to reach a restarting server before it gives up
RENEWALS_PER_LEASE = 3  # a lease survives two missed renewals (a stalled thread, a slow commit)
LOST_CONNECTION_HINT = (
    "Check that the server runs and is reachable, then run the same command again: "
    "rows this process held return as unknown after one lease"
)
_SCHEMA_LOCK = 0x6D6B6C67  # pg_advisory_xact_lock key ("mklg"): one schema creator at a time

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mergekit_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS mergekit_campaigns (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    template_path text NOT NULL,
    template_source text NOT NULL,
    template_fingerprint text NOT NULL,
    transport text NOT NULL,
    settings text NOT NULL DEFAULT '{}',
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    identity text NOT NULL DEFAULT ''  -- '' only before migration (_migrate)
);
CREATE TABLE IF NOT EXISTS mergekit_recipients (
    id bigserial PRIMARY KEY,
    campaign_id bigint NOT NULL REFERENCES mergekit_campaigns(id),
    row integer NOT NULL,
    key text NOT NULL,
    occurrence integer NOT NULL,
    email text NOT NULL,
    data text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    last_code integer,
    last_text text NOT NULL DEFAULT '',
    provider_id text NOT NULL DEFAULT '',
    message_id text NOT NULL DEFAULT '',
    unknown_count integer NOT NULL DEFAULT 0,
    updated_at double precision,
    worker_id text,
    lease_expires_at timestamptz,
    UNIQUE (campaign_id, key, occurrence)
);
CREATE INDEX IF NOT EXISTS mergekit_recipients_by_state ON mergekit_recipients (campaign_id, state, id);
CREATE INDEX IF NOT EXISTS mergekit_recipients_leased
    ON mergekit_recipients (worker_id) WHERE state = 'sending';
CREATE TABLE IF NOT EXISTS mergekit_suppressions (
    campaign_id bigint NOT NULL REFERENCES mergekit_campaigns(id),
    email text NOT NULL,
    source text NOT NULL,
    PRIMARY KEY (campaign_id, email)
);
-- The envelope address each rendered row claimed: one row of a campaign per address (issue 13).
CREATE TABLE IF NOT EXISTS mergekit_envelopes (
    campaign_id bigint NOT NULL REFERENCES mergekit_campaigns(id),
    address text NOT NULL,
    recipient_id bigint NOT NULL,
    row integer NOT NULL,
    PRIMARY KEY (campaign_id, address)
);
CREATE TABLE IF NOT EXISTS mergekit_rate (
    campaign_id bigint PRIMARY KEY REFERENCES mergekit_campaigns(id),
    per_second double precision NOT NULL,
    next_free timestamptz NOT NULL
);
"""

_KEYED_COLUMNS = "id, campaign_id, row, key, occurrence, email, state"
_NOT_ASCII = r"[^\x01-\x7f]"  # a regular expression: a character that is not ASCII
_CAMPAIGN_COLUMNS = (
    "id, name, template_path, template_source, template_fingerprint, transport, created_at, settings,"
    " identity"
)


def split_ledger_url(url: str) -> tuple[str, float]:
    """The libpq connection URL and the lease in seconds (``?lease=`` is mergekit's, not libpq's)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    lease = DEFAULT_LEASE
    kept = []
    for name, value in query:
        if name != "lease":
            kept.append((name, value))
            continue
        try:
            lease = float(value)
        except ValueError:
            lease = 0.0
        if lease <= 0:
            raise ConfigError(
                f"?lease={value!r} in {redact_url(url)} is not a positive number of seconds",
                option="--ledger",
                hint="Use e.g. ?lease=60",
            )
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment)), lease


class PostgresLedger(Ledger):
    """The shared ledger: a PostgreSQL database that many ``mergekit worker`` processes claim from."""

    def __init__(self, url: str, *, worker_id: str | None = None) -> None:
        self.path = redact_url(url)
        conninfo, self.lease = split_ledger_url(url)
        self._conninfo = conninfo
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._in_doubt = False  # a claim's COMMIT is on its way: its outcome unknown if cut off
        # Monotonic time until which this worker's leases surely hold: None before its first
        # claim, -inf once they lapsed (paused, cut off), after which it always asks (still_held).
        self._lease_sure_until: float | None = None
        opened: list[psycopg.Connection[Any]] = []
        try:
            opened.append(self._connect(conninfo))
            # A second connection for the lease renewals and the rate bucket, so they never
            # queue behind a claim or a commit of the sending loop.
            opened.append(self._connect(conninfo))
            self._db, self._side = opened
            self._create_schema()
        except BaseException as err:
            for connection in opened:
                connection.close()
            if not isinstance(err, psycopg.Error):
                raise
            raise LedgerError(
                f"cannot open the PostgreSQL ledger: {_first_line(err)}",
                path=self.path,
                hint="Check the --ledger URL (user, host, port, database) and that the server runs",
            ) from None
        self._side_lock = threading.Lock()
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    def _guard(self, operation: str, call: Callable[[], T]) -> T:
        """Map psycopg's errors to LedgerStorageError; after a lost connection, reconnect and run
        the operation again unless that could repeat it (a claim cut off at COMMIT, a report
        half read)."""
        try:
            return call()
        except psycopg.Error as err:
            lost = self._db.closed
            in_doubt, self._in_doubt = self._in_doubt, False
            if not lost or in_doubt or operation in ("rows", "close"):
                raise self._fault(err, lost=lost) from None
            log.warning("lost the connection to the ledger (%s); reconnecting", _first_line(err))
        self._db = self._reconnect(self._db)
        try:
            return call()
        except psycopg.Error as err:
            raise self._fault(err, lost=self._db.closed) from None

    def _fault(self, err: psycopg.Error, *, lost: bool) -> LedgerStorageError:
        if lost:
            return LedgerStorageError(
                f"lost the connection to the PostgreSQL ledger ({_first_line(err)})",
                path=self.path,
                hint=LOST_CONNECTION_HINT,
            )
        return LedgerStorageError(
            f"the PostgreSQL ledger failed: {_first_line(err)}",
            path=self.path,
            hint="Fix the cause on the server, then run the same command again to resume",
        )

    def _reconnect(self, old: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        """A new connection in place of ``old`` (lost), trying for up to RECONNECT_WINDOW seconds."""
        with contextlib.suppress(psycopg.Error):
            old.close()
        deadline = time.monotonic() + RECONNECT_WINDOW
        while True:
            try:
                return self._connect(self._conninfo)
            except psycopg.OperationalError as err:
                if time.monotonic() > deadline:
                    raise LedgerStorageError(
                        f"lost the connection to the PostgreSQL ledger and could not reconnect "
                        f"for {RECONNECT_WINDOW:.0f} s ({_first_line(err)})",
                        path=self.path,
                        hint=LOST_CONNECTION_HINT,
                    ) from None
                time.sleep(0.5)

    def _connect(self, conninfo: str) -> psycopg.Connection[Any]:
        # The worker's id in pg_stat_activity: an operator sees which worker holds which backend.
        name = f"mergekit {self.worker_id}"[:63]
        return psycopg.connect(conninfo, autocommit=True, application_name=name, connect_timeout=10)

    def _create_schema(self) -> None:
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            self._db.execute(_SCHEMA)
            found = self._db.execute("SELECT max(version) FROM mergekit_schema").fetchone()
            if found is None or found[0] is None:
                self._db.execute("INSERT INTO mergekit_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif found[0] < SCHEMA_VERSION:
                self._migrate()
            elif found[0] > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger was written by a newer mergekit (schema {found[0]}, "
                    f"this one reads {SCHEMA_VERSION})",
                    path=self.path,
                    hint="Upgrade mergekit on this machine, or use another --ledger",
                )

    def _migrate(self) -> None:
        """Bring an earlier schema to this one (in the schema's transaction, under its lock).
        2: campaigns get an identity; one created before keeps its name as identity, which
        derives the Message-IDs it has been sending with (unknown rows are resent with those); and
        canonical recipient keys (:meth:`_rekey`)."""
        self._db.execute(
            "ALTER TABLE mergekit_campaigns ADD COLUMN IF NOT EXISTS identity text NOT NULL DEFAULT ''"
        )
        self._db.execute("UPDATE mergekit_campaigns SET identity = name WHERE identity = ''")
        self._rekey()
        self._db.execute("UPDATE mergekit_schema SET version = %s", (SCHEMA_VERSION,))

    def _rekey(self) -> None:
        """Give a ledger of schema 1 canonical keys (see mergekit.rekey) and claim the addresses of
        rows that may have left; in the schema's transaction, under its advisory lock."""
        changes = rekey.plan(
            self._db.execute(
                f"SELECT {_KEYED_COLUMNS} FROM mergekit_recipients WHERE email ~ '{_NOT_ASCII}'"  # type: ignore[arg-type]
            ).fetchall(),
            lambda campaign_id, key: self._db.execute(
                f"SELECT {_KEYED_COLUMNS} FROM mergekit_recipients WHERE campaign_id = %s AND key = %s",  # type: ignore[arg-type]
                (campaign_id, key),
            ).fetchall(),
        )
        with self._db.cursor() as cursor:
            # Out of the way first (occurrences are never negative), so no step meets a unique key twice.
            cursor.executemany(
                "UPDATE mergekit_recipients SET occurrence = -1 - id WHERE id = %s",
                [(c.id,) for c in changes],
            )
            cursor.executemany(
                "UPDATE mergekit_recipients SET key = %s, occurrence = %s, state = coalesce(%s, state),"
                " last_text = coalesce(%s, last_text) WHERE id = %s",
                [(c.key, c.occurrence, c.state, c.reason, c.id) for c in changes],
            )
            listed = self._db.execute(
                "SELECT campaign_id, email, source FROM mergekit_suppressions"
            ).fetchall()
            cursor.executemany(
                "INSERT INTO mergekit_suppressions VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(campaign_id, canonical_address(email), source) for campaign_id, email, source in listed],
            )
        went = " AND (state = ANY(%s) OR unknown_count > 0) ORDER BY state = 'sent' DESC, row"
        # ASCII addresses in SQL (lower under the C collation folds ASCII letters only), the others here.
        self._db.execute(
            "INSERT INTO mergekit_envelopes (campaign_id, address, recipient_id, row)"  # type: ignore[arg-type]
            ' SELECT campaign_id, lower(email COLLATE "C"), id, row FROM mergekit_recipients'
            f" WHERE email !~ '{_NOT_ASCII}' {went} ON CONFLICT DO NOTHING",
            (list(rekey.MAY_HAVE_LEFT),),
        )
        others = self._db.execute(
            "SELECT campaign_id, email, id, row FROM mergekit_recipients"  # type: ignore[arg-type]
            f" WHERE email ~ '{_NOT_ASCII}' {went}",
            (list(rekey.MAY_HAVE_LEFT),),
        ).fetchall()
        for campaign_id, email, row_id, row in others:
            self._claim(campaign_id, [AddressClaim(row_id, row, canonical_address(email))])

    def _claim(self, campaign_id: int, claims: Sequence[AddressClaim]) -> None:
        """Insert the claims in their order (the first for an address wins); a held address stays."""
        self._db.execute(
            "INSERT INTO mergekit_envelopes (campaign_id, address, recipient_id, row)"
            " SELECT %s, address, id, row FROM unnest(%s::text[], %s::bigint[], %s::integer[])"
            " WITH ORDINALITY AS c(address, id, row, n) ORDER BY n ON CONFLICT DO NOTHING",
            (campaign_id, [c.address for c in claims], [c.id for c in claims], [c.row for c in claims]),
        )

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
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO mergekit_campaigns (name, template_path, template_source,"
                " template_fingerprint, transport, settings, created_at, updated_at, identity)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
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
            existing = self._campaign_where("name = %s FOR UPDATE", (name,))
            assert existing is not None
            self._check_template(existing, fingerprint, allow_template_change)
            self._db.execute(
                "UPDATE mergekit_campaigns SET template_path = %s, template_source = %s,"
                " template_fingerprint = %s, transport = %s, settings = %s, updated_at = %s WHERE id = %s",
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
        found = self._campaign_where("name = %s", (name,))
        assert found is not None
        return found

    def _campaign_named(self, name: str) -> Campaign | None:
        return self._campaign_where("name = %s", (name,))

    def _latest_campaign(self) -> Campaign | None:
        return self._campaign_where("true ORDER BY updated_at DESC, id DESC LIMIT 1", ())

    def _campaign_names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM mergekit_campaigns ORDER BY name")]

    def _campaign_where(self, where: str, args: tuple[Any, ...]) -> Campaign | None:
        row = self._db.execute(
            f"SELECT {_CAMPAIGN_COLUMNS} FROM mergekit_campaigns WHERE {where}",  # type: ignore[arg-type]
            args,
        ).fetchone()
        if row is None:
            return None
        return Campaign.from_row(row)

    # -- rows ----------------------------------------------------------------

    def ingest(self, campaign: Campaign, chunks: Iterable[Sequence[SourceRow]]) -> IngestCounts:
        added = known = 0
        now = time.time()
        for chunk in map(ingest_columns, chunks):
            with self._db.transaction(), self._db.cursor() as cursor:
                # COPY into a scratch table, then one INSERT … ON CONFLICT: far fewer round
                # trips than a row per statement on a million-row CSV.
                cursor.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS mergekit_staging (row integer, key text,"
                    " occurrence integer, email text, data text, state text, last_text text)"
                    " ON COMMIT DELETE ROWS"
                )
                with cursor.copy("COPY mergekit_staging FROM STDIN") as copy:
                    for row in zip(*chunk, strict=True):  # IngestColumns: the staging columns, in order
                        copy.write_row(row)
                cursor.execute(
                    "INSERT INTO mergekit_recipients (campaign_id, row, key, occurrence, email, data,"
                    " state, last_text, updated_at) SELECT %s, row, key, occurrence, email, data, state,"
                    " last_text, %s FROM mergekit_staging ORDER BY row"
                    " ON CONFLICT (campaign_id, key, occurrence) DO NOTHING",
                    (campaign.id, now),
                )
                inserted = max(cursor.rowcount, 0)
            added += inserted
            known += len(chunk.rows) - inserted
        return IngestCounts(added, known)

    def suppress(self, campaign: Campaign, addresses: Mapping[str, str]) -> int:
        """An ASCII address's canonical form is its lower-case, which SQL gives (``lower`` under
        the C collation folds ASCII letters only, whatever the database's locale); the few other
        addresses are compared here, by :func:`canonical_address`."""
        now = time.time()
        with self._db.transaction():
            with self._db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO mergekit_suppressions (campaign_id, email, source) VALUES (%s, %s, %s)"
                    " ON CONFLICT (campaign_id, email) DO NOTHING",
                    [(campaign.id, email, source) for email, source in addresses.items()],
                )
            updated = self._db.execute(
                "UPDATE mergekit_recipients r SET state = 'suppressed', updated_at = %s,"  # type: ignore[arg-type]
                " last_text = 'address listed in ' || s.source || ' (--suppress)'"
                " FROM mergekit_suppressions s WHERE s.campaign_id = r.campaign_id"
                ' AND s.email = lower(r.email COLLATE "C") AND r.campaign_id = %s'
                f" AND r.state IN ('pending', 'deferred', 'unknown') AND r.email !~ '{_NOT_ASCII}'",
                (now, campaign.id),
            )
            count = max(updated.rowcount, 0)
            others = self._db.execute(
                "SELECT r.id, r.email FROM mergekit_recipients r WHERE r.campaign_id = %s"  # type: ignore[arg-type]
                f" AND r.state IN ('pending', 'deferred', 'unknown') AND r.email ~ '{_NOT_ASCII}'"
                " AND EXISTS (SELECT 1 FROM mergekit_suppressions s WHERE s.campaign_id = r.campaign_id)",
                (campaign.id,),
            ).fetchall()
            if others:
                listed = dict(
                    self._db.execute(
                        "SELECT email, source FROM mergekit_suppressions WHERE campaign_id = %s",
                        (campaign.id,),
                    ).fetchall()
                )
                canonical = [(row_id, canonical_address(email)) for row_id, email in others]
                hits = [(row_id, listed[address]) for row_id, address in canonical if address in listed]
                with self._db.cursor() as cursor:
                    cursor.executemany(
                        "UPDATE mergekit_recipients SET state = 'suppressed', updated_at = %s,"
                        " last_text = 'address listed in ' || %s || ' (--suppress)' WHERE id = %s",
                        [(now, source, row_id) for row_id, source in hits],
                    )
                count += len(hits)
        return count

    def claim_addresses(self, campaign: Campaign, claims: Sequence[AddressClaim]) -> dict[int, int]:
        # Sorted by address (then row, so a batch's first row with an address wins): two workers
        # inserting the same addresses wait for each other in one order, never in a deadlock.
        ordered = sorted(claims, key=lambda claim: (claim.address, claim.row))
        with self._db.transaction():
            self._claim(campaign.id, ordered)
            held = self._db.execute(
                # LATERAL: one search of the primary key per claim, never a scan of the campaign's
                "SELECT c.id, e.recipient_id, e.row FROM unnest(%s::bigint[], %s::text[]) AS c(id, address)"
                " CROSS JOIN LATERAL (SELECT recipient_id, row FROM mergekit_envelopes"
                "  WHERE campaign_id = %s AND address = c.address) AS e",
                ([c.id for c in claims], [c.address for c in claims], campaign.id),
            ).fetchall()
        return {claimer: row for claimer, holder, row in held if holder != claimer}

    def recover(self, campaign: Campaign) -> int:
        """Turn rows whose lease expired (their worker died or lost the server) into ``unknown``.

        Rows other live workers hold are left alone: unlike SQLite, many processes
        send one campaign at once.
        """
        cursor = self._db.execute(
            "UPDATE mergekit_recipients SET state = 'unknown', unknown_count = unknown_count + 1,"
            " lease_expires_at = NULL, last_text = 'the lease of worker ' || coalesce(worker_id, '?')"
            " || ' expired while sending: the message may or may not have left', updated_at = %s"
            " WHERE id IN (SELECT id FROM mergekit_recipients WHERE campaign_id = %s"
            " AND state = 'sending' AND (lease_expires_at IS NULL OR lease_expires_at < clock_timestamp())"
            " FOR UPDATE SKIP LOCKED)",
            (time.time(), campaign.id),
        )
        if cursor.rowcount:
            log.warning("%d rows of a worker whose lease expired are now unknown", cursor.rowcount)
        return max(cursor.rowcount, 0)

    def claim(
        self,
        campaign: Campaign,
        limit: int,
        *,
        states: Sequence[str],
        due_before: float | None,
        settled_before: float | None = None,
    ) -> list[ClaimedRow]:
        self.recover(campaign)
        claimed: list[ClaimedRow] = []
        now = time.time()
        started = time.monotonic()
        with self._db.transaction():
            for state in states:
                if len(claimed) >= limit:
                    break
                condition, bound = claim_condition(state, due_before, settled_before)
                for index in range(len(bound)):
                    condition = condition.replace("%s", f"%(bound{index})s", 1)
                rows = self._db.execute(
                    "WITH picked AS (SELECT id FROM mergekit_recipients"  # type: ignore[arg-type]
                    f" WHERE campaign_id = %(campaign)s AND state = %(state)s {condition}"
                    " ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                    " UPDATE mergekit_recipients r SET state = 'sending', worker_id = %(worker)s,"
                    " lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s),"
                    " updated_at = %(now)s FROM picked WHERE r.id = picked.id"
                    " RETURNING r.id, r.row, r.key, r.data, r.attempts",
                    {
                        "campaign": campaign.id,
                        "state": state,
                        **{f"bound{index}": value for index, value in enumerate(bound)},
                        "limit": limit - len(claimed),
                        "worker": self.worker_id,
                        "lease": self.lease,
                        "now": now,
                    },
                ).fetchall()
                claimed.extend(ClaimedRow(i, r, k, json.loads(d), a, state) for i, r, k, d, a in rows)
            self._in_doubt = True  # from here a lost connection may or may not have committed it
        self._in_doubt = False
        if claimed:
            self._lease_renewed(started)
            self._start_renewing()
        claimed.sort(key=lambda row: row.id)
        return claimed

    def record(self, campaign: Campaign, updates: Sequence[RowUpdate]) -> None:
        now = time.time()
        with self._db.transaction(), self._db.cursor() as cursor:
            cursor.executemany(
                "UPDATE mergekit_recipients SET state = %(state)s, attempts = attempts + %(attempted)s,"
                " last_code = %(code)s, last_text = %(text)s,"
                " provider_id = COALESCE(%(provider_id)s, provider_id),"
                " message_id = COALESCE(%(message_id)s, message_id),"
                " next_attempt_at = %(next_attempt_at)s, updated_at = %(now)s, worker_id = %(worker)s,"
                # every unknown episode counts, a lost reply as much as a dead worker
                " unknown_count = unknown_count + %(unknown)s,"
                " lease_expires_at = CASE WHEN %(state)s = 'sending'"
                "   THEN clock_timestamp() + make_interval(secs => %(lease)s) END"
                " WHERE id = %(id)s AND campaign_id = %(campaign)s"
                # Run again after a lost connection, a batch already written is not written twice.
                " AND updated_at IS DISTINCT FROM %(now)s"
                # The fence (module docstring): the row is still ours, or recovered from our lapsed
                # lease and claimed by nobody since, and ours is a delivery.
                " AND worker_id = %(worker)s"
                " AND (state = 'sending' OR (state = 'unknown' AND %(state)s = 'sent'))",
                [
                    {
                        "state": u.state,
                        "attempted": int(u.attempted),
                        "unknown": int(u.state == "unknown"),
                        "code": u.code,
                        "text": u.text,
                        "provider_id": u.provider_id,
                        "message_id": u.message_id,
                        "next_attempt_at": u.next_attempt_at,
                        "now": now,
                        "worker": self.worker_id,
                        "lease": self.lease,
                        "id": u.id,
                        "campaign": campaign.id,
                    }
                    for u in updates
                ],
            )
            if 0 <= cursor.rowcount < len(updates):
                log.warning(
                    "%d outcomes not recorded: this worker's lease on those rows expired and "
                    "another worker recovered them",
                    len(updates) - cursor.rowcount,
                )

    def counts(self, campaign: Campaign) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, count in self._db.execute(
            "SELECT state, count(*) FROM mergekit_recipients WHERE campaign_id = %s GROUP BY state",
            (campaign.id,),
        ):
            counts[state] = count
        return counts

    def recovered_unknown(self, campaign: Campaign) -> int:
        found = self._db.execute(
            "SELECT count(*) FROM mergekit_recipients WHERE campaign_id = %s AND unknown_count > 0",
            (campaign.id,),
        ).fetchone()
        return int(found[0]) if found else 0

    def next_due(self, campaign: Campaign) -> float | None:
        found = self._db.execute(
            "SELECT min(next_attempt_at) FROM mergekit_recipients"
            " WHERE campaign_id = %s AND state = 'deferred'",
            (campaign.id,),
        ).fetchone()
        return float(found[0]) if found and found[0] is not None else None

    def rows(self, campaign: Campaign, states: Sequence[str] | None = None) -> Iterator[LedgerRow]:
        where = "campaign_id = %s"
        args: list[Any] = [campaign.id]
        if states:
            where += " AND state = ANY(%s)"
            args.append(list(states))
        # A server-side cursor: a million-row report streams instead of loading at once.
        with self._db.transaction(), self._db.cursor(name="mergekit_report") as cursor:
            cursor.itersize = 2000
            cursor.execute(
                "SELECT row, key, email, state, attempts, last_code, last_text, provider_id,"  # type: ignore[arg-type]
                f" message_id, next_attempt_at, unknown_count, updated_at FROM mergekit_recipients"
                f" WHERE {where} ORDER BY row, occurrence",
                args,
            )
            for record in cursor:
                yield LedgerRow(*record)

    # -- workers, leases, rate -------------------------------------------------

    def lock_for_send(self, campaign: str) -> None:
        """Nothing to hold: any number of workers send one campaign, each row under its own lease."""

    def is_locked(self, campaign: Campaign) -> bool:
        """True while some worker holds a live lease on a row of the campaign."""
        found = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM mergekit_recipients WHERE campaign_id = %s"
            " AND state = 'sending' AND lease_expires_at > clock_timestamp())",
            (campaign.id,),
        ).fetchone()
        return bool(found and found[0])

    leases = True

    def still_held(self, rows: Sequence[ClaimedRow]) -> list[ClaimedRow]:
        """All of ``rows`` while the last claim or renewal is recent enough; else (this process was
        paused, or cut off) those the database still shows as this worker's, their leases renewed."""
        sure_until = self._lease_sure_until
        if not rows or (sure_until is not None and time.monotonic() < sure_until):
            return list(rows)
        held = {
            row_id
            for (row_id,) in self._db.execute(
                "UPDATE mergekit_recipients"
                " SET lease_expires_at = clock_timestamp() + make_interval(secs => %s)"
                " WHERE id = ANY(%s) AND worker_id = %s AND state = 'sending' RETURNING id",
                (self.lease, [row.id for row in rows], self.worker_id),
            )
        }
        return [row for row in rows if row.id in held]

    def _lease_renewed(self, at: float) -> None:
        """Leases were pushed forward at ``at`` (monotonic, taken before the statement): they hold
        until a lease later, less a renewal's slack for the clocks' drift and the round trip.
        A renewal that comes after they could have lapsed renews only the rows still this
        worker's: from then on, :meth:`still_held` asks the database before every batch."""
        sure_until = self._lease_sure_until
        if sure_until is not None and at > sure_until:
            self._lease_sure_until = -math.inf
        elif sure_until != -math.inf:
            self._lease_sure_until = max(sure_until or 0.0, at + self.lease * (1 - 1 / RENEWALS_PER_LEASE))

    def rate_limiter(self, campaign: Campaign, per_second: float | None) -> PostgresRateLimiter | None:
        """The campaign's shared token bucket at ``per_second`` (which this call sets), or None."""
        if not per_second:
            return None
        self._on_side(
            "INSERT INTO mergekit_rate (campaign_id, per_second, next_free)"
            " VALUES (%s, %s, clock_timestamp())"
            " ON CONFLICT (campaign_id) DO UPDATE SET per_second = EXCLUDED.per_second",
            (campaign.id, per_second),
        )
        return PostgresRateLimiter(self, campaign.id, per_second)

    def _start_renewing(self) -> None:
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_leases, name="lease-renewal", daemon=True)
            self._renewer.start()

    def _renew_leases(self) -> None:
        while not self._stop_renewing.wait(self.lease / RENEWALS_PER_LEASE):
            try:
                started = time.monotonic()
                self._on_side(
                    "UPDATE mergekit_recipients"
                    " SET lease_expires_at = clock_timestamp() + make_interval(secs => %s)"
                    " WHERE worker_id = %s AND state = 'sending'",
                    (self.lease, self.worker_id),
                )
                self._lease_renewed(started)
            except LedgerStorageError as err:  # the next renewal may succeed; the lease has slack
                log.warning("could not renew this worker's leases: %s", err.message)

    def _on_side(self, query: str, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        """Run ``query`` on the side connection (renewals, rate bucket), reconnected once if lost;
        psycopg's errors raised as LedgerStorageError, as every ledger operation's are."""
        with self._side_lock:
            try:
                try:
                    return self._side.execute(query, params)  # type: ignore[arg-type]
                except psycopg.OperationalError:
                    if not self._side.closed:
                        raise
                    self._side = self._reconnect(self._side)
                    return self._side.execute(query, params)  # type: ignore[arg-type]
            except psycopg.Error as err:
                raise self._fault(err, lost=self._side.closed) from None

    def close(self) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        self._side.close()
        self._db.close()


class PostgresRateLimiter:
    """A token bucket shared by every worker of a campaign: one row, updated once per batch.

    Each ``acquire(n)`` moves the row's ``next_free`` time forward by ``n / rate``
    (from now, if it lay in the past) and returns when this batch's slot starts,
    so the campaign's total rate holds however many workers take slots. The
    server's clock is the only clock involved.
    """

    def __init__(self, ledger: PostgresLedger, campaign_id: int, per_second: float) -> None:
        self._ledger = ledger
        self._campaign_id = campaign_id
        self.per_second: float | None = per_second
        self._last_cut = -float("inf")

    async def acquire(self, count: int) -> None:
        wait = await asyncio.to_thread(self._reserve, count)
        if wait > 0:
            await asyncio.sleep(wait)

    def _reserve(self, count: int) -> float:
        found = self._ledger._on_side(
            "WITH now AS (SELECT clock_timestamp() AS t) UPDATE mergekit_rate r"
            " SET next_free = greatest(r.next_free, now.t) + make_interval(secs => %s / r.per_second)"
            " FROM now WHERE r.campaign_id = %s"
            " RETURNING extract(epoch FROM r.next_free - now.t)::float8 - %s / r.per_second",
            (count, self._campaign_id, count),
        ).fetchone()
        return float(found[0]) if found else 0.0

    def accepted(self, count: int) -> None:
        """The campaign's rate is set explicitly here; what the server took needs no measuring."""

    def throttle(self, retry_after: float | None = None, reply: str = "") -> None:
        """A throttling reply: every worker pauses ``retry_after`` and the campaign's rate drops
        (at most once per ``THROTTLE_COOLDOWN`` from this worker: replies to batches already in
        flight are one event)."""
        now = time.monotonic()
        if now - self._last_cut < THROTTLE_COOLDOWN and not retry_after:
            return
        self._last_cut = now
        self._ledger._on_side(
            "UPDATE mergekit_rate SET per_second = per_second * %s,"
            " next_free = greatest(next_free, clock_timestamp() + make_interval(secs => %s))"
            " WHERE campaign_id = %s",
            (THROTTLE_FACTOR, retry_after or 0.0, self._campaign_id),
        )


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
