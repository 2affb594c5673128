"""The world the stateful test acts on: a campaign folder, a real SMTP server steered per
recipient, and ``mergekit`` run as a user runs it (in-process through click, or as a
subprocess that the server SIGKILLs at a chosen message).

Recipients are judged by their canonical mailbox, computed here independently of
mergekit: Unicode NFC, the domain through IDNA UTS-46 to its ASCII form, all lower-cased
(the rule of issue 13, item 1), and by what the server received per envelope recipient.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import idna
from click.testing import CliRunner
from hypothesis import strategies as st

from mergekit.cli import main
from tests.faultsmtpd import Faults, FaultServer

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60.0  # seconds a killed-or-not subprocess send may take
TRANSIENT = "451 4.2.0 mailbox busy, try again later"
PERMANENT = "550 5.1.1 no such user here"
OUTCOMES = ("sent", "transient", "permanent", "unknown")


def canonical(address: str) -> str:
    """The mailbox ``address`` names: stripped, NFC, domain as its IDNA A-label, lower-cased."""
    local, _, domain = unicodedata.normalize("NFC", address.strip()).rpartition("@")
    with contextlib.suppress(idna.IDNAError):  # not a domain at all: the row is invalid, keep its text
        domain = idna.encode(domain, uts46=True).decode("ascii")
    return f"{local}@{domain}".lower()


# Mailboxes the CSVs draw from: ASCII ones, and one whose spellings differ in more than ASCII
# case and whitespace.
ASCII_PEOPLE = ("ann@example.org", "bob@example.org", "cy@example.net")  # few: rules meet the same people
UNICODE_PERSON = "a@bücher.example"
UNICODE_SPELLINGS = (
    "a@bücher.example",  # NFC
    "a@xn--bcher-kva.example",  # the A-label
    unicodedata.normalize("NFD", "a@bücher.example"),  # u + combining diaeresis
    "a@\uff42ücher.example",  # a full-width b
)


def people() -> tuple[str, ...]:
    return (*ASCII_PEOPLE, UNICODE_PERSON)


@st.composite
def spelling(draw: st.DrawFn, person: str) -> str:
    """One way a CSV or suppression file writes ``person``: any ASCII case, padded with blanks,
    and for the Unicode person any of its Unicode forms."""
    base = draw(st.sampled_from(UNICODE_SPELLINGS)) if person == UNICODE_PERSON else person
    upper = draw(st.lists(st.booleans(), min_size=len(base), max_size=len(base)))
    cased = "".join(c.upper() if up and c.isascii() else c for c, up in zip(base, upper, strict=True))
    pad = st.sampled_from(["", " ", "  ", "\t"])
    return draw(pad) + cased + draw(pad)


class CanonicalMap(dict[str, Any]):
    """The fault server's per-recipient faults keyed by canonical mailbox, so a fault set for
    a person meets whatever spelling the client put in RCPT TO."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(canonical(key), default)


@dataclass
class Run:
    """What one command did: exit code, output, and whether the server's hook killed it."""

    code: int
    stdout: str
    stderr: str
    killed: bool = False


class World:
    """A campaign folder, its ledger and the SMTP server, for one example of the machine."""

    def __init__(self, folder: Path, ledger: str) -> None:
        self.folder = folder
        self.ledger = ledger
        self.csv = folder / "people.csv"
        self.template = folder / "letter.txt"
        self.suppress_file = folder / "suppress.txt"
        self.suppress_file.write_text("", encoding="utf-8")
        faults = Faults()
        faults.drop, faults.permanent = CanonicalMap(), CanonicalMap()
        self.server = FaultServer(faults).start()

    def stop(self) -> None:
        self.server.stop()

    def steer(self, person: str, outcome: str) -> None:
        """Make the server answer ``person``'s messages with ``outcome`` from now on."""
        key = canonical(person)
        faults = self.server.faults
        faults.drop.pop(key, None)
        faults.permanent.pop(key, None)
        if outcome == "transient":
            faults.permanent[key] = ("rcpt", TRANSIENT)
        elif outcome == "permanent":
            faults.permanent[key] = ("rcpt", PERMANENT)
        elif outcome == "unknown":  # the server takes the message, then drops the connection
            faults.drop[key] = "after-data"

    def write_csv(self, rows: Sequence[tuple[str, str]]) -> None:
        lines = ["email,name"] + [f'"{address}","{name}"' for address, name in rows]
        self.csv.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def write_template(self, version: int) -> None:
        self.template.write_text(
            "From: News <news@example.com>\nTo: {{ name }} <{{ email }}>\n"
            f"Subject: Letter {version}\n\nHello {{{{ name }}}}, this is version {version}.\n",
            encoding="utf-8",
        )

    def received(self) -> list[tuple[str, str]]:
        """``(canonical recipient, Message-ID)`` of every copy the server took, in order."""
        with self.server.handler.lock:
            messages = list(self.server.messages)
        return [(canonical(rcpt), m.message_id) for m in messages for rcpt in m.rcpt_tos]

    def _transport(self) -> str:
        return f"smtp://127.0.0.1:{self.server.port}?starttls=never&timeout=10"

    def ledger_spelled(self, how: str) -> str:
        """The ledger's path as typed another way: through a symlink, a hard link (removed again
        by :meth:`unlink_spellings`: mergekit refuses a ledger file with two names), or ``dir/../``."""
        if how == "hardlink":
            link = self.folder / "hard.db"
            link.hardlink_to(self.ledger)
            return str(link)
        if how == "symlink":
            link = self.folder / "link.db"
            if not link.exists():
                link.symlink_to(self.ledger)
            return str(link)
        if how == "dotdot":
            (self.folder / "sub").mkdir(exist_ok=True)
            return str(self.folder / "sub" / ".." / Path(self.ledger).name)
        return self.ledger

    def unlink_spellings(self) -> None:
        """Remove the hard link :meth:`ledger_spelled` made, if any."""
        (self.folder / "hard.db").unlink(missing_ok=True)

    def send_args(self, allow_template_change: bool, ledger: str | None = None) -> list[str]:
        return [
            "send", str(self.csv), str(self.template), "--transport", self._transport(),
            "--ledger", ledger or self.ledger, "--suppress", str(self.suppress_file),
            "--max-attempts", "1", "--batch-size", "2", "--concurrency", "2",
            *(["--allow-template-change"] if allow_template_change else []),
        ]  # fmt: skip

    def retry_args(self, include_failed: bool = False) -> list[str]:
        return ["retry", "--ledger", self.ledger, "--max-attempts", "1", "--batch-size", "2",
                *(["--failed"] if include_failed else [])]  # fmt: skip

    def cli(self, *args: str) -> Run:
        """``mergekit ARGS`` in this process, through click as the console script runs it."""
        result = CliRunner().invoke(main, list(args), catch_exceptions=True)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"mergekit {args[0]} raised {result.exception!r}:\n{result.stderr}")
        assert "Traceback" not in result.stderr, result.stderr
        return Run(result.exit_code, result.stdout, result.stderr)

    def send_killed_at(self, args: Sequence[str], stage: str, nth: int) -> Run:
        """``mergekit send`` as a subprocess, SIGKILLed when the server reaches ``stage``
        (``during-data`` or ``after-data``) of the ``nth`` message of this run, if it does."""
        target = len(self.server.messages) + nth
        holder: list[subprocess.Popen[str]] = []
        killed: list[bool] = []

        def hook(at: str, number: int) -> None:
            if at == stage and number >= target and holder and not killed:
                killed.append(True)
                os.kill(holder[0].pid, signal.SIGKILL)

        process = subprocess.Popen(
            [sys.executable, "-m", "mergekit", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        holder.append(process)
        self.server.faults.on_data = hook
        try:
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
        finally:
            self.server.faults.on_data = None
            if process.poll() is None:
                process.kill()
                process.wait()
        if not killed:
            assert "Traceback" not in stderr, stderr
        return Run(process.returncode, stdout, stderr, killed=bool(killed))

    def report(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(
            self.cli("report", "--ledger", self.ledger, "--format", "json").stdout
        )
        return rows

    def status(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.cli("status", "--ledger", self.ledger, "--json").stdout)
        return found
