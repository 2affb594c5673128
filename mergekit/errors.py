"""Errors mergekit raises, each carrying what it is about.

::

    MergekitError                     root; ``exit_code`` is what the CLI exits with
    ├── ConfigError (ValueError)      a bad option or transport URL: ``option``
    ├── InputError (ValueError)       a bad recipients file: ``path``, ``line``, ``row``, ``column``
    ├── TemplateError (ValueError)    a template that does not compile: ``path``, ``line``
    ├── RenderError (ValueError)      one row that does not render: ``row``, ``key``, ``header``
    ├── LedgerError                   the ledger cannot be used: ``path``
    │   ├── LedgerBusyError           another ``mergekit send`` holds it
    │   └── LedgerStorageError        its storage failed in use (disk full, read-only, deleted,
    │                                 damaged, connection lost): exit 3, resumable once fixed
    └── TransportError (ConnectionError)  a transport cannot work at all:
                                      ``transport``, ``endpoint``, ``code``, ``reply``

Context travels as keyword attributes; ``__str__`` composes the message with
where it happened and the cause. Messages never contain secrets: transports
pass redacted endpoints only.
"""

from __future__ import annotations

from typing import Any


class MergekitError(Exception):
    """Root of every error mergekit raises on purpose."""

    exit_code = 2
    _context_fields: tuple[str, ...] = ()

    def __init__(self, message: str, *, hint: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        for name in self._context_fields:
            setattr(self, name, context.pop(name, None))
        if context:
            raise TypeError(f"unexpected context for {type(self).__name__}: {sorted(context)}")

    def where(self) -> str:
        """Where the error is, e.g. ``recipients.csv:12`` or ``option --rate``."""
        return ""

    def __str__(self) -> str:
        text = self.message
        where = self.where()
        if where:
            text = f"{where}: {text}"
        if self.__cause__ is not None and str(self.__cause__) not in text:
            text = f"{text} ({self.__cause__})"
        if self.hint:
            text = f"{text}. {self.hint}"
        return text


class ConfigError(MergekitError, ValueError):
    """A bad option, argument or transport URL; raised before any message leaves."""

    _context_fields = ("option",)
    option: str | None

    def where(self) -> str:
        return f"option {self.option}" if self.option else ""


class InputError(MergekitError, ValueError):
    """The recipients file cannot be read as a whole (encoding, shape)."""

    _context_fields = ("path", "line", "row", "column")
    path: str | None
    line: int | None
    row: int | None
    column: str | None

    def where(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}:{self.line}" if self.line else str(self.path))
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.column:
            parts.append(f"column {self.column!r}")
        return ", ".join(parts)


class TemplateError(MergekitError, ValueError):
    """The template does not compile; nothing can be rendered."""

    _context_fields = ("path", "line")
    path: str | None
    line: int | None

    def where(self) -> str:
        if not self.path:
            return ""
        return f"{self.path}:{self.line}" if self.line else str(self.path)


class RenderError(MergekitError, ValueError):
    """One row does not render; the row becomes ``invalid`` with this reason."""

    exit_code = 1
    _context_fields = ("row", "key", "header")
    row: int | None
    key: str | None
    header: str | None


class LedgerError(MergekitError):
    """The ledger cannot be opened, is of another version, or lacks the campaign."""

    _context_fields = ("path",)
    path: str | None

    def where(self) -> str:
        return f"ledger {self.path}" if self.path else ""


class LedgerBusyError(LedgerError):
    """Another running ``mergekit send`` holds this ledger."""


class LedgerStorageError(LedgerError):
    """The ledger's storage failed while in use; what it committed stands, so the campaign
    resumes (exit 3) when the same command runs again once the fault is gone."""

    exit_code = 3


class TransportError(MergekitError, ConnectionError):
    """A transport cannot work at all (connect, TLS, auth); per-message refusals are outcomes."""

    exit_code = 3
    _context_fields = ("transport", "endpoint", "code", "reply")
    transport: str | None
    endpoint: str | None
    code: int | None
    reply: str | None
    greeting: bool = False  # the server's greeting itself was the refusal (SMTP 421 at connect)

    def where(self) -> str:
        return f"{self.transport} {self.endpoint}" if self.endpoint else (self.transport or "")
