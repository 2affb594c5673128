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

Rows are classified a chunk at a time, a column at once (strip, lower-case,
shape check, duplicate count), and a chunk's data is JSON-encoded a column at
once: on a million-row file the dict, classification, ``SourceRow`` and
``json.dumps`` made per row were three quarters of ingest's time
(docs/benchmarks). A :class:`SourceChunk` holds those columns, and is a
sequence of :class:`SourceRow` for readers that want rows (preview).
"""

from __future__ import annotations

import codecs
import csv
import json
import operator
import re
import warnings
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, filterfalse
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, overload

from .errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# pandas and numpy are imported where a file is read, not here: render worker
# processes import this package but never read a CSV, and each would carry
# about 50 MB of pandas (issue 6: the dry run's memory over its process tree).

CHUNK_ROWS = 20_000  # rows parsed at once: bounds memory on million-row files
DEFAULT_ENCODING = "utf-8-sig"  # UTF-8 with or without a byte-order mark
# One @, something on each side, a dot in the domain, no spaces: enough to catch
# the typos of a spreadsheet before the full check at render time.
_ADDRESS_SHAPE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+\Z")
# pandas' hash_array key for the second of a recipient key's two hashes (any 16 bytes
# other than pandas' default key give an independent hash).
_SECOND_HASH_KEY = "mergekit-seen-02"
# A row's data as JSON text: the encoder ``json.dumps(data, ensure_ascii=False)`` uses.
encode_data = json.JSONEncoder(ensure_ascii=False).encode
_quote = json.encoder.encode_basestring  # one JSON string, as that encoder writes it


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


class IngestColumns(NamedTuple):
    """A chunk as a ledger inserts it: one list per field, each row's data as JSON text."""

    rows: Sequence[int]
    keys: list[str]
    occurrences: list[int]
    emails: list[str]
    data: list[str]
    states: list[str]
    reasons: list[str]


class SourceChunk(Sequence[SourceRow]):
    """Consecutive rows of a file, held as its columns (``values``: one list per CSV column).

    A row is built only when asked for (``chunk[i]``); a ledger takes
    :meth:`columns` instead, without a dict or a ``SourceRow`` per row.
    """

    def __init__(
        self,
        names: Sequence[str],
        values: list[list[str]],
        first_row: int,
        classes: tuple[list[str], list[int], list[str], list[str], list[str]],
    ) -> None:
        self._names = names
        self._values = values
        self._rows = range(first_row, first_row + len(values[0]))
        self._keys, self._occurrences, self._emails, self._states, self._reasons = classes

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> SourceRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[SourceRow]: ...

    def __getitem__(self, index: int | slice) -> SourceRow | list[SourceRow]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = range(len(self))[index]
        return SourceRow(
            self._rows[i],
            self._keys[i],
            self._occurrences[i],
            self._emails[i],
            dict(zip(self._names, [column[i] for column in self._values], strict=True)),
            self._states[i],
            self._reasons[i],
        )

    def columns(self) -> IngestColumns:
        """The chunk as a ledger inserts it, the data encoded a column at a time."""
        return IngestColumns(
            self._rows,
            self._keys,
            self._occurrences,
            self._emails,
            _json_objects(self._names, self._values),
            self._states,
            self._reasons,
        )


def ingest_columns(chunk: Sequence[SourceRow]) -> IngestColumns:
    """``chunk`` as a ledger inserts it: a :class:`SourceChunk`'s own columns, or any rows'."""
    if isinstance(chunk, SourceChunk):
        return chunk.columns()
    return IngestColumns(
        [r.row for r in chunk],
        [r.key for r in chunk],
        [r.occurrence for r in chunk],
        [r.email for r in chunk],
        [encode_data(r.data) for r in chunk],
        [r.state for r in chunk],
        [r.reason for r in chunk],
    )


def read_rows(
    path: str | Path, options: SourceOptions = SourceOptions()
) -> Generator[SourceChunk, None, None]:
    """Yield the file's rows in chunks, each row ``pending``, ``invalid``, ``duplicate`` or ``suppressed``.

    :raises InputError: the file is missing, empty, not in the encoding, has no
        address column or a row with the wrong number of fields. Raised before
        the first chunk: the whole file's shape is checked first.
    """
    import pandas as pd

    path = str(path)
    encoding = _check_encoding(options.encoding)
    columns = _read_header(path, encoding)
    email_column = _find_column(columns, options.email_column, path, "--email-column")
    key_column = _find_column(columns, options.key_column, path, "--key") if options.key_column else None
    _check_shape(path, encoding, len(columns))
    classify = _Classifier(columns, email_column, key_column, options.suppressed)
    first_row = 1
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
        for frame in reader:
            values: list[list[str]] = frame.to_numpy(dtype=object).T.tolist()
            del frame  # the frame's own copy of the values: freed before the next is parsed
            yield SourceChunk(columns, values, first_row, classify(first_row, values))
            first_row += len(values[0])


def _json_objects(names: Sequence[str], values: list[list[str]]) -> list[str]:
    """Each row as the JSON text ``encode_data(dict(zip(names, row)))`` gives, built a column at a time.

    A name given twice keeps its first place and its last value, as in a dict.
    """
    last = {name: i for i, name in enumerate(names)}
    template = "{" + ", ".join(_quote(name).replace("%", "%%") + ": %s" for name in last) + "}"
    quoted = [list(map(_quote, values[i])) for i in last.values()]
    return list(map(template.__mod__, zip(*quoted, strict=True)))


class _Classifier:
    """Gives a chunk's rows their key, occurrence, state and reason, a column at a time.

    Rules, for each row in order: the address (stripped) must be there and have
    an address's shape, else ``invalid``; the key is the lower-cased address or
    the ``--key`` column's value (empty: ``invalid``), or ``(row N)`` when
    empty; a row whose key came before is ``duplicate`` (invalid rows count as
    having come); a ``pending`` row whose address is listed is ``suppressed``.
    """

    def __init__(
        self, columns: list[str], email_column: str, key_column: str | None, suppressed: Mapping[str, str]
    ) -> None:
        # A name given twice means its last column, as dict(zip(columns, row)) had it.
        self._email_at = len(columns) - 1 - columns[::-1].index(email_column)
        self._key_at = len(columns) - 1 - columns[::-1].index(key_column) if key_column else None
        self._email_column = email_column
        self._key_column = key_column
        self._suppressed = suppressed
        self._seen = _SeenKeys()

    def __call__(
        self, first_row: int, values: list[list[str]]
    ) -> tuple[list[str], list[int], list[str], list[str], list[str]]:
        """``(keys, occurrences, emails, states, reasons)`` of the rows from ``first_row`` on."""
        count = len(values[0])
        emails = list(map(str.strip, values[self._email_at]))
        lowered = list(map(str.lower, emails))
        states = ["pending"] * count
        reasons = [""] * count
        column = self._email_column
        for i in compress(range(count), map(operator.not_, map(_ADDRESS_SHAPE.match, emails))):
            states[i] = "invalid"
            reasons[i] = (
                f"column {column!r}: {emails[i]!r} is not an email address"
                if emails[i]
                else f"column {column!r} is empty"
            )
        keys = lowered if self._key_at is None else values[self._key_at]
        if "" in keys:
            for i in compress(range(count), map(operator.not_, keys)):
                if states[i] == "pending":  # only a --key column's value: an empty address is invalid
                    states[i], reasons[i] = "invalid", f"key column {self._key_column!r} is empty"
            keys = [key or f"(row {first_row + i})" for i, key in enumerate(keys)]
        occurrences = self._seen.count(keys)
        for i in compress(range(count), occurrences):
            if states[i] == "pending":
                states[i], reasons[i] = "duplicate", f"same key as an earlier row ({keys[i]})"
        if self._suppressed:
            listed = self._suppressed
            for i in compress(range(count), map(listed.__contains__, lowered)):
                if states[i] == "pending":
                    states[i] = "suppressed"
                    reasons[i] = f"address listed in {listed[lowered[i]]} (--suppress)"
        return keys, occurrences, emails, states, reasons


class _SeenKeys:
    """How many times each recipient key came in earlier chunks, in 24 bytes a key.

    A dict of the key strings took about 110 MB for a million rows, a third of
    the dry run's memory target (issue 6). Each key is kept as two independent
    64-bit SipHash values instead (pandas' ``hash_array`` with two hash keys),
    sorted by the first: two different keys pass for one with a probability of
    about n²/2¹²⁹, 10⁻²⁷ for a million rows.
    """

    def __init__(self) -> None:
        import numpy as np

        self._first: npt.NDArray[np.uint64] = np.empty(0, np.uint64)  # sorted
        self._second: npt.NDArray[np.uint64] = np.empty(0, np.uint64)
        self._counts: npt.NDArray[np.int64] = np.empty(0, np.int64)

    def count(self, keys: list[str]) -> list[int]:
        """Each key's occurrence: how often it came before, in earlier chunks or earlier in ``keys``."""
        import numpy as np
        import pandas as pd
        from pandas.util import hash_array

        codes, uniques = pd.factorize(np.array(keys, dtype=object))
        earlier_here = pd.Series(codes).groupby(codes).cumcount().to_numpy()
        first = hash_array(uniques, categorize=False)
        # The chunk's keys in hash order: searching the stored hashes for sorted
        # values walks them once, where random order missed the cache at each key.
        order = np.argsort(first)
        first = first[order]
        second = hash_array(uniques[order], hash_key=_SECOND_HASH_KEY, categorize=False)
        here = np.bincount(codes, minlength=len(uniques))[order]
        slots = self._find(first, second)
        known = slots >= 0
        before = np.zeros(len(uniques), np.int64)
        before[order[known]] = self._counts[slots[known]]
        self._counts[slots[known]] += here[known]
        new = ~known
        at = np.searchsorted(self._first, first[new])
        self._first = np.insert(self._first, at, first[new])
        self._second = np.insert(self._second, at, second[new])
        self._counts = np.insert(self._counts, at, here[new])
        occurrences: list[int] = (before[codes] + earlier_here).tolist()
        return occurrences

    def _find(self, first: npt.NDArray[np.uint64], second: npt.NDArray[np.uint64]) -> npt.NDArray[Any]:
        """Where each (first, second) pair is stored, or -1."""
        import numpy as np

        slots = np.full(len(first), -1, np.int64)
        if not len(self._first):
            return slots
        at = np.searchsorted(self._first, first)
        inside = np.minimum(at, len(self._first) - 1)
        same_first = self._first[inside] == first
        found = same_first & (self._second[inside] == second)
        slots[found] = at[found]
        # Keys whose first hash is another stored key's: look along the run of equal first hashes.
        for i in np.flatnonzero(same_first & ~found):
            j = int(at[i])
            while j < len(self._first) and self._first[j] == first[i]:
                if self._second[j] == second[i]:
                    slots[i] = j
                    break
                j += 1
        return slots


def _check_shape(path: str, encoding: str, width: int) -> None:
    """Check the whole file decodes and every row has the header's width, before any row is used.

    pandas pads a short row with empty strings when NA parsing is off, so the
    shape is checked here (the csv module is as fast as pandas' tokenizer).
    This pass runs no Python code per row; only a file with a problem is read
    again by :func:`_name_shape_error`, which says where.
    """
    try:
        with open(path, encoding=encoding, newline="") as file:
            records = csv.reader(file, strict=True)
            next(records, None)
            # Widths other than the header's: a blank line's 0 (pandas skips it too), or a bad row.
            if not any(map(bool, filterfalse(width.__eq__, map(len, records)))):
                return
    except (UnicodeDecodeError, csv.Error):
        pass
    _name_shape_error(path, encoding, width)


def _name_shape_error(path: str, encoding: str, width: int) -> None:
    """Raise the InputError for the first row that does not decode, parse or have ``width`` fields."""
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
