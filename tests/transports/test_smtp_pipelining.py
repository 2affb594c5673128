"""SMTP PIPELINING (RFC 2920): one round trip per message, and the same outcomes as the classic dialogue.

A scripted server (in the test's own event loop) says exactly what each
command gets, can hold its replies until DATA as RFC 2920 allows (so a client
that waits for each reply is caught), and can drop the connection at a chosen
point. The aiosmtpd server of the other tests advertises PIPELINING too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mergekit.render import Template, TemplateSource
from mergekit.transports import transport_from_url
from mergekit.transports.base import Message, Outcome, Status
from tests.helpers import TEMPLATE
from tests.smtpd import SmtpServer

HOLD_FLUSH_SECONDS = 0.1  # a holding server sends what it holds after this much silence


def messages(count: int, *, extra_rcpt: dict[int, str] | None = None) -> list[Message]:
    """``count`` rendered messages to user1… (1-based); ``extra_rcpt`` adds a Cc to message N."""
    extra_rcpt = extra_rcpt or {}
    built = []
    for i in range(1, count + 1):
        source = TEMPLATE
        if i in extra_rcpt:
            source = source.replace("Subject:", f"Cc: {extra_rcpt[i]}\nSubject:")
        template = Template(TemplateSource.parse(source), campaign="pipe")
        data = {"email": f"user{i}@example.org", "name": f"User {i}", "number": str(i)}
        built.append(template.render(data, row=i, key=data["email"]))
    return built


@dataclass
class Script:
    """What the scripted server does; transactions (MAIL commands) are numbered from 1."""

    pipelining: bool = True
    hold: bool = False  # hold replies until DATA (or HOLD_FLUSH_SECONDS of silence)
    mail_reply: dict[int, str] = field(default_factory=dict)
    rcpt_reply: dict[str, str] = field(default_factory=dict)
    data_reply: dict[int, str] = field(default_factory=dict)  # reply to the DATA command
    data_despite_no_rcpt: bool = False  # answer 354 even when every RCPT was refused
    drop_on_mail: set[int] = field(default_factory=set)  # close, unanswered, on MAIL number N
    drop_after_content: set[int] = field(default_factory=set)  # close, unanswered, after N's data
    end_reply: dict[int, str] = field(default_factory=dict)  # reply to N's end of data (content taken)
    after_ehlo: str | None = None  # a line no command asked for, in the same write as the EHLO reply
    # what the server saw
    accepted: list[bytes] = field(default_factory=list)
    connections: int = 0
    transactions: int = 0
    timer_flushes: int = 0
    grouped_reads: int = 0  # reads that carried more than one command: the client pipelined


class ScriptedSession(asyncio.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = bytearray()
        self.held: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self.content: list[bytes] | None = None
        self.number = 0
        self.good_rcpts = 0
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.script.connections += 1
        self.transport.write(b"220 scripted ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        commands = 0
        while not self.closed:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            if self.content is not None:
                if line == b".":
                    self.end_of_data(b"\r\n".join(self.content) + b"\r\n")
                else:
                    self.content.append(line[1:] if line.startswith(b".") else line)
                continue
            commands += 1
            self.command(line.decode())
        if commands > 1:
            self.script.grouped_reads += 1

    def reply(self, text: str, *, held: bool = False) -> None:
        if held and self.script.hold:
            self.held.append(text)
            if self.timer is None:
                self.timer = asyncio.get_running_loop().call_later(HOLD_FLUSH_SECONDS, self.timed_flush)
            return
        self.held.append(text)
        self.flush()

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held and not self.closed:
            self.transport.write("".join(f"{text}\r\n" for text in self.held).encode())
        self.held = []

    def timed_flush(self) -> None:
        self.timer = None
        self.script.timer_flushes += 1
        self.flush()

    def drop(self) -> None:
        self.closed = True
        self.transport.abort()

    def command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
        script = self.script
        if verb == "EHLO":
            extensions = ["250-scripted", "250-8BITMIME"] + (["250-PIPELINING"] if script.pipelining else [])
            extra = [script.after_ehlo] if script.after_ehlo else []
            self.reply("\r\n".join([*extensions, "250 HELP", *extra]))
        elif verb == "MAIL":
            script.transactions += 1
            self.number, self.good_rcpts = script.transactions, 0
            if self.number in script.drop_on_mail:
                self.drop()
                return
            self.reply(script.mail_reply.get(self.number, "250 2.1.0 Ok"), held=True)
        elif verb == "RCPT":
            address = line.partition("<")[2].rstrip(">")
            answer = script.rcpt_reply.get(address, "250 2.1.5 Ok")
            self.good_rcpts += answer.startswith("250")
            self.reply(answer, held=True)
        elif verb == "DATA":
            answer = script.data_reply.get(self.number)
            if answer is None:
                ok = self.good_rcpts or script.data_despite_no_rcpt
                answer = "354 End data with <CR><LF>.<CR><LF>" if ok else "554 5.5.1 No valid recipients"
            if answer.startswith("354"):
                self.content = []
            self.reply(answer)
        elif verb == "RSET":
            self.good_rcpts = 0
            self.reply("250 2.0.0 Ok", held=True)
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.close()
        else:
            self.reply("250 Ok" if verb in {"NOOP", "HELO"} else "502 5.5.2 Error: command not recognized")

    def end_of_data(self, content: bytes) -> None:
        self.content = None
        if self.number in self.script.drop_after_content:
            self.drop()
            return
        if self.good_rcpts:
            self.script.accepted.append(content)
            answer = self.script.end_reply.get(self.number, f"250 2.0.0 Ok: queued as Q{self.number}")
            self.reply(answer, held=True)
        else:
            self.reply("554 5.5.1 No valid recipients", held=True)


def run_with_server(script: Script, body: Callable[[int], Awaitable[list[Outcome]]]) -> list[Outcome]:
    async def main() -> list[Outcome]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ScriptedSession(script), "127.0.0.1", 0)
        try:
            return await body(server.sockets[0].getsockname()[1])
        finally:
            server.close()

    return asyncio.run(main())


def send(script: Script, batch: list[Message], query: str = "") -> list[Outcome]:
    async def body(port: int) -> list[Outcome]:
        transport = transport_from_url(f"smtp://127.0.0.1:{port}{query}")
        async with transport:
            return await transport.send_batch(batch)

    return run_with_server(script, body)


def statuses(outcomes: list[Outcome]) -> list[tuple[Status, int | None]]:
    return [(outcome.status, outcome.code) for outcome in outcomes]


def subjects(script: Script) -> list[str]:
    return [
        line.split(b": ", 1)[1].decode()
        for content in script.accepted
        for line in content.split(b"\r\n")
        if line.startswith(b"Subject: ")
    ]


SENT = (Status.SENT, 250)


def test_one_round_trip_per_message() -> None:
    # The server holds every reply until DATA: a client waiting for each reply
    # would only move on each HOLD_FLUSH_SECONDS; a pipelining one never waits
    # except for the very last end-of-data reply.
    script = Script(hold=True)
    outcomes = send(script, messages(10))
    assert statuses(outcomes) == [SENT] * 10
    assert [o.provider_id for o in outcomes] == [f"Q{i}" for i in range(1, 11)]
    assert script.timer_flushes == 1
    assert subjects(script) == [f"Hello User {i}" for i in range(1, 11)]


def test_pipelining_false_keeps_the_classic_dialogue() -> None:
    script = Script()
    outcomes = send(script, messages(4), "?pipelining=false")
    assert statuses(outcomes) == [SENT] * 4
    assert script.grouped_reads == 0


def test_server_without_pipelining_gets_the_classic_dialogue() -> None:
    script = Script(pipelining=False)
    outcomes = send(script, messages(4))
    assert statuses(outcomes) == [SENT] * 4
    assert script.grouped_reads == 0
    assert len(script.accepted) == 4


def test_commands_are_grouped_when_advertised() -> None:
    script = Script()
    send(script, messages(4))
    assert script.grouped_reads >= 4


def test_rcpt_550_for_one_of_several_in_flight() -> None:
    script = Script(
        hold=True, rcpt_reply={"user3@example.org": "550 5.1.1 <user3@example.org>: no such user"}
    )
    outcomes = send(script, messages(5))
    assert statuses(outcomes) == [SENT, SENT, (Status.PERMANENT, 550), SENT, SENT]
    assert "no such user" in outcomes[2].text
    assert subjects(script) == ["Hello User 1", "Hello User 2", "Hello User 4", "Hello User 5"]


def test_one_recipient_of_two_refused_still_sends_and_says_so() -> None:
    script = Script(rcpt_reply={"cc@example.org": "550 5.1.1 unknown"})
    outcomes = send(script, messages(3, extra_rcpt={2: "cc@example.org"}))
    assert statuses(outcomes) == [SENT] * 3
    assert "refused: cc@example.org 550" in outcomes[1].text


def test_every_recipient_refused_with_a_transient_reply_is_transient() -> None:
    script = Script(rcpt_reply={"user2@example.org": "451 4.7.1 greylisted"})
    outcomes = send(script, messages(3))
    assert statuses(outcomes) == [SENT, (Status.TRANSIENT, 451), SENT]


def test_354_despite_no_recipient_gets_a_lone_dot() -> None:
    script = Script(rcpt_reply={"user2@example.org": "550 5.1.1 unknown"}, data_despite_no_rcpt=True)
    outcomes = send(script, messages(3))
    assert statuses(outcomes) == [SENT, (Status.PERMANENT, 550), SENT]
    assert subjects(script) == ["Hello User 1", "Hello User 3"]


def test_data_451_for_one_message_in_flight() -> None:
    script = Script(hold=True, data_reply={2: "451 4.3.0 try again later"})
    outcomes = send(script, messages(4))
    assert statuses(outcomes) == [SENT, (Status.TRANSIENT, 451), SENT, SENT]
    assert subjects(script) == ["Hello User 1", "Hello User 3", "Hello User 4"]


def test_mail_refused_fails_that_message_only() -> None:
    script = Script(mail_reply={1: "553 5.7.1 sender rejected"})
    outcomes = send(script, messages(3))
    assert statuses(outcomes) == [(Status.PERMANENT, 553), SENT, SENT]


def test_connection_drop_after_the_data_is_unknown_and_the_next_in_flight_transient() -> None:
    # Message 3's content went out and no reply came back: it may have been taken.
    # Message 4's commands were in the same write but its content never left.
    script = Script(drop_after_content={3})
    outcomes = send(script, messages(6))
    assert [o.status for o in outcomes] == [
        Status.SENT,
        Status.SENT,
        Status.UNKNOWN,
        Status.TRANSIENT,
        Status.SENT,
        Status.SENT,
    ]
    assert "after the data" in outcomes[2].text and "before the data" in outcomes[3].text
    assert script.connections == 2
    assert subjects(script) == ["Hello User 1", "Hello User 2", "Hello User 5", "Hello User 6"]


def test_connection_drop_before_the_data_is_transient() -> None:
    script = Script(drop_on_mail={2})
    outcomes = send(script, messages(4))
    assert [o.status for o in outcomes] == [Status.SENT, Status.TRANSIENT, Status.SENT, Status.SENT]
    assert subjects(script) == ["Hello User 1", "Hello User 3", "Hello User 4"]


def test_421_closes_the_connection_and_the_rest_go_on_a_new_one() -> None:
    script = Script(mail_reply={2: "421 4.3.2 shutting down"})
    outcomes = send(script, messages(4))
    assert statuses(outcomes) == [SENT, (Status.TRANSIENT, 421), SENT, SENT]
    assert script.connections == 2


@pytest.mark.parametrize("pipelining", [True, False])
def test_aiosmtpd_refusals_map_alike_with_and_without_pipelining(
    smtp_server: SmtpServer, pipelining: bool
) -> None:
    smtp_server.handler.pipelining = pipelining
    smtp_server.handler.refuse["user2@example.org"] = "550 5.1.1 no such user"
    smtp_server.handler.defer["user4@example.org"] = "451 4.7.1 later"
    smtp_server.handler.defer_data_times = 1

    async def main() -> list[Outcome]:
        transport = transport_from_url(f"smtp://127.0.0.1:{smtp_server.port}")
        async with transport:
            return await transport.send_batch(messages(5))

    outcomes = asyncio.run(main())
    assert statuses(outcomes) == [
        (Status.TRANSIENT, 451),  # the end-of-data reply of the first message
        (Status.PERMANENT, 550),
        SENT,
        (Status.TRANSIENT, 451),
        SENT,
    ]
    assert smtp_server.stats.opened == 1


def test_an_unsafe_envelope_address_is_refused_not_sent() -> None:
    import dataclasses

    batch = messages(3)
    batch[1] = dataclasses.replace(batch[1], envelope_to=("user2@example.org>\r\nRCPT TO:<x@example.net",))
    script = Script()
    outcomes = send(script, batch)
    assert statuses(outcomes) == [SENT, (Status.PERMANENT, None), SENT]
    assert subjects(script) == ["Hello User 1", "Hello User 3"]


DIALOGUES = pytest.mark.parametrize("query", ["", "?pipelining=false"], ids=["pipelined", "classic"])
DROPPED = (Status.TRANSIENT, None)


@DIALOGUES
@pytest.mark.parametrize(
    "reply",
    [
        "250 2.0.0 Ok",  # a completion where DATA must get 354 or a refusal
        "354 2.0.0 go ahead\r\n354 2.0.0 again",  # one reply too many
        "354-2.0.0 go\r\n250 2.0.0 ahead",  # lines of one reply with different codes
        "360 2.0.0 go ahead",  # a code RFC 5321 4.2 does not allow (second digit 6)
    ],
)
def test_a_reply_that_cannot_answer_data_drops_the_connection(query: str, reply: str) -> None:
    # Message 2 is out of step: no 2xx becomes ``failed`` and no content follows; the rest
    # go on a new connection.
    script = Script(data_reply={2: reply})
    outcomes = send(script, messages(4), query)
    assert statuses(outcomes) == [SENT, DROPPED, SENT, SENT]
    assert "before the data" in outcomes[1].text and "out of step" in outcomes[1].text
    assert subjects(script) == ["Hello User 1", "Hello User 3", "Hello User 4"]
    assert script.connections == 2


@DIALOGUES
def test_a_mail_answered_354_is_out_of_step(query: str) -> None:
    script = Script(mail_reply={1: "354 2.0.0 go ahead"})
    outcomes = send(script, messages(2), query)
    assert statuses(outcomes) == [DROPPED, SENT]
    assert "cannot answer MAIL" in outcomes[0].text


@DIALOGUES
def test_an_end_of_data_reply_out_of_step_is_unknown(query: str) -> None:
    # The server took message 2; its reply does not fit: maybe sent, so ``unknown``, never sent or
    # failed. Pipelined, message 3's commands went out with message 2's content: transient.
    script = Script(end_reply={2: "354 2.0.0 go ahead"})
    outcomes = send(script, messages(3), query)
    third = Status.SENT if query else Status.TRANSIENT
    assert [o.status for o in outcomes] == [Status.SENT, Status.UNKNOWN, third]
    assert "after the data" in outcomes[1].text and "cannot answer the end of the data" in outcomes[1].text
    assert subjects(script) == ["Hello User 1", "Hello User 2", "Hello User 3"][: 3 if query else 2]


@DIALOGUES
def test_a_line_left_after_the_ehlo_reply_is_never_read_as_a_reply(query: str) -> None:
    # aiosmtplib leaves it in its buffer, where it would answer MAIL: the reader drops the connection.
    script = Script(after_ehlo="250 2.0.0 unsolicited")
    outcomes = send(script, messages(2), query)
    assert statuses(outcomes) == [DROPPED, DROPPED]
    assert all("answers no command" in o.text for o in outcomes)
    assert script.accepted == [] and script.transactions == 0
