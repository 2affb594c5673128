"""The core pipeline's figures for its closing note, from one run against a real aiosmtpd.

``python -m benchmarks.core_figures`` prints:

1. a 500-row campaign at ``--concurrency 4``: connections at once and opened,
   messages the server received, rows delivered more than once, and
   ``status --json`` beside the server's count;
2. a 1,500-row ``mergekit send`` SIGKILLed mid-campaign, then run again:
   recipients received, recipients with two copies, whether each such pair
   shares its Message-ID, and the unknown count ``status`` reported;
3. the messy spreadsheet CSV of ``tests/test_cli.py``: states, exit code, and
   whether any injected header reached the wire.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import send_command, signal_when_received, write_campaign
from tests.smtpd import SmtpServer
from tests.test_cli import MESSY_CSV, MESSY_TEMPLATE


def mergekit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mergekit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


def five_hundred(folder: Path) -> None:
    server = SmtpServer().start()
    try:
        recipients, template = write_campaign(folder, 500)
        sent = mergekit("send", str(recipients), str(template), "--transport", server.url,
                        "--concurrency", "4", cwd=folder)  # fmt: skip
        status = json.loads(mergekit("status", "--json", cwd=folder).stdout)
        received = server.handler.by_recipient()
        twice = sum(len(copies) > 1 for copies in received.values())
        print(f"500 rows, --concurrency 4: exit {sent.returncode}; connections at once "
              f"{server.stats.most_at_once}, opened {server.stats.opened}; server received "
              f"{len(server.messages)} messages for {len(received)} recipients, {twice} twice; "
              f"status --json sent={status['sent']} total={status['total']}")  # fmt: skip
    finally:
        server.stop()


def killed_and_resumed(folder: Path) -> None:
    server = SmtpServer(data_delay=0.003).start()
    try:
        recipients, template = write_campaign(folder, 1500)
        args = send_command(recipients, template, server.url, "--concurrency", "4", "--batch-size", "25")
        process = subprocess.Popen(args, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        signal_when_received(process, server, 400, signal.SIGKILL)
        process.wait()
        at_kill = len(server.messages)
        after_kill = json.loads(mergekit("status", "--json", cwd=folder).stdout)
        resumed = subprocess.run([*args, "--json"], cwd=folder, capture_output=True, text=True, timeout=300)
        final = json.loads(resumed.stdout)
        received = server.handler.by_recipient()
        copies = {rcpt: msgs for rcpt, msgs in received.items() if len(msgs) > 1}
        same_id = all(len({m.message_id for m in msgs}) == 1 for msgs in copies.values())
        print(f"SIGKILL after {at_kill} of 1500 received: status then showed unknown={after_kill['unknown']}"
              f" sent={after_kill['sent']} pending={after_kill['pending']}; resumed: exit "
              f"{resumed.returncode}, sent={final['sent']}, recovered_unknown={final['recovered_unknown']}; "
              f"recipients received {len(received)}/1500, with two copies {len(copies)}, "
              f"every copy pair shares its Message-ID: {same_id}")  # fmt: skip
    finally:
        server.stop()


def messy(folder: Path) -> None:
    server = SmtpServer().start()
    try:
        (folder / "r.csv").write_bytes(MESSY_CSV.encode("utf-8"))
        (folder / "t.txt").write_text(MESSY_TEMPLATE)
        result = mergekit("send", "r.csv", "t.txt", "--transport", server.url, "--json", cwd=folder)
        found = json.loads(result.stdout)
        injected = any(b"victim" in m.data for m in server.messages)
        states = {k: found[k] for k in ("sent", "invalid", "duplicate", "total")}
        print(f"messy CSV: exit {result.returncode}, {states}, header injection on the wire: {injected}")
    finally:
        server.stop()


def main() -> None:
    for step in (five_hundred, killed_and_resumed, messy):
        with tempfile.TemporaryDirectory() as scratch:
            step(Path(scratch))


if __name__ == "__main__":
    main()
