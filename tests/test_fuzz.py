"""Bad input, fuzzed: any CSV content and any values end as a state with a reason, never a crash or injection.

Every example writes a recipients file, runs ``send`` into a Maildir and then
checks, against the same file read by Python's csv module: either the whole
file was refused with one ``InputError``, or every row ended ``sent``,
``invalid`` or ``duplicate`` (the last two with a reason), and every message
carries exactly the template's headers with the row's values, and its body.
"""

from __future__ import annotations

import csv
import email
import email.policy
import io
import tempfile
from email.message import EmailMessage
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mergekit import InputError, SendOptions, report, send

TEMPLATE = """\
From: News <news@example.com>
To: {{ name }} <{{ email }}>
Subject: {{ note }}
X-Note: [{{ note }}]

{{ name }}|{{ note }}
"""
EXPECTED_HEADERS = {
    "From",
    "To",
    "Subject",
    "X-Note",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
}
NASTY = st.sampled_from(
    [
        "\x00",
        "\r",
        "\n",
        "\r\n",
        '"',
        "'",
        ",",
        "\ufeff",
        "\u2028",
        "\x85",
        "Bcc: victim@example.net",
        "=?utf-8?q?x?=",
    ]
)
VALUE = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(NASTY, st.text(max_size=5)), max_size=6).map("".join),
    st.just("x" * 5000),  # a huge field, and a line longer than RFC 5322 allows
)
ADDRESS = st.one_of(
    st.integers(1, 5).map(lambda i: f"user{i}@example.org"),  # small range: duplicates happen
    VALUE,
)
ROW = st.tuples(ADDRESS, VALUE, VALUE).map(list)
RAGGED = st.lists(VALUE, max_size=5).filter(lambda row: len(row) != 3)
FAST = SendOptions(concurrency=1, backoff_initial=0.01, backoff_max=0.02)


def written(rows: list[list[str]], bom: bool) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["email", "name", "note"])
    writer.writerows(rows)
    return (("\ufeff" if bom else "") + out.getvalue()).encode("utf-8")


def words(text: str) -> str:
    return " ".join(text.split())


def display_name(name: str) -> str:
    """The display name ``{{ name }} <{{ email }}>`` shows: a name in double quotes is a quoted string
    (README, "Address headers"), so ``"Jo"`` shows as Jo and ``""`` as no name at all."""
    stripped = name.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        return stripped[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return name


def check_run(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        (path / "r.csv").write_bytes(content)
        (path / "t.txt").write_text(TEMPLATE)
        ledger = str(path / "l.db")
        try:
            send(
                path / "r.csv",
                path / "t.txt",
                transport=f"maildir://{path}/out",
                ledger_path=ledger,
                options=FAST,
            )
        except InputError as err:
            assert str(err)  # one clear error for the whole file
            event("the whole file refused")
            return
        with open(path / "r.csv", encoding="utf-8-sig", newline="") as file:
            records = [r for r in csv.reader(file)][1:]
        records = [r for r in records if r]
        _, rows = report(ledger_path=ledger)
        ledger_rows = list(rows)
        assert len(ledger_rows) == len(records)
        by_key = {}
        for row, record in zip(ledger_rows, records, strict=True):
            event(f"row {row.state}")
            assert row.state in {"sent", "invalid", "duplicate"}, row
            if row.state != "sent":
                assert row.last_text, row
            else:
                by_key[row.message_id] = dict(zip(["email", "name", "note"], record, strict=True))
        files = list((path / "out" / "new").iterdir()) if (path / "out" / "new").exists() else []
        assert len(files) == len(by_key)
        for file in files:
            message = email.message_from_bytes(file.read_bytes(), policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            assert set(message.keys()) == EXPECTED_HEADERS, message.keys()  # nothing injected
            data = by_key[message["Message-ID"]]
            assert words(str(message["Subject"])) == words(data["note"])
            assert words(str(message["X-Note"])) == words(f"[{data['note']}]")
            assert message["To"].addresses[0].addr_spec.lower() == data["email"].strip().lower()
            shown = message["To"].addresses[0].display_name
            if "=?utf-8?" in str(message.get_all("To", [""])[0]) or "=?utf-8?b?" in file.read_text("ascii"):
                # Python's address parser keeps the (RFC 2047: meaningless) space between encoded-words.
                assert "".join(shown.split()) == "".join(display_name(data["name"]).split())
            else:
                assert words(shown) == words(display_name(data["name"]))
            body = message.get_content().replace("\r\n", "\n")
            expected = f"{data['name']}|{data['note']}\n".replace("\r\n", "\n").replace("\r", "\n")
            assert body == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(ROW, max_size=6), ragged=st.none() | st.tuples(st.integers(0, 6), RAGGED), bom=st.booleans()
)
def test_any_csv_rows_end_in_a_state_with_a_reason(
    rows: list[list[str]], ragged: tuple[int, list[str]] | None, bom: bool
) -> None:
    if ragged is not None:
        rows.insert(ragged[0], ragged[1])
    check_run(written(rows, bom))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8")))
def test_any_bytes_after_a_header(raw: bytes) -> None:
    check_run(b"email,name,note\r\n" + raw)
