"""Dispatch: claim batches from the ledger, render them, send them, record outcomes.

``concurrency`` workers run on one asyncio loop; each claims a batch (the rows
turn ``sending``, committed before the batch leaves), renders it, hands it to
the transport and records the outcomes in one transaction. Transient outcomes
are sent again after an exponential, jittered wait (tenacity's
``wait_exponential_jitter``, or the server's Retry-After if longer) up to
``max_attempts`` tries in this run, then left ``deferred`` with the time they
may next be tried. Ledger calls run on one thread of their own so a slow
commit never stalls the sending loop, in rounds: one round records every
worker's waiting outcomes in one ``record`` and claims for every waiting worker
in one ``claim`` (group commit), so the ledger's cost per row falls as the
send rate rises. A large run renders in worker processes
(:mod:`.workers`) so the loop's core is left to sending.

Stopping (:meth:`Dispatcher.stop`, wired to SIGINT/SIGTERM by the caller):
no new batch is claimed, batches in flight finish within ``stop_timeout``, and
a batch cut off after that is recorded ``unknown`` (it may have left) or put
back to ``pending`` (it had not started).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity

from .addresses import canonical_address
from .errors import ConfigError, TransportError
from .ledger import OPEN_STATES, AddressClaim, Campaign, ClaimedRow, Ledger, RowUpdate, SharedRateLimiter
from .render import Template
from .transports.base import Message, Outcome, Status, Transport
from .workers import Renderer, default_processes

log = logging.getLogger(__name__)
T = TypeVar("T")

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*\Z", re.I)
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
THROTTLE_FACTOR = 0.8  # a throttling reply (429, 421, 4.7.x) cuts the run's rate to this share
# Replies to batches already in flight when the server started refusing are one event, not many:
# the rate is cut at most once per this many seconds.
THROTTLE_COOLDOWN = 2.0
RATE_WINDOW = 5.0  # seconds of accepted messages the measured rate is taken over
MIN_MEASURED = 10  # accepted messages before a measured rate means anything
MIN_RATE = 0.05  # messages per second a throttled run never goes below (one every 20 s)
# SMTP replies that mean "slow down" rather than "not this message": 421 (closing, e.g. too many
# connections), enhanced status 4.7.x (policy, e.g. Postfix's "450 4.7.1 Error: too much mail"),
# and the words servers use for rate limits.
_THROTTLE_TEXT = re.compile(r"\b4\.7\.\d+\b|too (?:many|much)|rate|throttl|slow down", re.I)


# ... except a refusal of one more connection ("421 4.7.0 Error: too many connections"): that asks
# for fewer connections, which the SMTP pool gives by itself, not for a lower rate.
_CONNECTION_LIMIT_TEXT = re.compile(r"too many (?:connections|sessions)|concurren", re.I)


def is_throttle(outcome: Outcome) -> bool:
    """True for a transient outcome that asks the whole run to slow down."""
    if outcome.status is not Status.TRANSIENT or _CONNECTION_LIMIT_TEXT.search(outcome.text):
        return False
    if outcome.retry_after or outcome.code in (421, 429):
        return True
    return bool(outcome.code and 400 <= outcome.code < 500 and _THROTTLE_TEXT.search(outcome.text))


@dataclass(frozen=True)
class Rate:
    """A send rate such as ``50/s`` or ``2000/h``."""

    count: float
    per_seconds: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(text)
        if not match or float(match.group(1)) <= 0:
            raise ConfigError(
                f"{text!r} is not a rate",
                option="--rate",
                hint="Write a positive count per unit, e.g. 50/s, 300/m or 2000/h",
            )
        return cls(float(match.group(1)), _PER[match.group(2)[0].lower()])

    @property
    def per_second(self) -> float:
        return self.count / self.per_seconds


class RateLimiter:
    """A token bucket over the whole run: each message reserves ``1/rate`` seconds.

    A throttling reply makes it pause for the server's Retry-After and cut the
    rate to ``THROTTLE_FACTOR`` times the current cap, or, in a run without
    one, times the rate the server has been accepting (over the last
    ``RATE_WINDOW`` seconds); at most once per ``THROTTLE_COOLDOWN``. The cap is
    not raised again within the run.
    """

    def __init__(self, rate: Rate | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = rate.per_second if rate else None
        self._clock = clock
        self._next_free = clock()
        self._accepted: deque[tuple[float, int]] = deque()
        self._first_accepted: float | None = None
        self._accepted_total = 0
        self._last_cut = -float("inf")
        self.cuts = 0

    async def acquire(self, count: int) -> None:
        now = self._clock()
        start = max(now, self._next_free)
        if self.per_second:
            self._next_free = start + count / self.per_second
        if start > now:
            await asyncio.sleep(start - now)

    def accepted(self, count: int) -> None:
        """Note ``count`` messages the server took just now (the measured rate)."""
        if not count:
            return
        now = self._clock()
        if self._first_accepted is None:
            self._first_accepted = now
        self._accepted_total += count
        self._accepted.append((now, count))
        while self._accepted and self._accepted[0][0] < now - RATE_WINDOW:
            self._accepted.popleft()

    def measured(self) -> float | None:
        """Messages per second the server accepted over the last ``RATE_WINDOW`` seconds.

        None until ``MIN_MEASURED`` messages were accepted: a throttling reply
        among the first requests in flight (a 429 to the second of four) would
        otherwise set the run's rate from one or two messages, far below what
        the server takes.
        """
        if self._first_accepted is None or self._accepted_total < MIN_MEASURED:
            return None
        now = self._clock()
        span = max(1.0, min(RATE_WINDOW, now - self._first_accepted))
        return sum(count for at, count in self._accepted if at >= now - RATE_WINDOW) / span

    def throttle(self, retry_after: float | None = None, reply: str = "") -> None:
        """Slow down after a throttling reply: pause for ``retry_after`` and lower the rate."""
        now = self._clock()
        if retry_after:
            self._next_free = max(self._next_free, now + retry_after)
        if now - self._last_cut < THROTTLE_COOLDOWN:
            return
        self._last_cut = now
        # The first cut starts from what the server accepted; later ones from the cap itself, since
        # the measured rate then also counts this run's own back-off pauses and would spiral down.
        base = self.per_second or self.measured()
        if not base:
            return
        self.per_second = max(MIN_RATE, base * THROTTLE_FACTOR)
        self.cuts += 1
        log.warning(
            "the server is throttling (%s): sending at most %.2f messages/s from now on",
            reply or "Retry-After",
            self.per_second,
        )


@dataclass(frozen=True)
class SendOptions:
    """How a run sends; each field is the ``mergekit send`` option of the same name."""

    concurrency: int = 4
    batch_size: int | None = None
    rate: Rate | None = None
    max_attempts: int = 3
    unknown: str = "resend"
    include_failed: bool = False
    due_only: bool = True  # False for ``retry``: deferred rows go now, whatever their time
    dry_run: bool = False
    backoff_initial: float = 1.0  # seconds before the second try; doubles, with jitter
    backoff_max: float = 30.0
    defer_base: float = 60.0  # a deferred row's wait before the next run may try it; doubles
    defer_max: float = 3600.0
    stop_timeout: float = 30.0
    render_processes: int | None = None  # worker processes that render; None: one per spare core
    processes: int | None = None  # processes sending (SQLite ledger); None: one per core, large runs

    def check(self) -> None:
        """Refuse impossible values, naming the option, before anything is sent."""
        if self.concurrency < 1:
            raise ConfigError("must be at least 1", option="--concurrency")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("must be at least 1", option="--batch-size")
        if self.max_attempts < 1:
            raise ConfigError("must be at least 1", option="--max-attempts")
        if self.render_processes is not None and self.render_processes < 0:
            raise ConfigError("must be at least 0", option="render_processes")
        if self.processes is not None and self.processes < 1:
            raise ConfigError("must be at least 1", option="--processes")
        if self.processes is not None and self.processes > 1 and self.rate is not None:
            raise ConfigError(
                "a --rate needs one sending process", option="--processes", hint="Drop --processes"
            )
        if self.unknown not in {"resend", "skip"}:
            raise ConfigError("must be resend or skip", option="--unknown")


@dataclass
class RunResult:
    """What one run did (``this_run``) and where the campaign stands (``counts``)."""

    campaign: str
    counts: dict[str, int]
    this_run: Counter[str] = field(default_factory=Counter)
    recovered_unknown: int = 0
    interrupted: bool = False
    elapsed: float = 0.0
    next_due: float | None = None

    @property
    def exit_code(self) -> int:
        return campaign_exit_code(self.counts)


def campaign_exit_code(counts: dict[str, int]) -> int:
    """DESIGN.md's exit codes for the campaign as it stands: 0 done, 1 with failures, 3 resumable."""
    if any(counts.get(state, 0) for state in OPEN_STATES):
        return 3
    if counts.get("failed", 0) or counts.get("invalid", 0):
        return 1
    return 0


@dataclass
class _Batch:
    """A claimed batch: the rows, their messages, and the rows that failed to render."""

    claimed: list[ClaimedRow]
    rendered: list[tuple[ClaimedRow, Message]]
    invalid: list[RowUpdate]


class Dispatcher:
    """Runs one campaign's sendable rows through a transport until none is left or it is stopped."""

    def __init__(
        self,
        ledger: Ledger,
        campaign: Campaign,
        template: Template,
        transport: Transport,
        options: SendOptions,
        on_progress: Callable[[Counter[str]], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.campaign = campaign
        self.template = template
        self.transport = transport
        self.options = options
        self.on_progress = on_progress or (lambda _: None)
        batch = options.batch_size or transport.max_batch
        if options.rate:
            # Keep a batch to about a second of the rate, so a batch never bursts far ahead.
            batch = min(batch, max(1, int(options.rate.per_second)))
        self.batch_size = min(batch, transport.max_batch)
        # Several processes sending one campaign (PostgreSQL) share the ledger's limiter, so
        # --rate is the campaign's total; otherwise the run's own limiter is the campaign's.
        shared = ledger.rate_limiter(campaign, options.rate.per_second if options.rate else None)
        self.limiter: RateLimiter | SharedRateLimiter = shared or RateLimiter(options.rate)
        self.this_run: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        # Rows this run settles (deferred, unknown, failed) are not claimed again before it
        # ends: a lost reply is not resent at once, a refusing server is not retried for ever.
        self._began = time.monotonic()
        self._started = time.time()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._claims: list[tuple[int, asyncio.Future[list[ClaimedRow]]]] = []
        self._addresses: list[tuple[list[AddressClaim], asyncio.Future[dict[int, int]]]] = []
        self._records: list[tuple[list[RowUpdate], asyncio.Future[list[ClaimedRow]]]] = []
        self._ledger_task: asyncio.Task[None] | None = None
        self._unconfirmed: list[asyncio.Future[list[ClaimedRow]]] = []
        self._wait = tenacity.wait_exponential_jitter(
            multiplier=options.backoff_initial, max=options.backoff_max, jitter=options.backoff_initial
        )
        states = ["unknown"] if options.unknown == "resend" else []
        states += ["deferred", "pending"]
        if options.include_failed:
            states.append("failed")
        self._states = tuple(states)
        self._renderer = Renderer(template, 0)

    def stop(self) -> None:
        """Stop claiming; batches in flight finish (see ``stop_timeout``)."""
        if not self._stopping.is_set():
            log.warning("stopping: finishing the batches in flight, then committing")
        self._stopping.set()

    async def run(self) -> RunResult:
        self._began = time.monotonic()
        self._started = time.time()
        self.transport.prepare(self.template)
        counts = self.ledger.counts(self.campaign)
        to_send = sum(counts[state] for state in self._states)
        if to_send and not self.transport.batch_is_request:
            # Even shares: every worker gets the same number of batches, so no
            # connection idles while others finish a last round. (Where a batch is
            # one API request, fewer and fuller requests matter more.) Other sending
            # processes take their part of the rows.
            to_send = math.ceil(to_send / (self.options.processes or 1))
            rounds = math.ceil(to_send / (self.options.concurrency * self.batch_size))
            self.batch_size = max(1, math.ceil(to_send / (self.options.concurrency * rounds)))
        processes = self.options.render_processes
        if processes is None:
            processes = default_processes(to_send)
        # Started before the ledger thread exists: a forked worker copies no thread.
        self._renderer = Renderer(self.template, processes)
        await self._renderer.start()
        try:
            if self.options.dry_run:
                await self._run_workers()
            else:
                async with self.transport:
                    await self._run_workers()
            await asyncio.gather(*self._unconfirmed)  # raise a commit's failure
        finally:
            if self._ledger_task is not None:
                await asyncio.gather(self._ledger_task, return_exceptions=True)
            await asyncio.gather(*self._unconfirmed, return_exceptions=True)
            self._renderer.close()
            self._executor.shutdown(wait=True)
        return self.result()

    def result(self) -> RunResult:
        """This run's counts and where the campaign stands in the ledger now."""
        counts = self.ledger.counts(self.campaign)
        if self.options.dry_run:
            counts["pending"] += counts["sending"]
            counts["sending"] = 0
        return RunResult(
            campaign=self.campaign.name,
            counts=counts,
            this_run=self.this_run,
            interrupted=self._stopping.is_set(),
            elapsed=time.monotonic() - self._began,
            next_due=self.ledger.next_due(self.campaign) if counts["deferred"] else None,
        )

    async def _run_workers(self) -> None:
        workers = [asyncio.create_task(self._worker()) for _ in range(self._pipelines())]
        stop_waiter = asyncio.create_task(self._stopping.wait())
        pending: set[asyncio.Task[Any]] = set(workers)
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending | {stop_waiter}, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(stop_waiter)
                for task in done:
                    if task is not stop_waiter:
                        task.result()  # re-raise a worker's error
                if stop_waiter in done and pending:
                    _, late = await asyncio.wait(pending, timeout=self.options.stop_timeout)
                    for task in late:
                        task.cancel()
                    await asyncio.gather(*late, return_exceptions=True)
                    break
        finally:
            stop_waiter.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _pipelines(self) -> int:
        """How many workers claim and render at once: ``concurrency``, except in a dry run.

        A dry run sends nothing, so only rendering is left to overlap: one worker per
        render process plus one keeps every render process busy while a batch is
        claimed or recorded (without render processes, this one renders). Each worker
        holds its batch and the next, rendered: at ``--concurrency 16`` with
        ``null://``'s 1,000-row batches a dry run held 32,000 rendered rows, over
        100 MB, and ran slower than with two workers (issue 6).
        """
        if self.options.dry_run:
            return min(self.options.concurrency, self._renderer.processes + 1)
        return self.options.concurrency

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _claim(self) -> list[ClaimedRow]:
        """Up to a batch of rows, claimed in the next ledger round."""
        waiter: asyncio.Future[list[ClaimedRow]] = asyncio.get_running_loop().create_future()
        self._claims.append((self.batch_size, waiter))
        self._serve_ledger()
        return await waiter

    async def _claim_addresses(self, claims: list[AddressClaim]) -> dict[int, int]:
        """Claim rendered rows' addresses in the next ledger round: the rows whose address another
        row holds, with that row's number."""
        waiter: asyncio.Future[dict[int, int]] = asyncio.get_running_loop().create_future()
        self._addresses.append((claims, waiter))
        self._serve_ledger()
        return await waiter

    async def _write(self, updates: list[RowUpdate]) -> None:
        """Commit ``updates`` in the next ledger round; returns once committed."""
        waiter: asyncio.Future[list[ClaimedRow]] = asyncio.get_running_loop().create_future()
        self._records.append((updates, waiter))
        self._serve_ledger()
        await waiter

    def _serve_ledger(self) -> None:
        if self._ledger_task is None or self._ledger_task.done():
            self._ledger_task = asyncio.create_task(self._ledger_rounds())

    async def _ledger_rounds(self) -> None:
        while self._records or self._claims or self._addresses:
            records, self._records = self._records, []
            claims, self._claims = self._claims, []
            addresses, self._addresses = self._addresses, []
            updates = [update for batch, _ in records for update in batch]
            wanted = sum(limit for limit, _ in claims)
            try:
                taken, claimed = await self._db(
                    self._ledger_round, updates, [claim for batch, _ in addresses for claim in batch], wanted
                )
            except Exception as err:
                waiters: list[asyncio.Future[Any]] = [w for _, w in records + claims] + [
                    w for _, w in addresses
                ]
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(err)
                continue
            for _, waiter in records:
                if not waiter.done():
                    waiter.set_result([])
            for _, address_waiter in addresses:
                if not address_waiter.done():
                    address_waiter.set_result(taken)
            for limit, waiter in claims:
                share, claimed = claimed[:limit], claimed[limit:]
                if not waiter.done():
                    waiter.set_result(share)
                elif share:  # its worker was cancelled meanwhile: the rows never left
                    self._records.append(([_put_back(row) for row in share], self._loop_future()))

    def _ledger_round(
        self, updates: list[RowUpdate], addresses: list[AddressClaim], wanted: int
    ) -> tuple[dict[int, int], list[ClaimedRow]]:
        if updates:
            self.ledger.record(self.campaign, updates)
        taken = self.ledger.claim_addresses(self.campaign, addresses) if addresses else {}
        if not wanted:
            return taken, []
        return taken, self.ledger.claim(
            self.campaign,
            wanted,
            states=self._states,
            due_before=time.time() if self.options.due_only else None,
            settled_before=self._started,
        )

    @staticmethod
    def _loop_future() -> asyncio.Future[list[ClaimedRow]]:
        return asyncio.get_running_loop().create_future()

    async def _worker(self) -> None:
        """Claim and render the next batch while this one is sent, so neither waits on the other."""
        upcoming: asyncio.Task[_Batch] | None = asyncio.create_task(self._prepare())
        try:
            while upcoming is not None:
                batch = await upcoming
                upcoming = None
                if not batch.claimed:
                    return
                if self._stopping.is_set():
                    await self._record([_put_back(row) for row in batch.claimed])
                    return
                upcoming = asyncio.create_task(self._prepare())
                await self._handle(batch)
        finally:
            if upcoming is not None:
                upcoming.cancel()
                await asyncio.gather(upcoming, return_exceptions=True)
                if not upcoming.cancelled() and upcoming.exception() is None:
                    self._records.append(
                        ([_put_back(row) for row in upcoming.result().claimed], self._loop_future())
                    )
                    self._serve_ledger()

    async def _prepare(self) -> _Batch:
        """Claim a batch and render it; a cancelled render puts the claimed rows back."""
        claimed = await self._claim()
        if not claimed:
            return _Batch([], [], [])
        try:
            results = await self._renderer.render([(row.row, row.key, row.data) for row in claimed])
        except asyncio.CancelledError:
            self._records.append(([_put_back(row) for row in claimed], self._loop_future()))
            self._serve_ledger()
            raise
        batch = _Batch(claimed, [], [])
        for row, result in zip(claimed, results, strict=True):
            if isinstance(result, str):  # why the row cannot be rendered
                batch.invalid.append(RowUpdate(row.id, "invalid", attempted=False, text=result))
            else:
                batch.rendered.append((row, result))
        if batch.rendered:
            await self._drop_taken_addresses(batch)
        return batch

    async def _drop_taken_addresses(self, batch: _Batch) -> None:
        """Claim each rendered message's address; one whose address another row of the campaign
        holds (a ``--key`` that kept them apart, a ``To:`` from another column) is ``duplicate``."""
        claims = [AddressClaim(row.id, row.row, primary_address(message)) for row, message in batch.rendered]
        try:
            taken = await self._claim_addresses(claims)
        except asyncio.CancelledError:
            self._records.append(([_put_back(row) for row in batch.claimed], self._loop_future()))
            self._serve_ledger()
            raise
        if not taken:
            return
        kept = []
        for (row, message), claim in zip(batch.rendered, claims, strict=True):
            holder = taken.get(row.id)
            if holder is None:
                kept.append((row, message))
            else:
                text = f"same address as row {holder} ({claim.address})"
                batch.invalid.append(RowUpdate(row.id, "duplicate", attempted=False, text=text))
        batch.rendered = kept

    async def _handle(self, batch: _Batch) -> None:
        rendered, updates = batch.rendered, batch.invalid
        if self.options.dry_run:
            # Rendered rows stay ``sending`` so no worker claims them again; the
            # dry run's throwaway ledger reports them as what would be sent.
            self.this_run["would_send"] += len(rendered)
            await self._record(updates)
            self.on_progress(Counter(would_send=len(rendered)))
            return
        if not rendered:  # every row of the batch was invalid: nothing to send
            await self._record(updates)
            return
        await self._send_with_retries(rendered, updates)

    async def _send_with_retries(
        self, rendered: list[tuple[ClaimedRow, Message]], updates: list[RowUpdate]
    ) -> None:
        remaining = rendered
        attempt = 0
        if not remaining:  # every row of the batch was invalid: record that, or they stay ``sending``
            await self._record(updates)
            return
        while remaining:
            attempt += 1
            last_try = attempt >= self.options.max_attempts
            retry: list[tuple[ClaimedRow, Message]] = []
            longest_retry_after = 0.0
            # After a throttle the batch size shrinks; a retry goes out in chunks of it, each
            # waiting for the rate limiter, rather than as one burst the server refuses again.
            for chunk in in_chunks(remaining, lambda: self.batch_size):
                if self.ledger.leases:
                    chunk = await self._still_held(chunk)
                    if not chunk:
                        continue
                await self.limiter.acquire(len(chunk))
                outcomes = await self._send([message for _, message in chunk], chunk)
                final = last_try or self._stopping.is_set()
                throttled = ""
                for (row, message), outcome in zip(chunk, outcomes, strict=True):
                    if outcome.status is Status.TRANSIENT:
                        longest_retry_after = max(longest_retry_after, outcome.retry_after or 0.0)
                        if not final:
                            retry.append((row, message))
                        if not throttled and is_throttle(outcome):
                            throttled = f"{outcome.code} {outcome.text}".strip()
                    updates.append(self._update(row, message, outcome, attempt, final=final))
                self.limiter.accepted(sum(outcome.status is Status.SENT for outcome in outcomes))
                # A batch's final outcomes need not be committed before the next batch
                # goes: until they are, its rows read ``sending``, which a crash turns
                # into ``unknown``, exactly as if the crash had come before the send.
                await self._record(updates, wait=bool(retry))
                updates = []
                if throttled:
                    self._throttle(longest_retry_after, throttled)
            if not retry:
                return
            await self._pause(max(self._backoff(attempt), longest_retry_after))
            remaining = retry
            if self._stopping.is_set():
                # Stopped during the wait: these rows were not sent again; defer them.
                await self._record(
                    [
                        RowUpdate(
                            row.id,
                            "deferred",
                            attempted=False,
                            text="stopped before the next try",
                            next_attempt_at=time.time(),
                        )
                        for row, _ in remaining
                    ]
                )
                self.this_run["deferred"] += len(remaining)
                return

    async def _still_held(
        self, chunk: Sequence[tuple[ClaimedRow, Message]]
    ) -> Sequence[tuple[ClaimedRow, Message]]:
        """The rows of ``chunk`` whose lease this worker still holds: a worker paused past its
        lease (SIGSTOP, a stalled VM) must not send rows another worker has taken over."""
        held = {row.id for row in await self._db(self.ledger.still_held, [row for row, _ in chunk])}
        if len(held) < len(chunk):
            log.warning(
                "%d rows not sent: this worker's lease lapsed and another took them", len(chunk) - len(held)
            )
        return [item for item in chunk if item[0].id in held]

    def _throttle(self, retry_after: float, reply: str) -> None:
        """Lower the run's rate, and the batch size with it (about a second of the rate) where a
        batch is not one API request: splitting a request would only multiply requests."""
        self.limiter.throttle(retry_after, reply[:120])
        if self.limiter.per_second and not self.transport.batch_is_request:
            self.batch_size = max(1, min(self.batch_size, int(self.limiter.per_second)))

    async def _send(
        self, messages: list[Message], rows: Sequence[tuple[ClaimedRow, Message]]
    ) -> list[Outcome]:
        """The batch's outcomes, every text scrubbed of the transport's secrets and bounded."""
        return self.transport.clean(await self._send_raw(messages, rows))

    async def _send_raw(
        self, messages: list[Message], rows: Sequence[tuple[ClaimedRow, Message]]
    ) -> list[Outcome]:
        try:
            outcomes = await self.transport.send_batch(messages)
        except TransportError as err:
            return [Outcome.transient(err.code, str(err))] * len(messages)
        except asyncio.CancelledError:
            # Cut off by the stop timeout: the batch may have partly left.
            await asyncio.shield(
                self._record(
                    [
                        RowUpdate(
                            row.id,
                            "unknown",
                            text="stopped while the batch was being sent",
                            message_id=message.message_id,
                        )
                        for row, message in rows
                    ]
                )
            )
            raise
        except Exception as err:  # a transport bug must not lose the batch's rows
            # The traceback as scrubbed text: an exception's message may quote a reply.
            trace = self.transport.scrub(traceback.format_exc())
            log.error("transport %s failed on a batch\n%s", self.transport.name, trace)
            return [Outcome.unknown(f"transport error: {err}")] * len(messages)
        if len(outcomes) != len(messages):
            log.error(
                "transport %s returned %d outcomes for %d messages",
                self.transport.name,
                len(outcomes),
                len(messages),
            )
            return [Outcome.unknown("transport returned no outcome for this message")] * len(messages)
        return outcomes

    def _update(
        self, row: ClaimedRow, message: Message, outcome: Outcome, attempt: int, *, final: bool
    ) -> RowUpdate:
        text = outcome.text
        if outcome.status is Status.SENT:
            state = "sent"
        elif outcome.status is Status.PERMANENT:
            state = "failed"
        elif outcome.status is Status.UNKNOWN:
            state = "unknown"
        elif final:
            state = "deferred"
        else:
            state = "sending"  # tried again in this run after the backoff
        next_attempt = None
        if state == "deferred":
            runs = (row.attempts + attempt) // max(1, self.options.max_attempts)
            wait = min(self.options.defer_max, self.options.defer_base * 2 ** max(0, runs - 1))
            next_attempt = time.time() + max(wait, outcome.retry_after or 0.0)
        if state != "sending":
            self.this_run[state] += 1
        return RowUpdate(
            row.id,
            state,
            code=outcome.code,
            text=text,
            provider_id=outcome.provider_id,
            message_id=message.message_id,
            next_attempt_at=next_attempt,
        )

    async def _record(self, updates: list[RowUpdate], *, wait: bool = True) -> None:
        """Commit ``updates`` in the next ledger round; with ``wait=False``, return at once
        (the run checks every such commit before it ends)."""
        if not updates:
            return
        if wait:
            await self._write(updates)
        else:
            waiter: asyncio.Future[list[ClaimedRow]] = self._loop_future()
            self._records.append((updates, waiter))
            self._unconfirmed.append(waiter)
            self._serve_ledger()
        done = Counter(update.state for update in updates if update.state != "sending")
        for state in ("invalid", "duplicate"):  # settled here, not by an outcome (see _update)
            if done[state]:
                self.this_run[state] += done[state]
        self.on_progress(done)

    def _backoff(self, attempt: int) -> float:
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return float(self._wait(state))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the run is stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


def primary_address(message: Message) -> str:
    """The address a message is for, canonical: its first ``To:`` address, else its first envelope
    recipient (a message with only ``Cc:``/``Bcc:``). Further recipients are not claimed: a ``Cc:``
    the template gives every row would make every row but the first a duplicate."""
    to = next((addresses for name, addresses in message.addresses if name == "to" and addresses), None)
    return canonical_address(to[0][1] if to else message.envelope_to[0])


def in_chunks(items: Sequence[T], size: Callable[[], int]) -> Iterator[Sequence[T]]:
    """``items`` in consecutive chunks of ``size()`` each, read afresh for every chunk.

    A throttle shrinks the batch size while a batch's chunks go out; chunks cut at
    positions stepped by the size read once skipped rows, which stayed ``sending``.
    """
    start = 0
    while start < len(items):
        chunk = items[start : start + max(1, size())]
        start += len(chunk)
        yield chunk


def _put_back(row: ClaimedRow) -> RowUpdate:
    """Undo a claim whose rows were never sent: back to the state they came from."""
    return RowUpdate(row.id, row.previous, attempted=False, text="claimed but not sent: the run stopped")
