"""Ingest: every value kept as written, bad rows recorded, bad files named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit.errors import ConfigError, InputError
from mergekit.source import SourceOptions, SourceRow, read_rows

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
    assert "earlier row" in rows[2].reason
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
