"""mergekit: mail merge from a CSV and a Jinja template, sent in batches and recorded in a ledger."""

from .campaign import ContentOptions, PreviewItem, SendReport, preview, report, retry, send, status
from .dispatch import Rate, RunResult, SendOptions
from .errors import (
    ConfigError,
    InputError,
    LedgerBusyError,
    LedgerError,
    MergekitError,
    RenderError,
    TemplateError,
    TransportError,
)
from .gallery import write_gallery
from .ledger import STATES, Ledger, SqliteLedger, open_ledger
from .render import Template, TemplateSource
from .source import SourceOptions, read_rows
from .transports import Message, Outcome, Status, Transport, transport_from_url
from .unsubscribe import Unsubscribe, read_suppression

__all__ = [
    "STATES",
    "ConfigError",
    "ContentOptions",
    "InputError",
    "Ledger",
    "LedgerBusyError",
    "LedgerError",
    "MergekitError",
    "Message",
    "Outcome",
    "PreviewItem",
    "Rate",
    "RenderError",
    "RunResult",
    "SendOptions",
    "SendReport",
    "SourceOptions",
    "SqliteLedger",
    "Status",
    "Template",
    "TemplateError",
    "TemplateSource",
    "Transport",
    "TransportError",
    "Unsubscribe",
    "open_ledger",
    "preview",
    "read_rows",
    "read_suppression",
    "report",
    "retry",
    "send",
    "status",
    "transport_from_url",
    "write_gallery",
]
