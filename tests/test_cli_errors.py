"""The CLI's error path for each bad argument, and secrets through every command, failing ones too."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import write_campaign
from tests.smtpd import SmtpServer, free_port

BAD_SEND_ARGUMENTS = {
    "unknown scheme": (("--transport", "pigeon://coop"), "option --transport: unknown transport scheme"),
    "bad rate": (("--rate", "fast"), "option --rate: 'fast' is not a rate"),
    "zero rate": (("--rate", "0/s"), "option --rate"),
    "bad timeout": (("--transport", "smtp://127.0.0.1:{port}?timeout=abc"), "option --transport: ?timeout="),
    "bad cap": (
        ("--transport", "smtp://127.0.0.1:{port}?max_per_connection=x"),
        "option --transport: ?max_per_connection=",
    ),
    "bad port": (("--transport", "smtp://127.0.0.1:99999"), "option --transport"),
    "bad starttls": (("--transport", "smtp://127.0.0.1:{port}?starttls=sometimes"), "option --transport"),
    "bad concurrency": (("--concurrency", "0"), "option --concurrency"),
    "bad max attempts": (("--max-attempts", "0"), "option --max-attempts"),
    "bad batch size": (("--batch-size", "0"), "option --batch-size"),
    "unreadable ledger": (("--ledger", "garbage.db"), "ledger garbage.db: cannot open the ledger"),
    "ledger is a folder": (("--ledger", "folder.db"), "ledger folder.db: cannot open the ledger"),
    "ledger in no folder": (("--ledger", "no/such/folder/l.db"), "ledger no/such/folder/l.db"),
    "unknown ledger engine": (("--ledger", "mysql://db/mergekit"), "option --ledger"),
}


@pytest.mark.parametrize("name", list(BAD_SEND_ARGUMENTS))
def test_bad_send_argument_is_one_line_exit_2_nothing_sent(
    name: str, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    extra, needle = BAD_SEND_ARGUMENTS[name]
    recipients, template = write_campaign(tmp_path, 3)
    (tmp_path / "garbage.db").write_bytes(b"not a database, just some bytes" * 100)
    (tmp_path / "folder.db").mkdir()
    args = ["send", str(recipients), str(template), "--transport", f"smtp://127.0.0.1:{smtp_server.port}"]
    args += [part.format(port=smtp_server.port) for part in extra]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: ") and needle in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "--" in result.stderr  # names the option to change
    assert smtp_server.messages == []


def make_ledger(tmp_path: Path, server: SmtpServer, campaign: str) -> None:
    recipients, template = write_campaign(tmp_path, 2)
    url = f"smtp://127.0.0.1:{server.port}"
    result = run_cli(
        "send", str(recipients), str(template), "--transport", url, "--campaign", campaign, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("status", "--campaign", "spring-sale"),
        ("status", "--json", "--campaign", "spring-sale"),
        ("report", "--campaign", "spring-sale"),
        ("retry", "--campaign", "spring-sale"),
    ],
)
def test_campaign_not_in_this_ledger(args: tuple[str, ...], smtp_server: SmtpServer, tmp_path: Path) -> None:
    make_ledger(tmp_path, smtp_server, "autumn-news")
    sent = len(smtp_server.messages)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "Error: ledger mergekit.db: there is no campaign 'spring-sale'; it holds 'autumn-news'. "
        "Name one of its campaigns with --campaign\n"
    )
    assert len(smtp_server.messages) == sent


def test_ledger_of_a_newer_mergekit(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 2)
    with sqlite3.connect(tmp_path / "new.db") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    result = run_cli(
        "send", str(recipients), str(template), "--transport", "null://", "--ledger", "new.db", cwd=tmp_path
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "written by a newer mergekit" in result.stderr and "--ledger" in result.stderr


SECRET = "Zq7-distinctive-PASSWORD-91x"
API_KEY = "key-Kp4-distinctive-APIKEY-22y"


def secret_forms() -> list[str]:
    """The secrets as written, and as SMTP AUTH would carry them (base64), so no encoded leak hides."""
    forms = [SECRET, API_KEY]
    for blob in (SECRET.encode(), b"\0mailer\0" + SECRET.encode(), b"mailer\0" + SECRET.encode()):
        forms.append(base64.b64encode(blob).decode())
    return forms


def test_secrets_never_leak_from_any_command(tmp_path: Path) -> None:
    server = SmtpServer(login=("mailer", SECRET)).start()
    try:
        recipients, template = write_campaign(tmp_path, 3)
        good = f"smtp://mailer:{SECRET}@127.0.0.1:{server.port}?api_key={API_KEY}"
        wrong = f"smtp://mailer:{SECRET}-wrong@127.0.0.1:{server.port}"
        down = f"smtp://mailer:{SECRET}@127.0.0.1:{free_port()}"
        send = ("send", str(recipients), str(template))
        env_only = {"MERGEKIT_SMTP_PASSWORD": SECRET}
        runs: list[tuple[tuple[str, ...], dict[str, str], int]] = [
            ((*send, "--transport", wrong, "--json"), {}, 2),  # auth refused
            (("--debug", *send, "--transport", wrong), {}, 2),  # auth refused, traceback
            (("--debug", *send, "--transport", down, "--json"), {}, 3),  # server down
            (("--debug", *send, "--transport", f"{good}&timeout=abc"), {}, 2),  # bad URL
            (("--debug", *send, "--transport", f"pigeon://mailer:{SECRET}@coop?token={API_KEY}"), {}, 2),
            (("--debug", *send, "--transport", f"smtp://mailer@127.0.0.1:{free_port()}"), env_only, 3),
            (("--debug", *send, "--transport", good, "--json"), {}, 0),  # the real send
            (("--debug", *send, "--transport", good, "--json"), {}, 0),  # resume: nothing left
            (("status",), {}, 0),
            (("--debug", "status", "--json"), {}, 0),
            (("report", "-o", "report.csv"), {}, 0),
            (("report", "--format", "json", "-o", "report.json"), {}, 0),
            (("report", "--format", "json"), {}, 0),
            (("--debug", "retry"), {}, 2),  # the stored transport lacks its secret: asks for it
            (("--debug", "retry", "--transport", wrong, "--failed"), {}, 2),
            (("--debug", "retry", "--transport", good), {}, 0),
            (("preview", str(recipients), str(template)), {}, 0),
        ]
        outputs = []
        for args, env, expected in runs:
            result = run_cli(*args, cwd=tmp_path, env=env)
            assert result.returncode == expected, (args, result.stderr)
            outputs.append(f"{result.stdout}\n{result.stderr}")
        assert "refused the login for 'mailer'" in outputs[0]
        assert len(server.messages) == 3
        assert json.loads(run_cli("status", "--json", cwd=tmp_path).stdout)["sent"] == 3
        files = {
            path: path.read_bytes().decode("utf-8", "replace")
            for path in tmp_path.rglob("*")
            if path.is_file()
        }
        assert {"report.csv", "report.json", "mergekit.db"} <= {path.name for path in files}
        for form in secret_forms():
            for text in outputs:
                assert form not in text, text
            for path, text in files.items():
                assert form not in text, path
        # The SQLite file may hold freed pages: look at the raw bytes of every file too.
        for path in files:
            raw = path.read_bytes()
            assert all(form.encode() not in raw for form in secret_forms()), path
        assert os.environ.get("MERGEKIT_SMTP_PASSWORD") is None
    finally:
        server.stop()
