"""Ingest: stream a recipients CSV into rows with a key, a state and their data.

pandas reads the file in chunks with every column as text (``dtype=str``,
``keep_default_na=False``), so ``02134`` keeps its zero and a surname ``Null``
stays a surname. A row keeps its position (``row``: 1 is the first line after
the header) for every message about it.

The recipient key is the address from the email column, stripped and
lower-cased (or the ``--key`` column as written). The first row with a key
wins; later ones are ``duplicate`` (``occurrence`` counts them, which is how a
resumed ingest recognises rows it has seen). Ingest only checks an address's
shape, cheaply; the full check (email-validator, no DNS) runs when the row is
rendered, spread over the send instead of holding up the start.
"""

from __future__ import annotations

import codecs
import csv
import re
import warnings
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import InputError

CHUNK_ROWS = 20_000  # rows parsed at once: bounds memory on million-row files
DEFAULT_ENCODING = "utf-8-sig"  # UTF-8 with or without a byte-order mark
# One @, something on each side, a dot in the domain, no spaces: enough to catch
# the typos of a spreadsheet before the full check at render time.
_ADDRESS_SHAPE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+\Z")


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One CSV row as ingest records it; ``reason`` says why a row is not ``pending``."""

    row: int
    key: str
    occurrence: int
    email: str
    data: dict[str, str]
    state: str
    reason: str = ""


@dataclass(frozen=True)
class SourceOptions:
    """How to read a recipients file; each field is the option of the same name."""

    encoding: str = DEFAULT_ENCODING
    email_column: str = "email"
    key_column: str | None = None
    # ``--suppress``: lower-cased address -> the file that lists it.
    suppressed: Mapping[str, str] = field(default_factory=dict)


def read_rows(
    path: str | Path, options: SourceOptions = SourceOptions()
) -> Generator[list[SourceRow], None, None]:
    """Yield the file's rows in chunks, each row ``pending``, ``invalid`` or ``duplicate``.

    :raises InputError: the file is missing, empty, not in the encoding, has no
        address column or a row with the wrong number of fields. Raised before
        the first chunk where the header is at fault; a bad line deep in the
        file raises when its chunk is reached, so callers ingest before sending.
    """
    path = str(path)
    encoding = _check_encoding(options.encoding)
    columns = _read_header(path, encoding)
    email_column = _find_column(columns, options.email_column, path, "--email-column")
    key_column = _find_column(columns, options.key_column, path, "--key") if options.key_column else None
    _check_shape(path, encoding, len(columns))
    seen: dict[str, int] = {}
    row_number = 0
    with pd.read_csv(
        path,
        dtype=str,
        keep_default_na=False,
        chunksize=CHUNK_ROWS,
        encoding=encoding,
        skip_blank_lines=True,
        engine="c",
        index_col=False,
    ) as reader:
        for chunk in reader:
            rows = []
            for record in chunk.to_numpy(dtype=object).tolist():
                row_number += 1
                data = dict(zip(columns, record, strict=True))
                rows.append(_classify(row_number, data, email_column, key_column, seen, options.suppressed))
            yield rows


def _check_shape(path: str, encoding: str, width: int) -> None:
    """Check the whole file decodes and every row has the header's width, before any row is used.

    pandas pads a short row with empty strings when NA parsing is off, so the
    shape is checked here (the csv module is as fast as pandas' tokenizer).
    """
    row = 0
    try:
        with open(path, encoding=encoding, newline="") as file:
            records = csv.reader(file, strict=True)
            next(records, None)
            for record in records:
                if not record:
                    continue  # a blank line, which pandas skips as well
                row += 1
                if len(record) != width:
                    few = len(record) < width
                    raise InputError(
                        f"the row has {len(record)} fields but the header has {width}",
                        path=path,
                        line=records.line_num,
                        row=row,
                        column=f"field {len(record) + 1}" if few else f"extra field {width + 1}",
                        hint="Add the missing fields (empty is fine: a,,c)"
                        if few
                        else "Quote values that contain commas, or remove the extra fields",
                    )
    except UnicodeDecodeError as err:
        raise _encoding_error(path, encoding, err) from None
    except csv.Error as err:
        raise InputError(
            f"cannot parse the CSV: {err}",
            path=path,
            line=records.line_num,
            row=row + 1,
            hint="Fix or remove the line",
        ) from None


def _check_encoding(encoding: str) -> str:
    try:
        codecs.lookup(encoding)
    except LookupError:
        from .errors import ConfigError

        raise ConfigError(
            f"unknown encoding {encoding!r}",
            option="--encoding",
            hint="Use a Python codec name such as utf-8, cp1252 or latin-1",
        ) from None
    return DEFAULT_ENCODING if codecs.lookup(encoding).name == "utf-8" else encoding


def _read_header(path: str, encoding: str) -> list[str]:
    try:
        with open(path, encoding=encoding, newline="") as file:
            header = next(csv.reader(file), None)
    except FileNotFoundError:
        raise InputError(
            "recipients file not found", path=path, hint="Check the RECIPIENTS argument"
        ) from None
    except UnicodeDecodeError as err:
        raise _encoding_error(path, encoding, err) from None
    except OSError as err:
        raise InputError(f"cannot read the file: {err.strerror}", path=path) from None
    if not header or not any(name.strip() for name in header):
        raise InputError(
            "the file is empty: it needs a header line naming the columns",
            path=path,
            line=1,
            hint="The first line must name the columns, e.g. email,name",
        )
    stripped = [name.strip() for name in header]
    padded = [name for name in header if name != name.strip()]
    if padded:
        warnings.warn(f"{path}:1: column names with surrounding spaces were stripped: {padded}", stacklevel=2)
    blank = [i + 1 for i, name in enumerate(stripped) if not name]
    if blank:
        raise InputError(
            f"column {blank[0]} has no name",
            path=path,
            line=1,
            hint="Give every column a name in the header line",
        )
    return stripped


def _find_column(columns: list[str], wanted: str, path: str, option: str) -> str:
    if wanted in columns:
        return wanted
    folded = [name for name in columns if name.lower() == wanted.lower()]
    if len(folded) == 1:
        return folded[0]
    raise InputError(
        f"there is no column {wanted!r}; the columns are {', '.join(columns)}",
        path=path,
        line=1,
        column=wanted,
        hint=f"Name the address column with {option}"
        if option == "--email-column"
        else f"Name an existing column with {option}",
    )


def _classify(
    row: int,
    data: dict[str, str],
    email_column: str,
    key_column: str | None,
    seen: dict[str, int],
    suppressed: Mapping[str, str],
) -> SourceRow:
    email = data[email_column].strip()
    state, reason = "pending", ""
    if not email:
        state, reason = "invalid", f"column {email_column!r} is empty"
    elif not _ADDRESS_SHAPE.match(email):
        state, reason = "invalid", f"column {email_column!r}: {email!r} is not an email address"
    if key_column is not None:
        key = data[key_column]
        if not key and state == "pending":
            state, reason = "invalid", f"key column {key_column!r} is empty"
    else:
        key = email.lower()
    key = key or f"(row {row})"
    occurrence = seen.get(key, 0)
    seen[key] = occurrence + 1
    if occurrence and state == "pending":
        state, reason = "duplicate", f"same key as an earlier row ({key})"
    if state == "pending" and suppressed and email.lower() in suppressed:
        state, reason = "suppressed", f"address listed in {suppressed[email.lower()]} (--suppress)"
    return SourceRow(row, key, occurrence, email, data, state, reason)


def _encoding_error(path: str, encoding: str, err: UnicodeDecodeError) -> InputError:
    name = "UTF-8" if encoding == DEFAULT_ENCODING else encoding
    return InputError(
        f"the file is not valid {name} text ({err.reason})",
        path=path,
        line=_first_bad_line(path, encoding),
        hint="Pass the file's encoding with --encoding (e.g. --encoding cp1252 or "
        "--encoding latin-1), or save the file as UTF-8",
    )


def _first_bad_line(path: str, encoding: str) -> int | None:
    """The 1-based line of the first byte sequence the encoding rejects."""
    decoder = codecs.getincrementaldecoder(encoding)()
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError:
                return number
    return None
