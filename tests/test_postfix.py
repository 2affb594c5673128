"""Real Postfix as the receiving MTA, with its own rate limits: mergekit slows down and loses nothing.

A private Postfix instance (its own config, queue and data directories in a
temporary folder; smtpd on a free loopback port) delivers every message into
one Maildir through the ``virtual`` agent. anvil limits the client to
``CONNECTIONS`` connections at once and ``MESSAGES`` messages per
``TIME_UNIT``; the campaign asks for more. Postfix answers "421 4.7.0 Error:
too many connections" and "450 4.7.1 Error: too much mail"; mergekit must back
off, use fewer connections, lower its rate, and end with every row ``sent`` and
every recipient's message in the Maildir exactly once.

Needs root (Postfix's master runs as root and drops to ``mail_owner``), the
``postfix`` user and the ``postdrop`` group: ``.ci/run`` installs the package.
"""

from __future__ import annotations

import email
import grp
import json
import logging
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mergekit import SendOptions, report, send
from tests.helpers import write_campaign
from tests.smtpd import free_port

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
ROWS = 120
CONNECTIONS = 2  # smtpd_client_connection_count_limit
MESSAGES = 20  # smtpd_client_message_rate_limit, per TIME_UNIT
TIME_UNIT = 2  # anvil_rate_time_unit, seconds: the limit is MESSAGES / TIME_UNIT = 10 messages/s
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
showq     unix  n - n - - showq
postlog   unix-dgram n - n - 1 postlogd
"""


def why_postfix_cannot_run() -> str | None:
    if not os.path.exists(POSTFIX):
        return "Postfix is not installed (apt-get install postfix; .ci/run does it)"
    if os.geteuid() != 0:
        return "Postfix's master must start as root"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or postdrop group is missing (install the postfix package)"
    return None


@dataclass
class Postfix:
    root: Path
    port: int

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / "all"

    def delivered(self) -> list[Path]:
        return [
            p
            for sub in ("new", "cur")
            if (self.maildir / sub).is_dir()
            for p in (self.maildir / sub).iterdir()
        ]

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        # Postfix reports start-up errors to syslog only unless stderr is a terminal: `script` gives it one.
        command = " ".join([POSTFIX, "-c", str(self.root / "etc"), *args])
        return subprocess.run(
            ["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=60
        )


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    reason = why_postfix_cannot_run()
    if reason:
        pytest.skip(f"real Postfix test skipped: {reason}")
    # Not under pytest's tmp_path: Postfix's unprivileged processes must reach the Maildir.
    root = Path(tempfile.mkdtemp(prefix="mergekit-postfix-"))
    root.chmod(0o755)
    owner = pwd.getpwnam("postfix")
    for name in ("etc", "queue", "data", "mail"):
        (root / name).mkdir()
    for name in ("data", "mail"):
        os.chown(root / name, owner.pw_uid, owner.pw_gid)
    port = free_port()
    (root / "etc" / "main.cf").write_text(
        "\n".join(
            [
                "compatibility_level = 3.6",
                f"queue_directory = {root}/queue",
                f"data_directory = {root}/data",
                "mail_owner = postfix",
                "setgid_group = postdrop",
                "inet_interfaces = loopback-only",
                "inet_protocols = ipv4",
                "myhostname = mergekit-test.localdomain",
                "mydestination =",
                "mynetworks = 127.0.0.0/8",
                "smtpd_relay_restrictions = permit_mynetworks, reject",
                "alias_maps =",
                "alias_database =",
                "virtual_mailbox_domains = example.org",
                f"virtual_mailbox_base = {root}/mail",
                "virtual_mailbox_maps = static:all/",
                f"virtual_uid_maps = static:{owner.pw_uid}",
                f"virtual_gid_maps = static:{owner.pw_gid}",
                "smtpd_peername_lookup = no",
                "smtputf8_enable = no",
                f"maillog_file = {root}/maillog",
                f"maillog_file_prefixes = {root}",
                # The limits under test. Loopback clients are exempt by default ($mynetworks): not here.
                f"smtpd_client_connection_count_limit = {CONNECTIONS}",
                f"smtpd_client_message_rate_limit = {MESSAGES}",
                f"anvil_rate_time_unit = {TIME_UNIT}s",
                "smtpd_client_event_limit_exceptions =",
                "",
            ]
        )
    )
    (root / "etc" / "master.cf").write_text(MASTER_CF.format(port=port))
    started = Postfix(root, port)
    result = started.postfix("start")
    deadline = time.monotonic() + 20
    while "daemon started" not in started.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    if "daemon started" not in started.log():
        started.postfix("abort")
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"Postfix did not start: {result.stdout} {result.stderr} {started.log()}")
    try:
        yield started
    finally:
        started.postfix("stop")
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_throttling(postfix: Postfix, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    recipients, template = write_campaign(tmp_path, ROWS)
    ledger = str(tmp_path / "ledger.db")
    started = time.monotonic()
    result = send(
        recipients,
        template,
        transport=f"smtp://127.0.0.1:{postfix.port}",
        ledger_path=ledger,
        options=SendOptions(concurrency=4, batch_size=10, max_attempts=8, backoff_max=4.0),
    )
    elapsed = time.monotonic() - started
    _, rows = report(ledger_path=ledger)
    ledger_rows = list(rows)
    assert Counter(row.state for row in ledger_rows) == {"sent": ROWS}, result.run.counts

    deadline = time.monotonic() + 30
    while len(postfix.delivered()) < ROWS and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # anything more would be a duplicate on its way
    delivered = Counter()
    message_ids: dict[str, str] = {}
    for path in postfix.delivered():
        message = email.message_from_bytes(path.read_bytes())
        address = email.utils.parseaddr(message["To"])[1]
        delivered[address] += 1
        message_ids[address] = message["Message-ID"]
    assert delivered == Counter({f"user{i}@example.org": 1 for i in range(1, ROWS + 1)})
    assert {row.email: row.message_id for row in ledger_rows} == message_ids

    # What happened on the wire, from both sides.
    log = postfix.log()
    throttles = [r.getMessage() for r in caplog.records if "throttling" in r.getMessage()]
    fewer = [r.getMessage() for r in caplog.records if "refused another connection" in r.getMessage()]
    rates = [float(m) for m in re.findall(r"at most ([\d.]+) messages/s", "\n".join(throttles))]
    sent_at = sorted(row.updated_at for row in ledger_rows if row.updated_at)
    tail = sent_at[len(sent_at) // 2 :]
    settled = (len(tail) - 1) / (tail[-1] - tail[0]) if len(tail) > 1 and tail[-1] > tail[0] else None
    figures = {
        "limits": {
            "smtpd_client_connection_count_limit": CONNECTIONS,
            "smtpd_client_message_rate_limit": MESSAGES,
            "anvil_rate_time_unit": f"{TIME_UNIT}s",
        },
        "rows": ROWS,
        "sent": result.run.counts["sent"],
        "delivered_once": sum(1 for n in delivered.values() if n == 1),
        "lost": ROWS - len(delivered),
        "duplicates": sum(n - 1 for n in delivered.values()),
        "postfix_rate_limit_hits": log.count("Message delivery request rate limit exceeded"),
        "postfix_connection_limit_hits": log.count("Connection concurrency limit exceeded"),
        "replies_seen": sorted({m.split("(", 1)[1].split(")", 1)[0] for m in throttles + fewer}),
        "rate_cuts": rates,
        "connections_used_after_421": [int(m.rsplit(" ", 1)[1]) for m in fewer],
        "settled_rate_per_s_second_half": round(settled, 2) if settled else None,
        "attempts": dict(Counter(row.attempts for row in ledger_rows)),
        "elapsed_s": round(elapsed, 1),
    }
    print("\npostfix throttling:", json.dumps(figures))
    # It was throttled, and it slowed down below the server's limit of MESSAGES / TIME_UNIT.
    assert figures["postfix_rate_limit_hits"] > 0
    assert rates and rates[-1] < MESSAGES / TIME_UNIT
