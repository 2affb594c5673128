"""Storage faults: a ledger's driver errors become mergekit's own, in one place per engine.

Every operation of the :class:`~mergekit.ledger.Ledger` interface runs through
:func:`guarded`, which calls the engine's ``_guard``: SQLite maps ``sqlite3``
errors with :func:`sqlite_fault` (here); PostgreSQL maps ``psycopg`` errors and
reconnects where that is safe (:mod:`.ledger_postgres`). So a full disk, a
read-only or damaged file, or a lost server reaches the command as one
:class:`~mergekit.errors.LedgerStorageError` line (exit 3: what was committed
stands; the same command resumes once the fault is gone), never as a traceback.

A SQLite file deleted while in use is the one fault the driver does not
report: SQLite keeps writing into the unlinked file, and everything the run
records would vanish with it (the next run would mail every recipient again).
:class:`FileIdentity` notices it around every write transaction, and
:func:`save_orphan` writes what the open connection still sees back in place.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sqlite3
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import quote

from .errors import LedgerError, LedgerStorageError

F = TypeVar("F", bound=Callable[..., Any])

# The Ledger interface: each runs through its engine's ``_guard`` (see Ledger.__init_subclass__).
OPERATIONS = (
    "open_campaign",
    "find_campaign",
    "ingest",
    "suppress",
    "claim_addresses",
    "recover",
    "claim",
    "record",
    "counts",
    "recovered_unknown",
    "next_due",
    "rows",
    "still_held",
    "lock_for_send",
    "is_locked",
    "rate_limiter",
    "close",
)

RESUME = "then run the same command again to resume"
RECOVER = (
    "Do not start again with a new ledger, which would mail every recipient again: put back a "
    "backup of {path}, or salvage its rows with the sqlite3 tool (.recover or .dump) into a new "
    "file and resume with --ledger NEWFILE (rows it cannot salvage are mailed again)"
)


def guarded(method: F) -> F:
    """``method`` (a ledger operation) run through ``self._guard``; a generator's every step too."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @wraps(method)
        def steps(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            iterator = method(self, *args, **kwargs)
            while True:
                try:
                    yield self._guard(name, lambda: next(iterator))
                except StopIteration:
                    return

        return cast(F, steps)

    @wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._guard(name, lambda: method(self, *args, **kwargs))

    return cast(F, call)


# SQLite's primary result codes (the low byte of an extended one) -> what happened, what to do.
_SQLITE_FAULTS: dict[int, tuple[str, str]] = {
    sqlite3.SQLITE_FULL: ("the disk holding it is full", f"Free some space, {RESUME}"),
    sqlite3.SQLITE_READONLY: (
        "it cannot be written (a read-only file or file system)",
        f"Make it writable again, {RESUME}",
    ),
    sqlite3.SQLITE_IOERR: ("the disk reported an I/O error", f"Check the disk, {RESUME}"),
    sqlite3.SQLITE_CANTOPEN: ("its file cannot be opened", f"Check that it is still there, {RESUME}"),
    sqlite3.SQLITE_PERM: ("access to its file was refused", f"Check the file's permissions, {RESUME}"),
    sqlite3.SQLITE_BUSY: (
        "another process kept it locked for over 30 s",
        f"Stop whatever else uses the file, {RESUME}",
    ),
    sqlite3.SQLITE_LOCKED: (
        "another process kept it locked for over 30 s",
        f"Stop whatever else uses the file, {RESUME}",
    ),
    sqlite3.SQLITE_CORRUPT: ("the file is damaged", RECOVER),
    sqlite3.SQLITE_NOTADB: ("the file is not a SQLite database, or its header is damaged", RECOVER),
}
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def sqlite_fault(err: sqlite3.Error, path: str, *, opening: bool = False) -> LedgerError:
    """The mergekit error for a ``sqlite3`` error on the ledger at ``path``.

    When a command opens the ledger, a path that cannot be a ledger (a folder, a
    missing folder, a file damaged or not a database) is a LedgerError: exit 2,
    nothing was started, change --ledger. Every other fault, and any found
    mid-run, is a LedgerStorageError: exit 3, rows remain, resumable.
    """
    code = getattr(err, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else -1
    what, hint = _SQLITE_FAULTS.get(primary, ("the database engine failed", f"Fix the cause, {RESUME}"))
    if primary not in _DAMAGED and _read_only_folder(path):  # SQLite says "unable to open" for it
        what, hint = _SQLITE_FAULTS[sqlite3.SQLITE_READONLY]
    elif opening and primary in _DAMAGED:
        hint = f"If it is not your ledger, point --ledger at the right file. If it is: {RECOVER}"
        return LedgerError(f"cannot open the ledger: {what}", path=path, hint=hint.format(path=path))
    elif opening and primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        hint = "Point --ledger at a file in an existing folder you may write to"
        return LedgerError(f"cannot open the ledger: {what}", path=path, hint=hint)
    verb = "cannot open" if opening else "cannot use"
    return LedgerStorageError(f"{verb} the ledger: {what}", path=path, hint=hint.format(path=path))


def sqlite_uri(path: str, mode: str) -> str:
    """A ``file:`` URI opening ``path`` with ``mode`` (``ro``, ``rw``: never created)."""
    return f"file:{quote(os.path.abspath(path))}?mode={mode}"


def _read_only_folder(path: str) -> bool:
    try:
        return bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def sqlite_errors(path: str, *, opening: bool = False) -> Iterator[None]:
    """Raise :func:`sqlite_fault`'s error, from the driver's, for any ``sqlite3`` error inside."""
    try:
        yield
    except sqlite3.Error as err:
        raise sqlite_fault(err, path, opening=opening) from err


class FileIdentity:
    """The device and inode of a SQLite ledger's files (database, ``-wal``, ``-shm``) as opened."""

    SUFFIXES = ("", "-wal", "-shm")

    def __init__(self, path: str) -> None:
        self.path = path
        self._opened = self._current()

    def _current(self) -> list[tuple[int, int] | None]:
        found: list[tuple[int, int] | None] = []
        for suffix in self.SUFFIXES:
            try:
                stat = os.stat(self.path + suffix)
            except FileNotFoundError:
                found.append(None)
            else:
                found.append((stat.st_dev, stat.st_ino))
        return found

    def changed(self) -> bool:
        """True when a file this connection writes to was deleted or replaced since it was opened."""
        return any(
            opened is not None and now != opened
            for opened, now in zip(self._opened, self._current(), strict=True)
        )

    @property
    def origin(self) -> str:
        """The opened database file as ``device:inode``: a restored copy records where it came from."""
        return "{}:{}".format(*(self._opened[0] or (0, 0)))

    def held(self, suffix: str) -> bool:
        """True when ``path + suffix`` is still the very file this connection opened."""
        index = self.SUFFIXES.index(suffix)
        return self._opened[index] is not None and self._current()[index] == self._opened[index]


def save_orphan(db: sqlite3.Connection, identity: FileIdentity) -> LedgerStorageError:
    """Write what ``db`` still sees of a deleted or replaced ledger file back to its path (or,
    when another file took the path, beside it), and return the error that says where."""
    path = identity.path
    if identity.held(""):  # only its -wal or -shm went: the file takes every commit in
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return LedgerStorageError(
                "the ledger's -wal or -shm file was deleted while this run used it; mergekit "
                "wrote what it had recorded into the ledger file",
                path=path,
                hint=f"Leave it there, {RESUME}",
            )
    scratch = f"{path}.restoring-{os.getpid()}"
    what = "the ledger file was deleted or replaced while this run used it"
    try:
        with contextlib.closing(sqlite3.connect(scratch)) as copy:
            db.backup(copy)
            copy.execute("INSERT OR REPLACE INTO meta VALUES ('restored_from', ?)", (identity.origin,))
            copy.commit()
    except (sqlite3.Error, OSError) as err:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        return LedgerStorageError(
            f"{what}, and what this run recorded could not be saved ({err})",
            path=path,
            hint="Put the ledger file back from a backup before any other run; a new, empty "
            "ledger would mail every recipient again",
        )
    # A stale -wal/-shm of the old file beside the restored one would be replayed into it.
    for suffix in ("-wal", "-shm"):
        if not os.path.exists(path) and identity.held(suffix):
            with contextlib.suppress(OSError):
                os.unlink(path + suffix)
    try:
        os.link(scratch, path)
    except FileExistsError:
        if _restored_from(path) == identity.origin:  # another sending process restored it first:
            os.replace(scratch, path)  # this copy, taken later, holds all of that one and more
            return _written_back(path)
        saved = f"{path}.saved-{os.getpid()}"
        os.replace(scratch, saved)
        return LedgerStorageError(
            f"{what}; another file now takes its place, so this run's records were saved as {saved}",
            path=path,
            hint=f"Resume with --ledger {saved} (or move it to {path}); a ledger without this "
            "run's records would mail its recipients again",
        )
    os.unlink(scratch)
    return _written_back(path)


def _written_back(path: str) -> LedgerStorageError:
    return LedgerStorageError(
        "the ledger file was deleted while this run used it; mergekit wrote what it had "
        f"recorded back to {path}",
        path=path,
        hint=f"Leave it there, {RESUME}",
    )


def _restored_from(path: str) -> str | None:
    """The ``restored_from`` mark of the ledger at ``path``, if it is a copy :func:`save_orphan` wrote."""
    try:
        with contextlib.closing(sqlite3.connect(sqlite_uri(path, "ro"), uri=True)) as other:
            found = other.execute("SELECT value FROM meta WHERE key = 'restored_from'").fetchone()
    except sqlite3.Error:
        return None
    return str(found[0]) if found else None
