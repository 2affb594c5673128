"""Ingest: every value kept as written, bad rows recorded, bad files named precisely."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit.addresses import canonical_address
from mergekit.errors import ConfigError, InputError
from mergekit.source import SourceOptions, SourceRow, ingest_columns, read_rows

MESSY = (
    "\ufeffemail,name,zip,note\n"
    "ann@example.org,Ann,02134,NA\n"
    "bob@example.org,Null,00501,None\n"
    "ANN@Example.org,Ann again,1,\n"
    "not-an-address,Eve,2,x\n"
    ",Nobody,3,x\n"
    'zoë@exämple.org,Zoë,04000,"multi\nline"\n'
)


def rows_of(path: Path, **options: str) -> list[SourceRow]:
    return [row for chunk in read_rows(path, SourceOptions(**options)) for row in chunk]


def write(tmp_path: Path, text: str | bytes, name: str = "r.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_values_stay_exactly_as_written(tmp_path: Path) -> None:
    rows = rows_of(write(tmp_path, MESSY))
    assert rows[0].data == {"email": "ann@example.org", "name": "Ann", "zip": "02134", "note": "NA"}
    assert rows[1].data["name"] == "Null" and rows[1].data["note"] == "None"
    assert rows[1].data["zip"] == "00501"
    assert rows[5].data["note"] == "multi\nline"


def test_states_and_reasons(tmp_path: Path) -> None:
    rows = rows_of(write(tmp_path, MESSY))
    assert [r.state for r in rows] == ["pending", "pending", "duplicate", "invalid", "invalid", "pending"]
    assert rows[2].key == "ann@example.org" and rows[2].occurrence == 1
    assert rows[2].reason == "same recipient as row 1 (ann@example.org)"
    assert "not an email address" in rows[3].reason
    assert "empty" in rows[4].reason
    assert [r.row for r in rows] == [1, 2, 3, 4, 5, 6]


def test_key_column(tmp_path: Path) -> None:
    path = write(tmp_path, "email,id\na@example.org,7\na@example.org,8\nb@example.org,7\n")
    rows = rows_of(path, key_column="id")
    assert [(r.key, r.state) for r in rows] == [("7", "pending"), ("8", "pending"), ("7", "duplicate")]


def test_other_encoding_needs_the_option(tmp_path: Path) -> None:
    path = write(tmp_path, "email,name\na@example.org,Ann\nb@example.org,J\xe9r\xf4me\n".encode("cp1252"))
    with pytest.raises(InputError) as caught:
        rows_of(path)
    assert caught.value.line == 3
    assert "--encoding" in str(caught.value)
    assert rows_of(path, encoding="cp1252")[1].data["name"] == "Jérôme"


def test_unknown_encoding_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--encoding"):
        rows_of(write(tmp_path, MESSY), encoding="klingon")


def test_missing_address_column(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        rows_of(write(tmp_path, "mail,name\na@example.org,A\n"))
    assert caught.value.column == "email"
    assert "--email-column" in str(caught.value) and "mail, name" in str(caught.value)
    assert rows_of(write(tmp_path, "mail,name\na@example.org,A\n"), email_column="mail")


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(InputError, match="empty"):
        rows_of(write(tmp_path, text))


@pytest.mark.parametrize(
    "line, column", [("b@example.org,B", "field 3"), ("b@example.org,B,3,4", "extra field 4")]
)
def test_ragged_rows_name_row_and_column(tmp_path: Path, line: str, column: str) -> None:
    path = write(tmp_path, f"email,name,zip\na@example.org,A,1\n{line}\nc@example.org,C,3\n")
    with pytest.raises(InputError) as caught:
        rows_of(path)
    assert caught.value.row == 2 and caught.value.line == 3
    assert caught.value.column == column


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        rows_of(tmp_path / "nope.csv")


def test_chunks_stream_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 7)
    path = write(tmp_path, "email\n" + "".join(f"u{i}@example.org\n" for i in range(50)))
    chunks = list(read_rows(path))
    assert [len(c) for c in chunks] == [7] * 7 + [1]
    assert chunks[-1][0].row == 50


Classified = tuple[int, str, int, str, dict[str, str], str]  # row, key, occurrence, email, data, state


def reference_rows(path: Path, options: SourceOptions) -> list[Classified]:
    """The rules row by row, as ingest applied them before it worked a column at a time."""
    with open(path, encoding="utf-8-sig", newline="") as file:
        records = [r for r in csv.reader(file) if r]
    names = [name.strip() for name in records[0]]
    seen: dict[str, int] = {}
    out = []
    for number, record in enumerate(records[1:], start=1):
        data = dict(zip(names, record, strict=True))
        email = data[options.email_column].strip()
        state = "pending"
        if not email or not re.match(r"[^@\s]+@[^@\s]+\.[^@\s.]+\Z", email):
            state = "invalid"
        key = canonical_address(email)
        if options.key_column is not None:
            key = data[options.key_column]
            if not key and state == "pending":
                state = "invalid"
        key = key or f"(row {number})"
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        if occurrence and state == "pending":
            state = "duplicate"
        if state == "pending" and canonical_address(email) in options.suppressed:
            state = "suppressed"
        out.append((number, key, occurrence, email, data, state))
    return out


CELL = st.sampled_from(
    [
        "a@example.org",
        " A@Example.org ",
        "b@example.org",
        "",
        "x",
        "5",
        "%s",
        'q"\\',
        # one mailbox in four spellings (U-label, A-label, NFD, a full-width letter), and İ,
        # whose lower-case is not Arrow's
        "b@bücher.example",
        "B@XN--BCHER-KVA.example",
        "b@bu\u0308cher.example",
        "b@\uff42ücher.example",
        "İ@example.org",
    ]
)
TABLE = st.lists(st.tuples(CELL, CELL, CELL), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=TABLE, chunk=st.integers(1, 9), key=st.booleans(), collide=st.booleans())
def test_chunks_classify_as_row_by_row(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    table: list[tuple[str, str, str]],
    chunk: int,
    key: bool,
    collide: bool,
) -> None:
    """Duplicates across chunk boundaries, invalid rows mid-chunk, the key column, suppression;
    with ``collide``, different keys share hashes."""
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", chunk)
    monkeypatch.setattr("mergekit.source._key_hash", (lambda key: len(key) % 3) if collide else hash)
    out = io.StringIO()
    csv.writer(out).writerows([("email", "id", "note"), *table])
    path = write(tmp_path, out.getvalue())
    suppressed = {"b@example.org": "stop.csv", "b@xn--bcher-kva.example": "stop.csv"}
    options = SourceOptions(key_column="id" if key else None, suppressed=suppressed)
    chunks = list(read_rows(path, options))
    got = [(r.row, r.key, r.occurrence, r.email, r.data, r.state) for c in chunks for r in c]
    assert got == reference_rows(path, options)
    assert all(r.reason for c in chunks for r in c if r.state != "pending")
    first: dict[str, int] = {}
    for r in (r for c in chunks for r in c):
        first.setdefault(r.key, r.row)
        if r.state == "duplicate":  # the reason names the row the key first came in
            assert f" as row {first[r.key]} ({r.key})" in r.reason


def test_columns_encode_data_as_json_dumps(tmp_path: Path) -> None:
    """% in a name, quotes, backslashes, control and non-ASCII characters."""
    path = write(
        tmp_path,
        'email,n%s,n%d,"q"""\nb@example.org,1,2,"x\\"" \x01\t"\n,Zoë,"multi\nline",\n',
    )
    (chunk,) = read_rows(path, SourceOptions())
    columns = ingest_columns(chunk)
    assert columns.data == [json.dumps(row.data, ensure_ascii=False) for row in chunk]
    assert [json.loads(text) for text in columns.data] == [row.data for row in chunk]
    assert chunk[0].data == {"email": "b@example.org", "n%s": "1", "n%d": "2", 'q"': 'x\\" \x01\t'}
    assert columns.emails == ["b@example.org", ""] and columns.states == ["pending", "invalid"]
    assert chunk[-1].row == 2 and [r.row for r in chunk[:5]] == [1, 2]


def test_keys_sharing_a_hash_stay_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Different keys with one hash are told apart by the keys themselves (forced here for every key)."""
    monkeypatch.setattr("mergekit.source._key_hash", lambda key: 0)
    monkeypatch.setattr("mergekit.source.CHUNK_ROWS", 2)
    emails = ["a@x.org", "b@x.org", "c@x.org", "a@x.org", "c@x.org", "d@x.org", "b@x.org", "a@x.org"]
    path = write(tmp_path, "email\n" + "".join(f"{e}\n" for e in emails))
    rows = rows_of(path)
    assert [r.occurrence for r in rows] == [0, 0, 0, 1, 1, 0, 1, 2]
    assert [r.state for r in rows] == ["pending"] * 3 + ["duplicate"] * 2 + ["pending"] + ["duplicate"] * 2
    assert [r.reason.split(" (")[0] for r in rows if r.state == "duplicate"] == [
        f"same recipient as row {first}" for first in (1, 3, 2, 1)
    ]
