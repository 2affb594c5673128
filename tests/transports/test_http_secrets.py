"""Secrets (issue 13): a server that quotes the request's credentials back never gets them stored.

A proxy or provider that answers a 400 or a 503 with the request's
``Authorization`` header (or Postmark's token header, SES's session token) in its
body, written as is, JSON-escaped, URL-encoded, HTML-escaped or base64 at each
byte alignment. The keys hold characters each encoding changes. Judged by
looking for every encoding of every key, with a decoder of our own (not the
scrubber's tables), in the ledger's bytes, ``report --format csv|json``,
``status --json`` and the run's stdout and stderr with ``--debug`` logs.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus, urlencode

import pytest
from click.testing import CliRunner

import mergekit
from mergekit.cli import main
from tests.conftest import run_cli
from tests.smtpd import SmtpServer
from tests.transports.api_campaign import ENV, make_campaign, url_for
from tests.transports.fakeapi import FakeApi

# Keys with what each encoding rewrites: quote, slash, plus, percent, space, backslash, "&=:;<>".
NASTY = '/"+% &=:;<>\\'
KEYS = {
    "POSTMARK_SERVER_TOKEN": f"pm-{NASTY}-SECRET-1111",
    "RESEND_API_KEY": f"re_{NASTY}_SECRET_2222",
    "MJ_APIKEY_PRIVATE": f"mj-{NASTY}-SECRET-4444",
    "SENDGRID_API_KEY": f"SG.{NASTY}.SECRET.5555",
    "MAILGUN_API_KEY": f"key-{NASTY}-SECRET-6666",
    "AWS_SECRET_ACCESS_KEY": f"aws-{NASTY}-SECRET-8888",
    "AWS_SESSION_TOKEN": f"FwoG{NASTY}SESSION-SECRET-7777",
    "NYLAS_API_KEY": f"nyk_{NASTY}_SECRET_9999",
    "MERGEKIT_WEBHOOK_SECRET": f"whsec-{NASTY}-SECRET-0000",
}
# The request headers that carry credentials, as a proxy would quote the one it refused.
CREDENTIAL_HEADERS = ("authorization", "x-postmark-server-token", "x-amz-security-token")


def _quoted(headers: dict[str, str]) -> str:
    return "\n".join(f"{name}: {headers[name]}" for name in CREDENTIAL_HEADERS if name in headers)


def _picked(headers: dict[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in CREDENTIAL_HEADERS if name in headers}


def _lower_escapes(headers: dict[str, str]) -> str:
    """A query string whose escapes are lower-case (``%2f``), as some encoders write them."""
    return "&".join(
        f"{k}={re.sub(r'%[0-9A-F]{2}', lambda m: m.group().lower(), quote(v, safe=''))}"
        for k, v in _picked(headers).items()
    )


def _straddling(headers: dict[str, str]) -> str:
    """The quoted headers placed so the first credential runs across the 300-character cut of an
    error text (ERROR_TEXT_LIMIT): scrubbing after the cut would leave its first half."""
    quoted = _quoted(headers)
    value = next((headers[name] for name in CREDENTIAL_HEADERS if name in headers), "")
    start = quoted.find(value.split(" ")[-1]) if value else 0
    return "." * max(0, 290 - len("rejected ") - start) + " " + quoted


ECHOES: dict[str, Callable[[dict[str, str]], str]] = {
    "straddling the cut": _straddling,
    "raw": lambda h: "rejected request headers:\n" + _quoted(h),
    "json": lambda h: json.dumps({"detail": "rejected", "headers": _picked(h)}),
    "json-message": lambda h: json.dumps({"message": "rejected " + _quoted(h)}),
    "url": lambda h: "see https://proxy.invalid/debug?" + urlencode(_picked(h)),
    "url-lower": lambda h: "see ?" + _lower_escapes(h),
    "html": lambda h: "<pre>" + html.escape(_quoted(h)) + "</pre>",
    "base64+0": lambda h: base64.b64encode(_quoted(h).encode()).decode(),
    "base64+1": lambda h: base64.b64encode(b"x" + _quoted(h).encode()).decode(),
    "base64+2": lambda h: base64.urlsafe_b64encode(b"xy" + _quoted(h).encode()).decode(),
}  # fmt: skip
STATUSES = (400, 503)


def _json_unescaped(text: str) -> str:
    return re.sub(
        r"\\u([0-9a-fA-F]{4})|\\(.)",
        lambda m: chr(int(m.group(1), 16)) if m.group(1) else {"n": "\n", "t": "\t"}.get(m[2], m[2]),
        text,
    )


def encodings_found(blob: str, secret: str) -> list[str]:
    """Each way ``secret`` can be read out of ``blob``: decoded here, independently of mergekit."""
    views = {
        "as is": blob,
        "url-decoded": unquote_plus(blob),
        "url-decoded (+ kept)": unquote(blob),
        "json-unescaped": _json_unescaped(blob),
        "html-unescaped": html.unescape(blob),
    }
    found = [name for name, view in views.items() if secret in view]
    # A cut must not leave part of a key either: its windows found in no other key here.
    windows = {
        window
        for window in (secret[i : i + 12] for i in range(len(secret) - 11))
        if not any(window in other for other in KEYS.values() if other != secret)
    }
    found += [f"part {w!r}" for w in windows for name, view in views.items() if w in view][:1]
    if secret.encode().hex() in blob.lower():
        found.append("hex")
    wanted = secret.encode()
    for view in views.values():
        for run in set(re.findall(r"[A-Za-z0-9+/_-]{8,}", view)):
            for offset in range(4):
                chunk = run[offset:]
                chunk = chunk[: len(chunk) - 1] if len(chunk) % 4 == 1 else chunk
                chunk += "=" * (-len(chunk) % 4)
                for decode in (base64.b64decode, base64.urlsafe_b64decode):
                    try:
                        decoded = decode(chunk)
                    except (binascii.Error, ValueError):
                        continue
                    if wanted in decoded:
                        found.append(f"base64 {run[:24]}…")
    return found


PROVIDERS = ["postmark", "resend", "sendgrid", "mailgun", "mailjet", "ses", "nylas", "webhook"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_echoed_credentials_never_reach_ledger_report_json_or_logs(
    provider: str, api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for status in STATUSES:
        for echo in ECHOES.values():
            api.echo(status, lambda headers, echo=echo: echo(headers).encode())  # type: ignore[misc]
    rows = len(STATUSES) * len(ECHOES)
    campaign = make_campaign(tmp_path, rows)
    env = {**ENV, **KEYS, "PYTHONPATH": str(Path(mergekit.__file__).resolve().parents[1])}
    sent = run_cli(
        "--debug", "send", str(campaign.csv), str(campaign.template),
        "--transport", url_for(provider, api), "--ledger", str(campaign.ledger),
        "--batch-size", "1", "--concurrency", "1", "--max-attempts", "1", "--json",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert sent.returncode == 3, sent.stderr[-2000:]  # deferred rows remain
    assert api.requests[provider] == rows  # every echo went out and came back

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    outputs = {"send stdout": sent.stdout, "send stderr (--debug logs)": sent.stderr}
    for label, args in {
        "report csv": ["report", "--ledger", str(campaign.ledger)],
        "report json": ["report", "--ledger", str(campaign.ledger), "--format", "json"],
        "status --json": ["status", "--ledger", str(campaign.ledger), "--json"],
    }.items():
        result = runner.invoke(main, args)
        assert result.exit_code in {0, 3}, result.output  # status: 3 while rows are deferred
        outputs[label] = result.output
    stored = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("ledger.db*")))
    outputs["ledger files"] = stored.decode("utf-8", "replace")

    # Every row's reply is in the ledger: the echoes were read, not lost.
    records = json.loads(outputs["report json"])
    assert sorted(r["last_code"] for r in records) == sorted(s for s in STATUSES for _ in ECHOES)
    assert {r["state"] for r in records} == {"failed", "deferred"}

    leaks = {
        (where, variable, how)
        for where, blob in outputs.items()
        for variable, secret in KEYS.items()
        for how in encodings_found(blob, secret)
    }
    assert not leaks, sorted(leaks)[:10]


def test_smtp_password_quoted_in_a_refusal_is_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SMTP transport's password goes through the same scrubber: a real server whose refusal
    quotes AUTH PLAIN's base64 and the password URL-encoded."""
    password = f"pw-{NASTY}-SECRET-3333"
    plain = base64.b64encode(f"\0mailer\0{password}".encode()).decode()
    server = SmtpServer(login=("mailer", password)).start()
    try:
        campaign = make_campaign(tmp_path, 2)
        for row in campaign.rows:
            server.handler.refuse[row["email"]] = f"550 you said AUTH PLAIN {plain} pw={quote(password)}"
        monkeypatch.setenv("MERGEKIT_SMTP_PASSWORD", password)
        mergekit.send(
            campaign.csv, campaign.template, ledger_path=str(campaign.ledger),
            transport=f"smtp://mailer@127.0.0.1:{server.port}?starttls=never",
        )  # fmt: skip
    finally:
        server.stop()
    records = json.loads(
        CliRunner().invoke(main, ["report", "--ledger", str(campaign.ledger), "--format", "json"]).output
    )
    assert [r["last_code"] for r in records] == [550, 550]
    assert all("you said AUTH PLAIN ***" in r["last_text"] for r in records), records[0]["last_text"]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*")).decode("utf-8", "replace")
    assert not encodings_found(stored + json.dumps(records), password)
