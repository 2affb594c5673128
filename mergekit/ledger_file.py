"""The SQLite ledger's file as the operating system sees it: one send lock per file, whatever its name.

The send lock is ``flock()`` on the database file itself, so it follows the
file (its inode) and not the path typed: a symlink or ``dir/../mergekit.db``
meets the same lock. The kernel drops it when the last descriptor of the open
file goes, so a SIGKILLed run leaves no stale lock, and the sending processes
a run forks share it (a fork copies the descriptor) until the last one exits.

One descriptor per file per process, shared by every ledger opened on it:
SQLite locks the file with POSIX ``fcntl`` locks, which belong to the process
and are ALL dropped when the process closes ANY descriptor of that file
(https://sqlite.org/howtocorrupt.html, 2.2). So the descriptor is opened
before the first connection and closed only after the last ledger on the file
is closed. ``flock`` locks are separate from ``fcntl`` locks on Linux and
belong to the open file description, never to the process.

A file with several names (hard links) is refused before SQLite opens it:
SQLite names the write-ahead log after the name it opened, so each name would
keep its own log of one database and the second writer would corrupt it.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from typing import ClassVar

from .errors import LedgerError

# A probe of another process (``status`` asking whether a send runs) holds the lock shared for a
# moment: a send that starts just then tries again for this long before it calls the ledger busy.
BUSY_PATIENCE = 0.2


class LedgerFile:
    """This process's descriptor of one ledger file, and whether a ledger here holds its send lock."""

    _open: ClassVar[dict[tuple[int, int], LedgerFile]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        self._fd = fd
        self._key = key
        self._users = 0
        self.held = False  # by a ledger of this process (or, in a forked sender, of its parent)

    @classmethod
    def open(cls, path: str, *, create: bool = True) -> LedgerFile:
        """The file at ``path`` (with ``create``, created empty if missing), for one more ledger of
        this process.

        :raises LedgerError: it cannot be opened, or it has more than one name.
        """
        with cls._guard:
            try:
                entry = cls._entry(path, create)
                links = os.fstat(entry._fd).st_nlink
            except OSError as err:
                raise LedgerError(
                    f"cannot open the ledger: {err.strerror}",
                    path=path,
                    hint="Point --ledger at a mergekit ledger file, or a new path in a folder you can write",
                ) from None
            entry._users += 1
        if links > 1:
            entry.release()
            raise LedgerError(
                f"the ledger file has {links} names (hard links): SQLite keeps a write-ahead log per "
                "name, so two names of one file would corrupt it",
                path=path,
                hint=f"Remove the other names (find / -samefile {path} lists them); a symlink is safe",
            )
        return entry

    @classmethod
    def _entry(cls, path: str, create: bool) -> LedgerFile:
        """The registered entry of the file at ``path``, or a new one (called under the guard)."""
        try:
            found = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            known = cls._open.get((found.st_dev, found.st_ino))
            if known is not None:
                return known
        fd = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)
        info = os.fstat(fd)
        entry = cls._open[info.st_dev, info.st_ino] = LedgerFile(fd, (info.st_dev, info.st_ino))
        return entry

    def try_lock(self) -> bool:
        """Take the send lock for this process; False if another process (or ledger here) holds it."""
        deadline = time.monotonic() + BUSY_PATIENCE
        while True:
            with self._guard:
                if self.held:
                    return False
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                else:
                    self.held = True
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def is_locked(self) -> bool:
        """True while some process (this one included) holds the send lock."""
        with self._guard:
            if self.held:
                return True
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            return False

    def unlock(self) -> None:
        """Give the send lock up (a ledger of this process that held it is closing)."""
        with self._guard:
            if self.held:
                self.held = False
                if self._users > 1:  # the last user's close drops it with the descriptor
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self) -> None:
        """One ledger fewer on the file; the last one closes the descriptor (after its connection)."""
        with self._guard:
            self._users -= 1
            if self._users == 0:
                del self._open[self._key]
                os.close(self._fd)
