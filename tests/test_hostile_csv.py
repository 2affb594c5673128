"""Recipient files that today's spreadsheets can produce and that used to pass silently (issue 13, item 7).

Each goes through ``mergekit send`` into a Maildir, as a user runs it, and is
judged by the exit code, the one-line error, what reached the Maildir and what
the ledger holds afterwards (``status --json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergekit.source import MAX_COLUMNS, MAX_ROW_BYTES
from tests.conftest import run_cli

TEMPLATE = "From: Ada <ada@example.com>\nTo: {{ email }}\nSubject: Hello\n\nHello\n"


def send(tmp_path: Path, csv_text: str, *options: str) -> tuple[int, str]:
    (tmp_path / "people.csv").write_text(csv_text, encoding="utf-8")
    (tmp_path / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    result = run_cli("send", "people.csv", "t.txt", "--transport", "maildir://out", *options, cwd=tmp_path)
    return result.returncode, result.stderr


def delivered(tmp_path: Path) -> int:
    folder = tmp_path / "out" / "new"
    return len(list(folder.iterdir())) if folder.exists() else 0


def refused(tmp_path: Path, csv_text: str, *options: str, header_only: bool = True) -> str:
    """The one-line error of a run that must change nothing: exit 2, nothing delivered, and no
    ledger when the header is at fault (else a campaign without rows)."""
    code, stderr = send(tmp_path, csv_text, *options)
    assert code == 2, stderr
    assert stderr.startswith("Error: people.csv") and len(stderr.splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert delivered(tmp_path) == 0
    if (tmp_path / "mergekit.db").exists():  # a row found bad mid-file: its ingest rolled back
        status = json.loads(run_cli("status", "--json", cwd=tmp_path).stdout)
        assert status["total"] == 0 and not header_only, status
    return stderr


HEADERS = {
    "address twice in two cases": ("email,EMAIL\na@example.org,b@example.org\n", ("'email'", "'EMAIL'")),
    "address twice, neither exact": (
        "Email,name,EMAIL\na@example.org,A,b@example.org\n",
        ("'Email'", "'EMAIL'", "both match --email-column"),
    ),
    "a name twice": ("email,name,name\na@example.org,A,B\n", (":1,", "column 'name'", "columns 2 and 3")),
    "a name twice after stripping": ("email,name, name\na@example.org,A,B\n", ("column 'name'",)),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_ambiguous_header_is_refused_naming_the_columns(case: str, tmp_path: Path) -> None:
    text, needles = HEADERS[case]
    stderr = refused(tmp_path, text)
    assert all(needle in stderr for needle in needles), stderr


def test_key_column_twice_in_two_cases_is_refused(tmp_path: Path) -> None:
    stderr = refused(tmp_path, "email,id,ID\na@example.org,1,2\n", "--key", "id")
    assert "'id' and 'ID' both match --key" in stderr


def test_a_hundred_thousand_columns_name_the_line_and_the_limit(tmp_path: Path) -> None:
    header = "email," + ",".join(f"c{i}" for i in range(100_000))
    stderr = refused(tmp_path, header + "\na@example.org" + "," * 100_000 + "\n")
    assert "people.csv:1: the header names 100,001 columns" in stderr
    assert f"at most {MAX_COLUMNS:,}" in stderr
    assert "block" not in stderr and "skip" not in stderr  # not Arrow's text


def test_the_column_limit_itself_is_accepted(tmp_path: Path) -> None:
    header = "email," + ",".join(f"c{i}" for i in range(MAX_COLUMNS - 1))
    code, stderr = send(tmp_path, header + "\na@example.org" + "," * (MAX_COLUMNS - 1) + "\n")
    assert code == 0, stderr
    assert delivered(tmp_path) == 1


def test_a_header_longer_than_a_row_may_be(tmp_path: Path) -> None:
    stderr = refused(tmp_path, "email," + "n" * MAX_ROW_BYTES + "\na@example.org,x\n")
    assert "people.csv:1: the header line is longer than 256 KiB" in stderr


def row_of(size: int) -> str:
    """A file whose row 2 takes ``size`` bytes of values and separators (as the limit counts them)."""
    first = "a@example.org,ok\n"
    email = "b@example.org"
    return "email,note\n" + first + email + "," + "y" * (size - len(email) - 2) + "\n"


def test_a_row_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    code, stderr = send(tmp_path, row_of(MAX_ROW_BYTES))
    assert code == 0, stderr
    assert delivered(tmp_path) == 2


@pytest.mark.parametrize("size", [MAX_ROW_BYTES + 1, 300_000, 1_000_000, 20_000_000])
def test_a_longer_row_names_its_row_and_column(size: int, tmp_path: Path) -> None:
    """Past the limit, whichever reader finds it (Arrow reads some rows up to two blocks long,
    others it refuses and the csv module finds the row): the same error, row 2, column note."""
    stderr = refused(tmp_path, row_of(size), header_only=False)
    assert "row 2" in stderr and "longer than 256 KiB" in stderr, stderr
    if size < 4_000_000:  # beyond that the csv module stops inside the field
        assert "column 'note'" in stderr, stderr


def test_a_row_of_many_fields_names_the_column_that_passes_the_limit(tmp_path: Path) -> None:
    third = "z" * 100_000
    text = "email,a,b,c\nx@example.org,1,2,3\ny@example.org," + ",".join([third] * 3) + "\n"
    stderr = refused(tmp_path, text, header_only=False)
    assert "row 2, column 'c'" in stderr, stderr


def test_a_row_whose_quotes_make_it_too_long_to_read_is_named(tmp_path: Path) -> None:
    """Its values fit, but as written (each quote doubled) it spans three of Arrow's blocks."""
    text = "email,note\na@example.org," + "f" * 200_000 + '\nb@example.org,"' + '""' * 255_000 + '"\n'
    stderr = refused(tmp_path, text, header_only=False)
    assert "people.csv:3, row 2: the row is longer than 256 KiB as written (quotes included)" in stderr


def test_a_refused_file_changes_nothing_in_a_running_campaign(tmp_path: Path) -> None:
    code, stderr = send(tmp_path, "email,name\na@example.org,A\n", "--campaign", "c")
    assert code == 0, stderr
    status = run_cli("status", "--json", cwd=tmp_path).stdout
    changed = "email,name,EMAIL\na@example.org,A,x\nb@example.org,B,y\n"
    code, stderr = send(tmp_path, changed, "--campaign", "c")
    assert code == 2 and "both match" in stderr, stderr
    assert run_cli("status", "--json", cwd=tmp_path).stdout == status
    assert json.loads(status)["sent"] == 1 and delivered(tmp_path) == 1
