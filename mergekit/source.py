"""Ingest: stream a recipients CSV into rows with a key, a state and their data.

Arrow's CSV reader (``pyarrow.csv``, the parser behind pandas' ``engine="pyarrow"``)
reads the file a block at a time with every column as text, so ``02134`` keeps
its zero and a surname ``Null`` stays a surname. A row keeps its position
(``row``: 1 is the first line after the header) for every message about it.

The recipient key is the canonical form of the address in the email column
(stripped, then :func:`~mergekit.addresses.canonical_address`: the mailbox the
envelope reaches), or the ``--key`` column as written. The first row with a key
wins; later ones are ``duplicate``, naming it (``occurrence`` counts them, which
is how a resumed ingest recognises rows it has seen). Ingest only checks an address's
shape, cheaply; the full check (email-validator, no DNS) runs when the row is
rendered, spread over the send instead of holding up the start.

Rows are classified a chunk at a time with Arrow's compute functions (strip,
lower-case, shape check, suppression) and duplicates are found by hash, so little
Python code runs per row on a file without problems: on a million rows, pandas'
parse, the csv module's shape check and the per-row work took 3.8 of ingest's
7.5 profiled seconds (issue 6, docs/benchmarks/profiles/ingest-1m.txt).
A :class:`SourceChunk` holds the Arrow columns; a ledger stores its pending rows
as one block (:meth:`SourceChunk.pending_batch`), or per row from :meth:`SourceChunk.columns`,
and it is a sequence of :class:`SourceRow` for readers that want rows (preview).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import os
import warnings
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, overload

from .addresses import canonical_address
from .errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import pyarrow as pa

# pyarrow and numpy are imported where a file is read, not here: render worker
# processes import this package but never read a CSV (issue 6: the dry run's
# memory over its process tree).

CHUNK_ROWS = 50_000  # rows classified and stored at once: bounds memory on million-row files
_BLOCK_BYTES = 256 << 10  # bytes Arrow parses at a time: its reader holds some tens of blocks
# A row (the header too) must fit in one block: Arrow refuses one that straddles two block
# boundaries, so a longer row would be read or refused depending on where it starts.
MAX_ROW_BYTES = _BLOCK_BYTES
MAX_COLUMNS = 2_000  # columns a header may name (SQLite's default column limit; Excel exports fewer)
_SCAN_FIELD_LIMIT = 16 * MAX_ROW_BYTES  # the csv module's field limit while it looks for a bad row
DEFAULT_ENCODING = "utf-8-sig"  # UTF-8 with or without a byte-order mark
# str.strip()'s whitespace (every c with c.isspace()), for Arrow's trim and for the
# shape pattern, where RE2's \s is ASCII only.
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_NOT_SPACE_OR = "".join(f"\\x{{{ord(c):x}}}" for c in _WHITESPACE)
# One @, something on each side, a dot in the domain, no spaces: enough to catch
# the typos of a spreadsheet before the full check at render time.
_ADDRESS_SHAPE = f"^[^@{_NOT_SPACE_OR}]+@[^@{_NOT_SPACE_OR}]+\\.[^@{_NOT_SPACE_OR}.]+$"
# The first hash a recipient key is found by within one ingest (tests force collisions).
_key_hash = hash
_second = itemgetter(1)
# A row's data as JSON text: the encoder ``json.dumps(data, ensure_ascii=False)`` uses.
encode_data = json.JSONEncoder(ensure_ascii=False).encode
quote_json = json.encoder.encode_basestring  # one JSON string, as that encoder writes it


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
    # ``--suppress``: canonical address (see mergekit.addresses) -> the file that lists it.
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

    def only(self, keep: Sequence[bool]) -> IngestColumns:
        """The rows where ``keep`` is true."""
        return IngestColumns(
            list(compress(self.rows, keep)),
            list(compress(self.keys, keep)),
            list(compress(self.occurrences, keep)),
            list(compress(self.emails, keep)),
            list(compress(self.data, keep)),
            list(compress(self.states, keep)),
            list(compress(self.reasons, keep)),
        )


class Layout(NamedTuple):
    """Where a file's columns are: their names, and the positions of the address and the ``--key``."""

    names: list[str]
    email_at: int
    key_at: int | None


class SourceChunk(Sequence[SourceRow]):
    """Consecutive rows of a file, held as Arrow columns (``values``: one per CSV column).

    A row is built only when asked for (``chunk[i]``); a ledger takes
    :meth:`pending_batch` and :meth:`settled` (a block store) or :meth:`columns`
    (a row store) instead.
    """

    def __init__(self, layout: Layout, values: pa.RecordBatch, first_row: int, classes: Classes) -> None:
        self.layout = layout
        self.names = layout.names
        self._values = values
        self._rows = range(first_row, first_row + values.num_rows)
        self._classes = classes
        self._lists: list[list[str]] | None = None

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
        values = self._value_lists()
        classes = self._classes
        return SourceRow(
            self._rows[i],
            classes.keys[i],
            int(classes.occurrences[i]),
            classes.emails[i].as_py(),
            dict(zip(self.names, [column[i] for column in values], strict=True)),
            classes.states.get(i, "pending"),
            classes.reasons.get(i, ""),
        )

    def _value_lists(self) -> list[list[str]]:
        if self._lists is None:
            self._lists = [column.to_pylist() for column in self._values.columns]
        return self._lists

    def columns(self) -> IngestColumns:
        """Every row as a row store inserts it, the data encoded a column at a time."""
        classes = self._classes
        return IngestColumns(
            self._rows,
            classes.keys,
            classes.occurrences.tolist(),
            classes.emails.to_pylist(),
            json_objects(self.names, self._value_lists()),
            [classes.states.get(i, "pending") for i in range(len(self))],
            [classes.reasons.get(i, "") for i in range(len(self))],
        )

    def keys(self) -> tuple[list[str], list[int]]:
        """Every row's key and occurrence."""
        return self._classes.keys, self._classes.occurrences.tolist()

    def settled(self) -> list[SourceRow]:
        """The rows ingest already settled (invalid, duplicate, suppressed), in order."""
        return [self[i] for i in sorted(self._classes.states)]

    def pending_batch(self) -> pa.RecordBatch:
        """The ``pending`` rows as one Arrow batch: ``row``, then the CSV's columns as read.

        A pending row's occurrence is 0, and its address and key follow from its
        columns (:func:`pending_keys`), so they are not stored twice.
        """
        import numpy as np
        import pyarrow as pa

        classes = self._classes
        rows = _int32_array(np.arange(self._rows.start, self._rows.stop, dtype=np.int32))
        names = ["row", *(str(i) for i in range(self._values.num_columns))]
        batch = pa.RecordBatch.from_arrays([rows, *self._values.columns], names=names)
        if not classes.states:
            return batch
        keep = np.ones(len(self), dtype=bool)
        keep[list(classes.states)] = False
        return batch.take(_int32_array(np.flatnonzero(keep).astype(np.int32)))


def _int32_array(values: npt.NDArray[np.int32]) -> pa.Array:
    """An Arrow int32 array over numpy's buffer. ``pa.array()`` would import pandas when it is
    installed (pyarrow checks every input for pandas objects): 0.15 s and 50 MB in an ingest."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def pending_keys(layout: Layout, values: Sequence[list[str]]) -> tuple[list[str], list[str]]:
    """The addresses and keys of pending rows from their columns, as :class:`_Classifier` gave them."""
    emails = list(map(str.strip, values[layout.email_at]))
    keys = list(map(canonical_address, emails)) if layout.key_at is None else values[layout.key_at]
    return emails, keys


class Classes(NamedTuple):
    """A chunk's classification: every row's key, occurrence and stripped address; the
    states and reasons of the rows that are not ``pending`` (few), by position."""

    keys: list[str]
    occurrences: npt.NDArray[np.int64]
    emails: pa.StringArray
    states: dict[int, str]
    reasons: dict[int, str]


def keys_of(chunk: Sequence[SourceRow]) -> tuple[list[str], list[int]]:
    """Every row's key and occurrence: a :class:`SourceChunk`'s own, or any rows'."""
    if isinstance(chunk, SourceChunk):
        return chunk.keys()
    return [r.key for r in chunk], [r.occurrence for r in chunk]


def ingest_columns(chunk: Sequence[SourceRow]) -> IngestColumns:
    """``chunk`` as a row store inserts it: a :class:`SourceChunk`'s own columns, or any rows'."""
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
        address column or a row with the wrong number of fields. A file's name,
        header and address column are checked before the first chunk; a bad row
        further down raises when the reader reaches it, so a ledger stores a
        file's rows in one transaction.
    """
    import pyarrow as pa

    path = str(path)
    _prefer_jemalloc()
    encoding = _check_encoding(options.encoding)
    columns, email_column, key_column = _header(path, encoding, options)
    classify = _Classifier(columns, email_column, key_column, options.suppressed)
    layout = Layout(columns, classify.email_at, classify.key_at)
    first_row = 1
    try:
        for values in _batches(path, encoding, len(columns)):
            _check_row_sizes(path, columns, values, first_row)
            yield SourceChunk(layout, values, first_row, classify(first_row, values))
            first_row += values.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise _parse_error(path, encoding, columns, err) from None


def check_header(path: str | Path, options: SourceOptions = SourceOptions()) -> list[str]:
    """The file's column names, once its header passed every check :func:`read_rows` makes:
    call it before recording anything, so that a bad header changes nothing.

    :raises InputError: the file is missing, not in the encoding, or its header
        names no column or two for the address (or ``--key``), a name twice, too
        many columns or is too long.
    """
    with warnings.catch_warnings():  # read_rows warns about the header when it reads the file
        warnings.simplefilter("ignore")
        return _header(str(path), _check_encoding(options.encoding), options)[0]


def _header(path: str, encoding: str, options: SourceOptions) -> tuple[list[str], str, str | None]:
    """The column names, the address column's and the ``--key`` column's."""
    columns = _read_header(path, encoding)
    email_column = _find_column(columns, options.email_column, path, "--email-column")
    key_column = _find_column(columns, options.key_column, path, "--key") if options.key_column else None
    return columns, email_column, key_column


def _prefer_jemalloc() -> None:
    """Give Arrow jemalloc unless the user chose an allocator ($ARROW_DEFAULT_MEMORY_POOL).

    A million-row ingest peaked at 255 MB RSS with it, at 320 MB with pyarrow's
    default mimalloc, in the same time (issue 6, docs/benchmarks).
    """
    import pyarrow as pa

    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        with contextlib.suppress(NotImplementedError):  # a pyarrow built without it
            pa.set_memory_pool(pa.jemalloc_memory_pool())


def _batches(path: str, encoding: str, width: int) -> Iterator[pa.RecordBatch]:
    """The file's rows after the header, every column text, in batches of :data:`CHUNK_ROWS`."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    names = [str(i) for i in range(width)]
    reader = pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(
            encoding="utf8" if encoding == DEFAULT_ENCODING else encoding,
            skip_rows=1,
            column_names=names,
            block_size=_BLOCK_BYTES,
        ),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        held.append(batch)
        count += batch.num_rows
        while count >= CHUNK_ROWS:
            whole = pa.concat_batches(held)
            yield whole.slice(0, CHUNK_ROWS)
            rest = whole.slice(CHUNK_ROWS)
            held, count = [rest], rest.num_rows
    if count:
        yield pa.concat_batches(held)


def _check_row_sizes(path: str, names: list[str], values: pa.RecordBatch, first_row: int) -> None:
    """Raise the InputError for the first row over :data:`MAX_ROW_BYTES` (values and separators).

    Most chunks are settled by the longest value of each column; the rows are
    summed only when those could add up to more than the limit.
    """
    import pyarrow.compute as pc

    lengths = [pc.binary_length(column) for column in values.columns]
    if sum(pc.max(length).as_py() or 0 for length in lengths) + len(lengths) <= MAX_ROW_BYTES:
        return
    total = lengths[0]
    for length in lengths[1:]:
        total = pc.add(total, length)
    over = pc.indices_nonzero(pc.greater(pc.add(total, len(lengths)), MAX_ROW_BYTES))
    if len(over):
        at = over[0].as_py()
        raise _row_too_long(path, names, [length[at].as_py() for length in lengths], row=first_row + at)


def _row_too_long(
    path: str, names: list[str], sizes: list[int], *, row: int | None, line: int | None = None
) -> InputError:
    """The error for a row whose fields (their UTF-8 bytes, ``sizes``) pass :data:`MAX_ROW_BYTES`,
    naming the column where it passes; without ``sizes``, a row too long as written."""
    running = 0
    column = None
    for name, size in zip(names, sizes, strict=False):
        running += size + 1
        if running > MAX_ROW_BYTES:
            column = name
            break
    written = "" if sizes else " as written (quotes included)"
    return InputError(
        f"the row is longer than {MAX_ROW_BYTES >> 10} KiB{written} (the most a row or field may hold)",
        path=path,
        line=line,
        row=row,
        column=column,
        hint="Shorten the value, or keep long texts in files named by a column (see Attachment:)",
    )


def json_objects(names: Sequence[str], values: Sequence[list[str]]) -> list[str]:
    """Each row as the JSON text ``encode_data(dict(zip(names, row)))`` gives, built a column at a time.

    A name given twice keeps its first place and its last value, as in a dict.
    """
    last = {name: i for i, name in enumerate(names)}
    template = "{" + ", ".join(quote_json(name).replace("%", "%%") + ": %s" for name in last) + "}"
    quoted = [list(map(quote_json, values[i])) for i in last.values()]
    return list(map(template.__mod__, zip(*quoted, strict=True)))


class _Classifier:
    """Gives a chunk's rows their key, occurrence, state and reason, a column at a time.

    Rules, for each row in order: the address (stripped) must be there and have
    an address's shape, else ``invalid``; the key is the address's canonical form
    (:func:`~mergekit.addresses.canonical_address`) or the ``--key`` column's
    value (empty: ``invalid``), or ``(row N)`` when empty; a row whose key came
    before is ``duplicate``, naming the row it first came in (invalid rows count
    as having come); a ``pending`` row whose canonical address is listed is
    ``suppressed``. Strip is Python's (``str.strip``); an ASCII address's
    canonical form is its lower-case, which Arrow computes a column at a time,
    and only the other addresses run Python code: :func:`pending_keys` gives a
    pending row's key again from its columns.
    """

    def __init__(
        self, columns: list[str], email_column: str, key_column: str | None, suppressed: Mapping[str, str]
    ) -> None:
        # A name given twice means its last column, as dict(zip(columns, row)) had it.
        self.email_at = len(columns) - 1 - columns[::-1].index(email_column)
        self.key_at = len(columns) - 1 - columns[::-1].index(key_column) if key_column else None
        self._email_column = email_column
        self._key_column = key_column
        self._suppressed = suppressed
        self._seen = SeenKeys()

    def __call__(self, first_row: int, values: pa.RecordBatch) -> Classes:
        import numpy as np
        import pyarrow.compute as pc

        emails = pc.utf8_trim(values.column(self.email_at), characters=_WHITESPACE)
        addresses: list[str] = []
        if self.key_at is None or self._suppressed:
            addresses = pc.utf8_lower(emails).to_pylist()  # the canonical form of an ASCII address
            for i in pc.indices_nonzero(pc.invert(pc.string_is_ascii(emails))).to_pylist():
                addresses[i] = canonical_address(emails[i].as_py())
        states: dict[int, str] = {}
        reasons: dict[int, str] = {}
        column = self._email_column
        misshapen = pc.indices_nonzero(pc.invert(pc.match_substring_regex(emails, _ADDRESS_SHAPE)))
        for i in misshapen.to_pylist():
            email = emails[i].as_py()
            states[i] = "invalid"
            reasons[i] = (
                f"column {column!r}: {email!r} is not an email address"
                if email
                else f"column {column!r} is empty"
            )
        keys: list[str] = addresses.copy() if self.key_at is None else values.column(self.key_at).to_pylist()
        if "" in keys:
            for i in [i for i, key in enumerate(keys) if not key]:
                if i not in states:  # only a --key column's value: an empty address is invalid
                    states[i], reasons[i] = "invalid", f"key column {self._key_column!r} is empty"
                keys[i] = f"(row {first_row + i})"
        occurrences, earlier = self._seen.count(keys, first_row)
        same = "same recipient" if self.key_at is None else "same key"
        for i in np.flatnonzero(occurrences).tolist():
            if i not in states:
                states[i], reasons[i] = "duplicate", f"{same} as row {earlier[i]} ({keys[i]})"
        if self._suppressed:
            listed = self._suppressed
            for i in [i for i, address in enumerate(addresses) if address in listed]:
                if i not in states:
                    states[i] = "suppressed"
                    reasons[i] = f"address listed in {listed[addresses[i]]} (--suppress)"
        return Classes(keys, occurrences, emails, states, reasons)


class SeenKeys:
    """How many times each recipient key came before and its first row, in 20 bytes a key; or a set
    of keys (:meth:`holds`).

    A dict of the key strings took about 110 MB for a million rows, a third of
    the dry run's memory target (issue 6). Each key is kept as two independent
    64-bit hashes instead (Python's SipHash of the key, and of the key after a
    NUL), sorted by the first, with the row it first came in (so a duplicate's
    reason names that row): two different keys pass for one with a
    probability of about n²/2¹²⁹, 10⁻²⁷ for a million rows. Only rows whose
    first hash came before run Python code beyond the hashing; the counts of
    keys seen there (duplicates, mostly) are kept by their pair of hashes.

    The sorted hashes are runs of falling size, two runs of about one size
    merged into one (as in a log-structured merge tree): adding a chunk's hashes
    to one sorted array moved every stored hash per chunk.
    """

    def __init__(self) -> None:
        # (first hashes sorted, second hashes and first rows beside them): no pair in two runs
        self._runs: list[_Run] = []
        # rows so far with each pair met below, and the first of them
        self._counted: dict[tuple[int, int], tuple[int, int]] = {}

    def count(self, keys: list[str], first_row: int = 1) -> tuple[npt.NDArray[np.int64], dict[int, int]]:
        """Each key's occurrence (how often it came before, in earlier chunks or earlier in
        ``keys``), and for each key that came before, by position, the row it first came in
        (``keys[i]`` is row ``first_row + i``)."""
        import numpy as np

        first, second = _hash_pairs(keys)
        order = np.argsort(first, kind="stable")
        ordered = first[order]
        suspect = self._stored(ordered)  # rows whose first hash came before: in a run, or here
        same = ordered[1:] == ordered[:-1]
        suspect[1:] |= same
        suspect[:-1] |= same
        occurrences = np.zeros(len(keys), np.int64)
        earlier: dict[int, int] = {}
        new = ~suspect  # in sorted order: the pairs to store
        # In row order, so an earlier row of the chunk is counted before a later one.
        for at, i in sorted(
            zip(np.flatnonzero(suspect).tolist(), order[suspect].tolist(), strict=True), key=_second
        ):
            pair = (int(first[i]), int(second[i]))
            counted = self._counted.get(pair)
            if counted is None:  # not met here before: is it in a run?
                row = self._row_of(pair)
                counted = (0, first_row + i) if row is None else (1, row)
                new[at] = row is None
            before, row = counted
            if before:
                earlier[i] = row
            occurrences[i] = before
            self._counted[pair] = (before + 1, row)
        rows = (order[new] + first_row).astype(np.int32)
        self._add_run(_Run(ordered[new], second[order[new]], rows))
        return occurrences, earlier

    def holds(self, keys: list[str]) -> npt.NDArray[np.bool_]:
        """Which of ``keys`` were counted before (without counting them)."""
        import numpy as np

        first, second = _hash_pairs(keys)
        held = np.zeros(len(keys), dtype=bool)
        shared = np.zeros(len(keys), dtype=bool)  # a first hash that some counted key has
        for firsts, seconds, _ in self._runs:
            at = np.minimum(np.searchsorted(firsts, first), len(firsts) - 1)
            same_first = firsts[at] == first
            held |= same_first & (seconds[at] == second)
            shared |= same_first
        for i in np.flatnonzero(shared & ~held).tolist():  # other keys have its first hash
            held[i] = self._row_of((int(first[i]), int(second[i]))) is not None
        return held

    def _stored(self, ordered: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """For sorted first hashes: which some run holds (with any second hash)."""
        import numpy as np

        stored = np.zeros(len(ordered), dtype=bool)
        for firsts, _, _ in self._runs:
            at = np.minimum(np.searchsorted(firsts, ordered), len(firsts) - 1)
            stored |= firsts[at] == ordered
        return stored

    def _row_of(self, pair: tuple[int, int]) -> int | None:
        """The first row of the key with hashes ``pair``, if a run holds it."""
        for firsts, seconds, rows in self._runs:
            start, end = firsts.searchsorted(pair[0], "left"), firsts.searchsorted(pair[0], "right")
            found = (seconds[start:end] == pair[1]).nonzero()[0]
            if len(found):
                return int(rows[start + found[0]])
        return None

    def _add_run(self, run: _Run) -> None:
        import numpy as np

        runs = self._runs
        if len(run.firsts):
            runs.append(run)
        while len(runs) > 1 and len(runs[-2].firsts) <= 2 * len(runs[-1].firsts):
            later, earlier = runs.pop(), runs.pop()
            joined = np.concatenate((earlier.firsts, later.firsts))
            order = np.argsort(joined, kind="stable")  # a merge of two sorted runs
            runs.append(
                _Run(
                    joined[order],
                    np.concatenate((earlier.seconds, later.seconds))[order],
                    np.concatenate((earlier.rows, later.rows))[order],
                )
            )


class _Run(NamedTuple):
    """Keys' first hashes sorted, with their second hashes and first rows beside them."""

    firsts: npt.NDArray[np.int64]
    seconds: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int32]


def _hash_pairs(keys: list[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Each key's two independent 64-bit hashes: of the key, and of the key after a NUL."""
    import numpy as np

    first = np.fromiter(map(_key_hash, keys), np.int64, len(keys))
    second = np.fromiter(map(hash, map("\0".__add__, keys)), np.int64, len(keys))
    return first, second


def _parse_error(path: str, encoding: str, names: list[str], err: Exception) -> InputError:
    """The InputError for a file Arrow would not read, naming the row where it went wrong.

    Only a file with a problem is read again, by the csv module, to say where:
    the first row that does not decode, parse, have as many fields as ``names``
    or fit in :data:`MAX_ROW_BYTES`.
    """
    try:
        _name_shape_error(path, encoding, names)
    except InputError as found:
        return found
    return InputError(
        f"cannot parse the CSV: {err}", path=path, hint="Fix the line, or save the file again as CSV"
    )


def _name_shape_error(path: str, encoding: str, names: list[str]) -> None:
    """Raise the InputError for the first row that does not decode, parse, have as many fields
    as ``names`` or fit in :data:`MAX_ROW_BYTES`; failing those, for the first row longer than
    that as written (quotes included), which is where Arrow's reader stops."""
    width = len(names)
    row = 0
    consumed = 0  # characters read so far, for the size of each row as written
    long_as_written: InputError | None = None

    def counted(file: Iterable[str]) -> Iterator[str]:
        nonlocal consumed
        for text in file:
            consumed += len(text)
            yield text

    try:
        with open(path, encoding=encoding, newline="") as file, _field_limit(_SCAN_FIELD_LIMIT):
            records = csv.reader(counted(file), strict=True)
            next(records, None)
            before = consumed
            for record in records:
                written, before = consumed - before, consumed
                if not record:
                    continue  # a blank line, which pandas skips as well
                row += 1
                if len(record) != width:
                    raise _field_count_error(path, len(record), width, line=records.line_num, row=row)
                sizes = [len(value.encode()) for value in record]
                if sum(sizes) + width > MAX_ROW_BYTES:
                    raise _row_too_long(path, names, sizes, row=row, line=records.line_num)
                if written > MAX_ROW_BYTES and long_as_written is None:
                    long_as_written = _row_too_long(path, names, [], row=row, line=records.line_num)
    except UnicodeDecodeError as err:
        raise _encoding_error(path, encoding, err) from None
    except csv.Error as err:
        if "field limit" in str(err):
            raise _row_too_long(path, names, [], row=row + 1, line=records.line_num) from None
        raise InputError(
            f"cannot parse the CSV: {err}",
            path=path,
            line=records.line_num,
            row=row + 1,
            hint="Fix or remove the line",
        ) from None
    if long_as_written is not None:
        raise long_as_written


def _field_count_error(path: str, count: int, width: int, *, line: int, row: int) -> InputError:
    few = count < width
    return InputError(
        f"the row has {count} fields but the header has {width}",
        path=path,
        line=line,
        row=row,
        column=f"field {count + 1}" if few else f"extra field {width + 1}",
        hint="Add the missing fields (empty is fine: a,,c)"
        if few
        else "Quote values that contain commas, or remove the extra fields",
    )


@contextlib.contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    """The csv module's field size limit (a process-wide setting) set to ``limit`` for a while."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


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
    """The column names, stripped, each once, at most :data:`MAX_COLUMNS` in one block's length."""
    try:
        with open(path, encoding=encoding, newline="") as file, _field_limit(_SCAN_FIELD_LIMIT):
            header = next(csv.reader(file), None)
    except FileNotFoundError:
        raise InputError(
            "recipients file not found", path=path, hint="Check the RECIPIENTS argument"
        ) from None
    except UnicodeDecodeError as err:
        raise _encoding_error(path, encoding, err) from None
    except OSError as err:
        raise InputError(f"cannot read the file: {err.strerror}", path=path) from None
    except csv.Error as err:
        raise InputError(
            f"cannot read the header line: {err}",
            path=path,
            line=1,
            hint=f"The header line names the columns; it may take at most {MAX_ROW_BYTES >> 10} KiB",
        ) from None
    if not header or not any(name.strip() for name in header):
        raise InputError(
            "the file is empty: it needs a header line naming the columns",
            path=path,
            line=1,
            hint="The first line must name the columns, e.g. email,name",
        )
    _check_header_size(path, header)
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
    first: dict[str, int] = {}
    for number, name in enumerate(stripped, start=1):
        if name in first:
            raise InputError(
                f"two columns are named {name!r} (columns {first[name]} and {number})",
                path=path,
                line=1,
                column=name,
                hint="Give every column its own name: a template could use only one of them",
            )
        first[name] = number
    return stripped


def _check_header_size(path: str, header: list[str]) -> None:
    """Refuse a header with more than :data:`MAX_COLUMNS` columns or longer than a row may be."""
    if len(header) > MAX_COLUMNS:
        raise InputError(
            f"the header names {len(header):,} columns; mergekit reads at most {MAX_COLUMNS:,}",
            path=path,
            line=1,
            hint="Remove the columns the template does not use (e.g. export fewer from the spreadsheet)",
        )
    if sum(len(name.encode()) + 1 for name in header) > MAX_ROW_BYTES:
        raise InputError(
            f"the header line is longer than {MAX_ROW_BYTES >> 10} KiB (the most a row may hold)",
            path=path,
            line=1,
            hint="Shorten the column names",
        )


def _find_column(columns: list[str], wanted: str, path: str, option: str) -> str:
    """The one column named ``wanted``, in any case; two that match are refused, naming both."""
    folded = [name for name in columns if name.lower() == wanted.lower()]
    if len(folded) == 1:
        return folded[0]
    if folded:
        raise InputError(
            f"columns {folded[0]!r} and {folded[1]!r} both match {option} {wanted!r} "
            "(names compare in any case)",
            path=path,
            line=1,
            column=wanted,
            hint="Rename or remove one of them, so that the column to use is certain",
        )
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
