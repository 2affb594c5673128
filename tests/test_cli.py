"""The command line: exit codes, JSON, messages, resume after a real SIGKILL, secrets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit.cli import main
from mergekit.ledger import STATES
from tests.conftest import ROOT, run_cli
from tests.helpers import TEMPLATE, send_command, signal_when_received, write_campaign
from tests.smtpd import SmtpServer, free_port

MESSY_CSV = (
    "\ufeffemail,name,zip,note\r\n"
    "ann@example.org,Ann,02134,NA\r\n"
    "bob@example.org,Null,00501,None\r\n"
    "ann@example.org,Ann Twice,1,\r\n"
    "not-an-address,Eve,2,x\r\n"
    '"mallory@example.org","Mal\r\nBcc: victim@example.net",3,x\r\n'
    "cy@example.org,Cy,04000,\r\n"
)
MESSY_TEMPLATE = """\
From: News <news@example.com>
To: {{ name }} <{{ email }}>
Subject: Your code {{ zip }}

Hello {{ name }}: zip {{ zip }}, note {{ note }}.
"""


def invoke(*args: str, cwd: Path) -> tuple[int, str, str]:
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)
    return result.exit_code, result.stdout, result.stderr


def status_json(cwd: Path, *extra: str) -> dict[str, object]:
    _code, out, _ = invoke("status", "--json", *extra, cwd=cwd)
    return dict(json.loads(out))


def test_every_command_has_help_and_a_readme_entry() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in main.commands.items():
        assert command.help, f"mergekit {name} has no help"
        assert f"mergekit {name}" in readme, f"README does not document mergekit {name}"


def test_messy_spreadsheet_csv(smtp_server: SmtpServer, tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_bytes(MESSY_CSV.encode("utf-8"))
    (tmp_path / "t.txt").write_text(MESSY_TEMPLATE)
    code, out, err = invoke(
        "send",
        "r.csv",
        "t.txt",
        "--transport",
        f"smtp://127.0.0.1:{smtp_server.port}",
        "--json",
        cwd=tmp_path,
    )
    assert code == 1, err
    found = json.loads(out)
    assert (found["sent"], found["invalid"], found["duplicate"], found["total"]) == (3, 2, 1, 6)
    received = smtp_server.handler.by_recipient()
    assert sorted(received) == ["ann@example.org", "bob@example.org", "cy@example.org"]
    assert all(len(copies) == 1 for copies in received.values())
    bob = received["bob@example.org"][0].parsed()
    assert bob["To"].addresses[0].display_name == "Null"
    assert "zip 00501, note None." in bob.get_content()
    assert "note NA." in received["ann@example.org"][0].parsed().get_content()
    assert "zip 04000" in received["cy@example.org"][0].parsed().get_content()
    assert all(b"victim" not in m.data for m in smtp_server.messages)
    code, out, _ = invoke(
        "report", "--format", "json", "--state", "invalid", "--state", "duplicate", cwd=tmp_path
    )
    reasons = {r["row"]: (r["state"], r["last_text"]) for r in json.loads(out)}
    assert reasons[3] == ("duplicate", "same recipient as row 1 (ann@example.org)")
    assert reasons[4][0] == "invalid" and "not an email address" in reasons[4][1]
    assert reasons[5][0] == "invalid" and "header To" in reasons[5][1] and "CR" in reasons[5][1]


def test_status_json_matches_the_server(smtp_server: SmtpServer, tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 500)
    code, _, err = invoke(
        "send",
        str(recipients),
        str(template),
        "--transport",
        f"smtp://127.0.0.1:{smtp_server.port}",
        "--concurrency",
        "4",
        cwd=tmp_path,
    )
    assert code == 0, err
    found = status_json(tmp_path)
    assert set(STATES) | {"campaign", "total"} <= set(found)
    assert found["campaign"] == "recipients-template"
    assert found["sent"] == len(smtp_server.messages) == 500 == found["total"]
    assert smtp_server.stats.most_at_once <= 4
    # Running it again sends nothing more.
    code, out, _ = invoke(
        "send",
        str(recipients),
        str(template),
        "--transport",
        f"smtp://127.0.0.1:{smtp_server.port}",
        cwd=tmp_path,
    )
    assert code == 0 and "500 already in the ledger" in out
    assert len(smtp_server.messages) == 500


def test_resume_ingests_rows_added_since(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 5)
    args = ("send", str(recipients), str(template), "--transport", "maildir://out")
    assert invoke(*args, cwd=tmp_path)[0] == 0
    write_campaign(tmp_path, 8)
    code, out, _ = invoke(*args, cwd=tmp_path)
    assert code == 0 and "3 new rows ingested, 5 already in the ledger" in out
    assert len(list((tmp_path / "out" / "new").iterdir())) == 8


def test_changed_template_is_refused(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 2)
    args = ("send", str(recipients), str(template), "--transport", "null://")
    assert invoke(*args, cwd=tmp_path)[0] == 0
    template.write_text(TEMPLATE.replace("Hello", "Howdy"))
    code, _, err = invoke(*args, cwd=tmp_path)
    assert code == 2 and "--allow-template-change" in err
    assert invoke(*args, "--allow-template-change", cwd=tmp_path)[0] == 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--transport", "pigeon://coop"), "option --transport: unknown transport scheme 'pigeon'"),
        (("--transport", "null://", "--rate", "fast"), "option --rate: 'fast' is not a rate"),
        (("--transport", "null://", "--concurrency", "0"), "option --concurrency"),
        (("--transport", "null://", "--encoding", "klingon"), "option --encoding"),
        (("--transport", "null://", "--email-column", "mail"), "--email-column"),
    ],
)
def test_bad_arguments_exit_2_and_send_nothing(tmp_path: Path, extra: tuple[str, ...], needle: str) -> None:
    recipients, template = write_campaign(tmp_path, 2)
    code, _out, err = invoke("send", str(recipients), str(template), *extra, cwd=tmp_path)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mergekit.db").exists() or status_json(tmp_path)["sent"] == 0


def test_template_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 2, template=TEMPLATE + "{% endif %}\n")
    code, _, err = invoke("send", str(recipients), str(template), "--transport", "null://", cwd=tmp_path)
    assert code == 2 and f"{template}:6: template syntax error" in err


def test_ragged_csv_names_row_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("email,name\na@example.org,A\nb@example.org\n")
    (tmp_path / "t.txt").write_text(TEMPLATE)
    code, _, err = invoke("send", "r.csv", "t.txt", "--transport", "null://", cwd=tmp_path)
    assert code == 2
    assert err.startswith("Error: r.csv:3, row 2, column 'field 2': the row has 1 fields")


def test_dry_run_sends_nothing_and_marks_nothing(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 4)
    code, out, _ = invoke(
        "send", str(recipients), str(template), "--transport", "maildir://out", "--dry-run", cwd=tmp_path
    )
    assert code == 0
    assert "dry run: 4 rows would be sent, 0 invalid, 0 duplicate, 0 suppressed; nothing was sent" in out
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "mergekit.db").exists()


def test_preview_prints_the_wire_form(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 3)
    code, out, _ = invoke("preview", str(recipients), str(template), "--row", "2", cwd=tmp_path)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ">>> row 2 (user2@example.org)"
    assert lines[1:4] == [
        "From: Campaign <news@example.com>",
        "To: User 2 <user2@example.org>",
        "Subject: Hello User 2",
    ]
    assert re.match(r"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", lines[4])
    assert lines[-1] == "Hi User 2, your number is 00002."


def test_report_csv_and_status_exit_codes(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 3)
    invoke("send", str(recipients), str(template), "--transport", "null://", cwd=tmp_path)
    code, _out, _ = invoke("report", "-o", "report.csv", cwd=tmp_path)
    assert code == 0
    lines = (tmp_path / "report.csv").read_text().splitlines()
    assert lines[0].startswith('"row","key","email","state","attempts","last_code","last_text"')
    assert len(lines) == 4 and all(',"sent",' in line for line in lines[1:])
    assert invoke("status", cwd=tmp_path)[0] == 0
    code, _, err = invoke("status", "--campaign", "nope", cwd=tmp_path)
    assert code == 2 and "there is no campaign 'nope'" in err
    code, _, err = invoke("status", "--ledger", "missing.db", cwd=tmp_path)
    assert code == 2 and "ledger missing.db: no ledger at this path" in err


def test_deferred_rows_exit_3_with_a_hint(smtp_server: SmtpServer, tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 2)
    smtp_server.handler.defer["user1@example.org"] = "451 4.3.2 later"
    code, _, err = invoke(
        "send",
        str(recipients),
        str(template),
        "--transport",
        f"smtp://127.0.0.1:{smtp_server.port}",
        "--max-attempts",
        "1",
        cwd=tmp_path,
    )
    assert code == 3
    assert "1 rows deferred until" in err and "mergekit retry" in err
    del smtp_server.handler.defer["user1@example.org"]
    code, out, _ = invoke("retry", "--transport", f"smtp://127.0.0.1:{smtp_server.port}", cwd=tmp_path)
    assert code == 0 and "1 sent" in out


def test_server_down_exits_3_and_keeps_rows(tmp_path: Path) -> None:
    recipients, template = write_campaign(tmp_path, 2)
    code, _, err = invoke(
        "send", str(recipients), str(template), "--transport", f"smtp://127.0.0.1:{free_port()}", cwd=tmp_path
    )
    assert code == 3 and "cannot connect" in err
    assert status_json(tmp_path)["pending"] == 2


SECRET = "s3cr3t-Xq9-PASSWORD"


def test_secrets_never_leak(tmp_path: Path) -> None:
    server = SmtpServer(login=("mailer", SECRET)).start()
    try:
        recipients, template = write_campaign(tmp_path, 3)
        outputs = []
        good = f"smtp://mailer:{SECRET}@127.0.0.1:{server.port}"
        bad = f"smtp://mailer:{SECRET}-wrong@127.0.0.1:{server.port}"
        for args in [
            ("send", str(recipients), str(template), "--transport", bad, "--json"),
            ("--debug", "send", str(recipients), str(template), "--transport", bad),
            ("send", str(recipients), str(template), "--transport", good, "--json"),
            ("status", "--json"),
            ("report", "--format", "json"),
            ("--debug", "retry", "--transport", good),
        ]:
            result = run_cli(*args, cwd=tmp_path)
            outputs.append(result.stdout + result.stderr)
        assert "refused the login for 'mailer'" in outputs[0]
        assert len(server.messages) == 3
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        for text in [*outputs, files.decode("utf-8", "replace")]:
            assert SECRET not in text
        assert status_json(tmp_path)["sent"] == 3
    finally:
        server.stop()


def test_sigkill_mid_campaign_then_resume(tmp_path: Path) -> None:
    server = SmtpServer(data_delay=0.003).start()
    try:
        recipients, template = write_campaign(tmp_path, 1500)
        args = send_command(recipients, template, server.url, "--concurrency", "4", "--batch-size", "25")
        process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        signal_when_received(process, server, 300, signal.SIGKILL)
        process.wait()
        before = len(server.messages)
        assert 300 <= before < 1500
        after_kill = status_json(tmp_path)
        assert after_kill["unknown"] > 0
        assert after_kill["sent"] + after_kill["unknown"] + after_kill["pending"] == 1500
        resumed = subprocess.run([*args, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        final = json.loads(resumed.stdout)
        assert final["sent"] == 1500 and final["recovered_unknown"] == after_kill["unknown"]
        received = server.handler.by_recipient()
        assert set(received) == {f"user{i}@example.org" for i in range(1, 1501)}
        copies = {rcpt: msgs for rcpt, msgs in received.items() if len(msgs) > 1}
        assert len(copies) <= after_kill["unknown"]
        for msgs in copies.values():
            assert len({m.parsed()["Message-ID"] for m in msgs}) == 1
    finally:
        server.stop()
