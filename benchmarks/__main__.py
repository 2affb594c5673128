"""``python -m benchmarks``: every benchmark of issue 6 in one run, written outside the repository.

1. SMTP into Postfix's ``smtp-sink``, N rows of ~1.2 KB: ``smtp-source -s 16 -d``
   (C; ``-d`` keeps each session's connection for the next message), a plain
   aiosmtplib loop on pre-rendered bytes (16 connections; asyncio, and uvloop),
   ``mailmerge`` (its CLI, one connection per message) and ``mergekit send``
   (the whole pipeline: CSV, render, SQLite ledger, SMTP) at concurrency 16.
2. The same through ``benchmarks.delay_proxy`` at 0, 5 and 20 ms round trip:
   mergekit with PIPELINING on and off, the plain loop and mailmerge, against
   the limit of 16 connections / RTT.
3. Rendering alone: mergekit's builder, ``EmailMessage`` + ``bytes()``, Jinja alone.
4. A million-row CSV: ``pandas.read_csv`` alone, mergekit's ingest (also with one address in
   a hundred internationalised), and
   ``mergekit send --dry-run``; time and peak RSS, each in its own process.
5. The HTTP path: render + ``postmark://`` into a local stand-in API against
   rendering alone, and the same batches through ``null://`` (:func:`http_path`).

Every figure comes with its reference from the same run (the machine is shared,
so absolute numbers drift; ratios much less). ``--quick`` runs small sizes to
check the harness. Writes ``results.md`` and ``rtt.png`` into ``--out`` (a folder under the
system's temporary folder by default), or with ``--publish`` into ``docs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from benchmarks import million, rendering
from tests.smtpd import free_port

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "benchmarks" / "template.txt"
PUBLISHED = ROOT / "docs" / "benchmarks"
SCRATCH_OUT = Path(tempfile.gettempdir()) / "mergekit-benchmarks"
CONNECTIONS = 16
RTTS_MS = (0, 5, 20)
SMTP_SOURCE_HEADER_BYTES = 112  # smtp-source's own From/To/Date/Message-Id, added to -l


@dataclass
class Results:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # section, what, figure, reference
    rtt: dict[str, dict[int, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, section: str, what: str, figure: str, reference: str = "") -> None:
        self.rows.append((section, what, figure, reference))
        print(f"[{section}] {what}: {figure}  {reference}", flush=True)


# -- processes -------------------------------------------------------------------


@contextmanager
def background(args: list[str], *, ready: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """A helper process for the duration of a block, stopped by its pid afterwards."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        if ready is not None:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line == ready, f"{args[0]} said {line!r}"
        else:
            time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def smtp_sink() -> Iterator[int]:
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    with background(["smtp-sink", *user, f"127.0.0.1:{port}", "1024"]):
        yield port


@contextmanager
def delay_proxy(upstream: int, rtt_ms: float) -> Iterator[int]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "benchmarks.delay_proxy",
        str(port),
        f"127.0.0.1:{upstream}",
        str(rtt_ms / 2),
    ]
    with background(args, ready="ready"):
        yield port


class PeakRss:
    """Samples a process and all its descendants (from /proc) every 20 ms until stopped.

    ``peak`` is the tree's summed PSS (resident memory with pages shared between
    processes, e.g. a forked worker's, counted once), ``largest`` the RSS of its
    largest single process.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self, pid: int) -> list[int]:
        found = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as file:
                    for child in file.read().split():
                        found.extend(self._tree(int(child)))
        except OSError:
            pass
        return found

    @staticmethod
    def _memory(pid: int) -> tuple[int, int]:
        rss = pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as file:
                for line in file:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
        except OSError:
            pass
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree(self.pid):
                rss, pss = self._memory(pid)
                total += pss
                self.largest = max(self.largest, rss)
            self.peak = max(self.peak, total)
            self._stop.wait(0.02)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.largest


@dataclass
class Child:
    seconds: float  # wall time of the whole process
    stdout: str
    peak_tree: int  # bytes of PSS summed over the process tree, sampled every 20 ms
    peak_largest: int  # bytes of RSS of the largest single process


def run_child(
    args: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None, sample_memory: bool = True
) -> Child:
    """Run a command; with ``sample_memory``, its peak memory too. Throughput runs go unsampled:
    reading a process's smaps takes its memory map's lock, stalling it, 50 times a second."""
    started = time.perf_counter()
    process = subprocess.Popen(
        args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    sampler = PeakRss(process.pid) if sample_memory else None
    stdout, stderr = process.communicate()
    elapsed = time.perf_counter() - started
    peak, largest = sampler.stop() if sampler is not None else (0, 0)
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{args[:4]} exited {process.returncode}: {stderr.decode()[-2000:]}")
    return Child(elapsed, stdout.decode(), peak, largest)


# -- the contenders ----------------------------------------------------------------


def write_campaign(folder: Path, rows: int) -> Path:
    recipients = folder / f"recipients-{rows}.csv"
    if not recipients.exists():
        million.write(str(recipients), rows)
    return recipients


def sample_message() -> bytes:
    from mergekit.render import Template

    template = Template.from_path(TEMPLATE, campaign="bench")
    row = rendering.sample_rows(1)[0]
    return template.render(row, row=1, key=row["email"]).raw


def smtp_source(port: int, rows: int, size: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            "smtp-source",
            "-s",
            str(CONNECTIONS),
            "-d",
            "-m",
            str(rows),
            "-l",
            str(size - SMTP_SOURCE_HEADER_BYTES),
            f"127.0.0.1:{port}",
        ],
        check=True,
        capture_output=True,
    )
    return rows / (time.perf_counter() - started)


def plain_loop(port: int, message: bytes, rows: int, *, uvloop: bool = False) -> float:
    """A plain aiosmtplib client: CONNECTIONS connections, pre-rendered bytes, sendmail() each."""
    code = f"""
import asyncio, sys, time
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.__main__ import _plain_loop
data = sys.stdin.buffer.read()
if {uvloop!r}:
    import uvloop
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
else:
    runner = asyncio.Runner()
with runner:
    print(runner.run(_plain_loop({port}, data, {rows})))
"""
    result = subprocess.run([sys.executable, "-c", code], input=message, capture_output=True, check=True)
    return float(result.stdout)


async def _plain_loop(port: int, message: bytes, rows: int) -> float:
    left = [rows]

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        while left[0] > 0:
            left[0] -= 1
            await client.sendmail("ada@example.com", ["user@example.org"], message)
        await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return rows / (time.perf_counter() - started)


def mailmerge_run(folder: Path, port: int, recipients: Path, rows: int) -> float:
    work = folder / f"mailmerge-{port}-{rows}"
    work.mkdir(exist_ok=True)
    with recipients.open(encoding="utf-8") as source, (work / "db.csv").open("w", encoding="utf-8") as out:
        for number, line in enumerate(source):
            if number > rows:
                break
            out.write(line)
    (work / "server.conf").write_text(f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\n")
    mailmerge = shutil.which("mailmerge", path=str(Path(sys.executable).parent)) or "mailmerge"
    started = time.perf_counter()
    subprocess.run(
        [
            mailmerge,
            "--no-dry-run",
            "--no-limit",
            "--template",
            str(TEMPLATE),
            "--database",
            str(work / "db.csv"),
            "--config",
            str(work / "server.conf"),
            "--output-format",
            "raw",
        ],
        cwd=work,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return rows / (time.perf_counter() - started)


def mergekit_run(
    folder: Path, port: int, recipients: Path, rows: int, *, pipelining: bool = True, uvloop: bool = True
) -> tuple[float, float]:
    """``mergekit send`` as a user runs it: msg/s in the command (after imports), and over the
    whole command's wall time (interpreter start and imports included)."""
    ledger = folder / f"ledger-{time.monotonic_ns()}.db"
    timing = folder / "timing.txt"
    source = recipients
    if rows < _count_rows(recipients):
        source = folder / f"first-{rows}.csv"
        with recipients.open(encoding="utf-8") as full, source.open("w", encoding="utf-8") as out:
            for number, line in enumerate(full):
                if number > rows:
                    break
                out.write(line)
    child = run_child(
        [
            sys.executable,
            "-m",
            "benchmarks.timed_cli",
            "send",
            str(source),
            str(TEMPLATE),
            "--transport",
            f"smtp://127.0.0.1:{port}?pipelining={str(pipelining).lower()}",
            "--concurrency",
            str(CONNECTIONS),
            "--ledger",
            str(ledger),
            "--campaign",
            "bench",
            "--json",
        ],
        cwd=folder,
        env={
            "MERGEKIT_UVLOOP": "1" if uvloop else "0",
            "MERGEKIT_BENCH_TIMING": str(timing),
            "PYTHONPATH": str(ROOT),
        },
        sample_memory=False,
    )
    found = json.loads(child.stdout)
    assert found["sent"] == rows, found
    return rows / float(timing.read_text()), rows / child.seconds


def _count_rows(path: Path) -> int:
    with path.open("rb") as file:
        return sum(1 for _ in file) - 1


def http_path(results: Results, rows: int, concurrency: int = 16, repeats: int = 3) -> None:
    """postmark:// into a fast local stand-in (its own process) against rendering alone, in process.

    Both loops render the same rows with the same template; the second also sends
    them through ``PostmarkTransport`` in batches of 500, ``concurrency`` requests
    in flight. The ratio is what the HTTP transport costs over the render. A third
    loop, the same batches through ``null://``, is the floor the HTTP loop cannot
    pass: what rendering in batches and keeping ``concurrency`` of them alive
    costs before any HTTP (allocation, the collector, the event loop).

    The stand-in is ``benchmarks/postmark_sink.py`` (uvicorn + starlette, its own
    process): it parses each request, checks the token, the limit and the fields,
    and answers one result per message, but quickly, so that what is measured is
    the client. Each loop is timed best of ``repeats``, as ``rendering.rate``
    times the render, each HTTP run with a transport of its own (connections
    opened inside the timing): the best run is the one least disturbed by other
    processes, and the first also pays one-time imports (httpcore, anyio). The
    CPU seconds of both processes over the best run show which one bounds it.

    Both loops run as ``mergekit send`` runs: inside its
    :func:`~mergekit.campaign.frozen_heap` (the imported libraries' objects kept
    out of the garbage collector's passes), the HTTP loop on its event loop
    (uvloop when installed).
    """
    from mergekit.campaign import frozen_heap
    from mergekit.render import Template
    from mergekit.senders import loop_factory
    from mergekit.transports import Status, transport_from_url
    from mergekit.transports.postmark import PostmarkTransport
    from tests.transports.fakeapi import KEYS

    template = Template.from_path(rendering.TEMPLATE, campaign="bench")
    data = rendering.sample_rows(rows)
    sink = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.postmark_sink"], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    postmark = f"postmark://:{KEYS['postmark']}@?base_url=http://127.0.0.1:{sink.stdout.readline().strip()}"

    async def render_and_send(url: str) -> tuple[float, float, float]:
        """Seconds of wall time, client CPU and stand-in CPU for one run through ``url``."""
        transport = transport_from_url(url, concurrency=concurrency)
        limit = asyncio.Semaphore(concurrency)
        batch = PostmarkTransport.max_batch

        async def one(start: int) -> int:
            async with limit:
                messages = [
                    template.render(row, row=i, key=row["email"])
                    for i, row in enumerate(data[start : start + batch], start=start + 1)
                ]
                outcomes = await transport.send_batch(messages)
                return sum(outcome.status is Status.SENT for outcome in outcomes)

        async with transport:
            sink_cpu, cpu, started = process_cpu(sink.pid), time.process_time(), time.perf_counter()
            sent = sum(await asyncio.gather(*(one(i) for i in range(0, rows, batch))))
            elapsed = time.perf_counter() - started
            cpu, sink_cpu = time.process_time() - cpu, process_cpu(sink.pid) - sink_cpu
        assert sent == rows, f"{sent} of {rows} sent"
        return elapsed, cpu, sink_cpu

    try:
        with frozen_heap():
            render_rate = rendering.rate(rendering.build_mergekit, template, data, repeats)
            runs: dict[str, list[tuple[float, float, float]]] = {"null://": [], postmark: []}
            for _ in range(repeats):
                for url, found in runs.items():
                    with asyncio.Runner(loop_factory=loop_factory()) as runner:
                        found.append(runner.run(render_and_send(url)))
        null_elapsed, null_cpu, _ = min(runs["null://"])
        elapsed, cpu, sink_cpu = min(runs[postmark])
    finally:
        sink.terminate()
        sink.wait()
    http_rate, null_rate = rows / elapsed, rows / null_elapsed
    results.add("HTTP", "render alone (sample template)", f"{render_rate:,.0f} rows/s", "reference")
    results.add(
        "HTTP",
        f"render + null:// in the same batches ({concurrency} in flight): the floor",
        f"{null_rate:,.0f} msg/s",
        f"{null_rate / render_rate:.2f}x render alone",
    )
    results.add(
        "HTTP",
        f"render + postmark:// into a local stand-in ({concurrency} requests in flight)",
        f"{http_rate:,.0f} msg/s",
        f"{http_rate / render_rate:.2f}x render alone",
    )
    results.notes.append(
        f"HTTP path, best of {repeats} runs: {elapsed:.2f} s wall, client {cpu:.2f} s CPU "
        f"({cpu / elapsed:.0%}), stand-in {sink_cpu:.2f} s CPU ({sink_cpu / elapsed:.0%}); "
        f"null:// floor {null_elapsed:.2f} s wall, {null_cpu:.2f} s CPU."
    )


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the sections ----------------------------------------------------------------


def smtp_section(results: Results, folder: Path, rows: int, mailmerge_rows: int, repeats: int) -> None:
    """Each contender ``repeats`` times, interleaved, best of each: on a shared machine the best
    run is the one least disturbed by other processes, for every contender alike."""
    message = sample_message()
    recipients = write_campaign(folder, rows)
    runs: dict[str, list[float]] = {}
    with smtp_sink() as sink:
        for _ in range(repeats):
            runs.setdefault("source", []).append(smtp_source(sink, rows, len(message)))
            runs.setdefault("plain", []).append(plain_loop(sink, message, rows))
            runs.setdefault("plain_uv", []).append(plain_loop(sink, message, rows, uvloop=True))
            ours, whole = mergekit_run(folder, sink, recipients, rows)
            runs.setdefault("ours", []).append(ours)
            runs.setdefault("whole", []).append(whole)
            runs.setdefault("ours_asyncio", []).append(
                mergekit_run(folder, sink, recipients, rows, uvloop=False)[0]
            )
        mm = mailmerge_run(folder, sink, recipients, mailmerge_rows)
    best = {name: max(values) for name, values in runs.items()}
    spread = {name: f" (runs: {', '.join(f'{v:,.0f}' for v in values)})" for name, values in runs.items()}
    reference, plain, ours = best["source"], best["plain"], best["ours"]
    results.add(
        "SMTP",
        f"smtp-source -s {CONNECTIONS} -d ({rows:,} msgs, {len(message)} B), best of {repeats}",
        f"{reference:,.0f} msg/s",
        "reference" + spread["source"],
    )
    results.add(
        "SMTP",
        f"plain aiosmtplib loop, {CONNECTIONS} conns, asyncio, pre-rendered",
        f"{plain:,.0f} msg/s",
        f"{plain / reference:.2f}x smtp-source" + spread["plain"],
    )
    results.add(
        "SMTP",
        f"plain aiosmtplib loop, {CONNECTIONS} conns, uvloop, pre-rendered",
        f"{best['plain_uv']:,.0f} msg/s",
        f"{best['plain_uv'] / reference:.2f}x smtp-source" + spread["plain_uv"],
    )
    results.add(
        "SMTP",
        f"mailmerge 2.3 CLI ({mailmerge_rows:,} rows, one run)",
        f"{mm:,.0f} msg/s",
        f"{mm / reference:.3f}x smtp-source",
    )
    results.add(
        "SMTP",
        f"mergekit send, concurrency {CONNECTIONS} (CSV, render, ledger, send)",
        f"{ours:,.0f} msg/s",
        f"{ours / reference:.2f}x smtp-source; {ours / plain:.2f}x plain loop (asyncio); "
        f"{ours / mm:.0f}x mailmerge" + spread["ours"],
    )
    results.add(
        "SMTP",
        "mergekit send, same, over the whole command (interpreter start, imports)",
        f"{best['whole']:,.0f} msg/s",
        f"{best['whole'] / reference:.2f}x smtp-source; {best['whole'] / plain:.2f}x plain loop"
        + spread["whole"],
    )
    results.add(
        "SMTP",
        "mergekit send, asyncio loop instead of uvloop (MERGEKIT_UVLOOP=0)",
        f"{best['ours_asyncio']:,.0f} msg/s",
        f"{best['ours_asyncio'] / plain:.2f}x plain loop (asyncio)" + spread["ours_asyncio"],
    )


def rtt_section(results: Results, folder: Path, sizes: dict[int, tuple[int, int]]) -> None:
    message = sample_message()
    series = {
        "mergekit, pipelining": {},
        "mergekit, no pipelining": {},
        "plain aiosmtplib loop": {},
        "mailmerge": {},
    }
    with smtp_sink() as sink:
        for rtt in RTTS_MS:
            rows, mm_rows = sizes[rtt]
            recipients = write_campaign(folder, rows)
            with delay_proxy(sink, rtt) as port:
                on, _ = mergekit_run(folder, port, recipients, rows)
                off, _ = mergekit_run(folder, port, recipients, rows, pipelining=False)
                plain = plain_loop(port, message, rows)
                mm = mailmerge_run(folder, port, recipients, mm_rows)
            series["mergekit, pipelining"][rtt] = on
            series["mergekit, no pipelining"][rtt] = off
            series["plain aiosmtplib loop"][rtt] = plain
            series["mailmerge"][rtt] = mm
            limit = f"{CONNECTIONS / (rtt / 1000):,.0f} msg/s" if rtt else "none"
            section = f"RTT {rtt} ms"
            share = f"; {on / (CONNECTIONS / (rtt / 1000)):.2f}x the limit ({limit})" if rtt else ""
            results.add(
                section,
                f"mergekit, pipelining ({rows:,} rows)",
                f"{on:,.0f} msg/s",
                f"{on / mm:.0f}x mailmerge{share}",
            )
            results.add(
                section, "mergekit, no pipelining", f"{off:,.0f} msg/s", f"{off / on:.2f}x pipelining"
            )
            results.add(
                section, "plain aiosmtplib loop", f"{plain:,.0f} msg/s", f"{plain / on:.2f}x mergekit"
            )
            results.add(section, f"mailmerge ({mm_rows:,} rows)", f"{mm:,.0f} msg/s", f"limit {limit}")
    results.rtt = series


def render_section(results: Results, rows: int) -> None:
    found = rendering.measure(rows)
    reference = found["EmailMessage + bytes()"]
    for name, value in found.items():
        results.add(
            "Render",
            f"{name} (sample template)",
            f"{value:,.0f} rows/s",
            "reference" if value == reference else f"{value / reference:.1f}x EmailMessage",
        )


def _write_million(path: Path, rows: int, *extra: str) -> None:
    """A CSV of ``rows`` rows by benchmarks.million (``extra``: one address in N internationalised)."""
    subprocess.run(
        [sys.executable, "-m", "benchmarks.million", "write", str(path), str(rows), *extra],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def _ingest_million(path: Path, ledger: Path) -> tuple[float, Child]:
    """Seconds a mergekit ingest of ``path`` took (in its own process), and the process measured."""
    ingest = run_child([sys.executable, "-m", "benchmarks.million", "ingest", str(path), str(ledger)])
    return json.loads(ingest.stdout)["seconds"], ingest


def million_section(results: Results, folder: Path, rows: int) -> None:
    path = folder / f"million-{rows}.csv"
    _write_million(path, rows)
    size = path.stat().st_size / 1e6
    alone = run_child([sys.executable, "-m", "benchmarks.million", "pandas", str(path)])
    pandas_s = json.loads(alone.stdout)["seconds"]
    results.add(
        "1M rows",
        f"pandas.read_csv alone ({rows:,} rows, {size:.0f} MB)",
        f"{pandas_s:.2f} s, {rows / pandas_s:,.0f} rows/s",
        f"peak RSS {alone.peak_largest / 2**20:.0f} MB",
    )
    ingest_s, ingest = _ingest_million(path, folder / "million.db")
    results.add(
        "1M rows",
        "mergekit ingest into SQLite",
        f"{ingest_s:.2f} s, {rows / ingest_s:,.0f} rows/s",
        f"{pandas_s / ingest_s:.0%} of pandas alone; peak RSS {ingest.peak_largest / 2**20:.0f} MB",
    )
    # One address in a hundred internationalised: those rows' keys are computed in Python (issue 13).
    idn = folder / f"million-{rows}-idn.csv"
    _write_million(idn, rows, "100")
    idn_s, _ = _ingest_million(idn, folder / "million-idn.db")
    results.add(
        "1M rows",
        "mergekit ingest, 1 address in 100 at bücher.example",
        f"{idn_s:.2f} s, {rows / idn_s:,.0f} rows/s",
        f"{pandas_s / idn_s:.0%} of pandas alone",
    )
    dry = run_child(
        [
            sys.executable,
            "-m",
            "mergekit",
            "send",
            str(path),
            str(TEMPLATE),
            "--transport",
            "null://",
            "--dry-run",
            "--concurrency",
            str(CONNECTIONS),
            "--json",
        ],
        cwd=folder,
    )
    found = json.loads(dry.stdout)
    results.add(
        "1M rows",
        "mergekit send --dry-run (ingest, render, ledger)",
        f"{dry.seconds:.1f} s, {rows / dry.seconds:,.0f} rows/s",
        f"peak {dry.peak_tree / 2**20:.0f} MB PSS over the process tree (main + render worker), "
        f"largest process RSS {dry.peak_largest / 2**20:.0f} MB; {found['pending']:,} would send",
    )


# -- output ----------------------------------------------------------------------


def write_outputs(results: Results, header: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [*header, "", "| section | what | figure | reference (same run) |", "|---|---|---|---|"]
    lines += [f"| {s} | {w} | {f} | {r} |" for s, w, f, r in results.rows]
    lines += ["", *[f"- {note}" for note in results.notes]]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if results.rtt:
        chart(results, out)


def chart(results: Results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in results.rtt.items():
        xs = sorted(points)
        axes.plot(xs, [points[x] for x in xs], marker="o", label=name)
    limit_x = [rtt for rtt in RTTS_MS if rtt]
    axes.plot(
        limit_x,
        [CONNECTIONS / (rtt / 1000) for rtt in limit_x],
        linestyle="--",
        color="grey",
        label=f"limit: {CONNECTIONS} connections / RTT",
    )
    axes.set_yscale("log")
    axes.set_xlabel("round-trip time added by the delay proxy (ms)")
    axes.set_ylabel("messages per second (log)")
    axes.set_title("SMTP into smtp-sink through a delay proxy, 16 connections")
    axes.set_xticks(list(RTTS_MS))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "rtt.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: check the harness only")
    parser.add_argument("--only", choices=["smtp", "rtt", "render", "million", "http"], action="append")
    parser.add_argument("--out", type=Path, default=SCRATCH_OUT, help="folder to write into")
    parser.add_argument("--publish", action="store_true", help=f"write into {PUBLISHED} instead")
    args = parser.parse_args()
    out: Path = PUBLISHED if args.publish else args.out
    quick = args.quick
    rows = 2000 if quick else 20_000
    sizes = (
        {0: (1000, 100), 5: (400, 20), 20: (200, 10)}
        if quick
        else {0: (20_000, 2000), 5: (8000, 400), 20: (4000, 150)}
    )
    started = time.time()
    results = Results()
    header = [
        "# mergekit benchmarks",
        "",
        f"`python -m benchmarks{' --quick' if quick else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load average at start "
        f"{os.getloadavg()[0]:.2f}. Messages ~1.2 KB (`benchmarks/template.txt`).",
    ]
    wanted = set(args.only or ["smtp", "rtt", "render", "million", "http"])
    with tempfile.TemporaryDirectory(prefix="mergekit-bench-") as scratch:
        folder = Path(scratch)
        if "smtp" in wanted:
            smtp_section(results, folder, rows, 2000 if quick else rows, 1 if quick else 3)
        if "rtt" in wanted:
            rtt_section(results, folder, sizes)
        if "render" in wanted:
            render_section(results, 2000 if quick else 20_000)
        if "http" in wanted:
            http_path(results, 2_000 if quick else 20_000)
        if "million" in wanted:
            million_section(results, folder, 50_000 if quick else 1_000_000)
    header[-1] += f" Load average at end {os.getloadavg()[0]:.2f}; took {time.time() - started:.0f} s."
    write_outputs(results, header, out)
    print(f"wrote {out / 'results.md'}" + (f" and {out / 'rtt.png'}" if results.rtt else ""))


if __name__ == "__main__":
    main()
