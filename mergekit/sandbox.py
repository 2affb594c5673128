"""The template sandbox: what a template may reach, and how much one row may cost.

A template is hostile input: it is often written by someone other than the
person who sends it. Jinja's :class:`~jinja2.sandbox.SandboxedEnvironment`
already refuses attribute escapes (``''.__class__.__mro__``,
``cycler.__init__.__globals__``, ``'{0.__class__}'.format(x)``,
``|attr('__class__')``...; Jinja >= 3.1.6 closes the known ``format`` holes).
It does not bound what a row costs, so :class:`Sandbox` adds:

- sizes: no value a template computes (a string, a list, a dict) may pass
  :data:`MAX_CHARS` characters or :data:`MAX_ITEMS` items. Operators that
  multiply (``*``, ``**``, ``+``, ``%``), filters and method calls are checked
  *before* they allocate where their arguments tell the size (``'x' * 10**8``,
  ``'x'|center(10**8)``, ``'{:>99999999}'.format(1)``, ``|replace``, ``|join``),
  and every result after; integers are kept under :data:`MAX_INT_BITS`.
  Output a template buffers (macros, ``{% filter %}``, ``{% set %}`` blocks)
  and output it streams (:func:`join_bounded`) count against :data:`MAX_CHARS`.
- time: :class:`CpuDeadline` stops a row after :data:`MAX_CPU_SECONDS` of CPU
  (``ITIMER_PROF``): nested loops over ``range()`` multiply past any size check.
- globals: ``lipsum`` (random text, unbounded work) is removed; ``namespace``
  is one whose attributes obey the size bound.

A row that passes a bound raises :class:`RenderLimitError` (a Jinja
``SecurityError``), which the renderer records as that row's ``invalid`` reason.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import signal
import string
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import Namespace, _PassArg

MAX_CPU_SECONDS = 2.0  # CPU time one row may take to render
MAX_CHARS = 10_000_000  # characters in any string a template computes, and in each rendered part
MAX_ITEMS = 1_000_000  # items in any list, tuple, set or dict a template computes
MAX_INT_BITS = 100_000  # bits of any integer a template computes (about 30,000 digits)

_SIZED = (list, tuple, dict, set, frozenset)
# A %-conversion's width and precision: "%-10.3f", "%*d".
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")
# Filters whose numeric arguments are the size of what they build.
_COUNT_FILTERS = frozenset({"center", "wordwrap", "batch", "slice"})


class RenderLimitError(SecurityError):
    """A row's rendering passed a size or time bound; the row is ``invalid`` with this reason."""


def check_size(value: Any) -> Any:
    """``value``, or RenderLimitError if it is a string, container or integer over the bounds."""
    if isinstance(value, str):
        if len(value) > MAX_CHARS:
            raise RenderLimitError(f"a value of {len(value):,} characters (at most {MAX_CHARS:,})")
    elif isinstance(value, _SIZED):
        if len(value) > MAX_ITEMS:
            raise RenderLimitError(f"a collection of {len(value):,} items (at most {MAX_ITEMS:,})")
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise RenderLimitError(f"an integer of more than {MAX_INT_BITS:,} bits")
    return value


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, *_SIZED)) else 0


def _check_count(count: Any, what: str) -> None:
    """A width, length or count argument that would build a value over the bounds."""
    if isinstance(count, int) and not isinstance(count, bool) and count > MAX_CHARS:
        raise RenderLimitError(f"{what} of {count:,} (at most {MAX_CHARS:,})")


def _check_product(left: Any, right: Any) -> None:
    """``left * right`` before it is computed."""
    if isinstance(left, int) and not isinstance(right, int):
        left, right = right, left
    if isinstance(right, int) and not isinstance(right, bool):
        if isinstance(left, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimitError(f"an integer of more than {MAX_INT_BITS:,} bits")
        elif _size(left) * max(right, 0) > (MAX_ITEMS if isinstance(left, _SIZED) else MAX_CHARS):
            raise RenderLimitError(f"a repetition to {_size(left) * right:,} characters or items")


def _check_power(base: Any, exponent: Any) -> None:
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and abs(base) > 1
        and exponent * base.bit_length() > MAX_INT_BITS
    ):
        raise RenderLimitError(f"an integer of more than {MAX_INT_BITS:,} bits")


def _check_printf(text: Any, arguments: Any) -> None:
    """``text % arguments``: widths and precisions, written or taken from ``*``, within the bound."""
    if not isinstance(text, str) or "%" not in text:
        return
    values = arguments if isinstance(arguments, tuple) else (arguments,)
    for match in _PRINTF_SPEC.finditer(text):
        for group in match.groups():
            if group is not None and group != "*":
                _check_count(int(group), "a format width")
        if "*" in match.group(0):
            for value in values:
                _check_count(value, "a format width")


def _check_format_spec(text: str, arguments: Iterable[Any]) -> None:
    """``text.format(...)``: widths and precisions of every field within the bound."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        return  # str.format raises its own error
    for _, _, spec, _ in fields:
        if not spec:
            continue
        for digits in _DIGITS.findall(spec):
            _check_count(int(digits), "a format width")
        if "{" in spec:  # a width taken from an argument
            for value in arguments:
                _check_count(value, "a format width")


def _check_replace(text: Any, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        found = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            found = min(found, count)
        if len(text) + found * (len(new) - len(old)) > MAX_CHARS:
            raise RenderLimitError(f"a replacement to more than {MAX_CHARS:,} characters")


def _check_join(separator: Any, items: list[Any]) -> None:
    total = _size(separator) * max(len(items) - 1, 0) + sum(map(_size, items))
    if total > MAX_CHARS:
        raise RenderLimitError(f"a join to {total:,} characters (at most {MAX_CHARS:,})")


def _check_call(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a call whose arguments already say its result passes the bounds; gives ``args``
    (an iterable to join is listed first, so it is measured and then used)."""
    owner = getattr(function, "__self__", None)
    name = getattr(function, "__name__", "")
    if isinstance(owner, str):
        if name == "join" and args:
            args = (list(args[0]), *args[1:])
            _check_join(owner, args[0])
        elif name == "replace":
            _check_replace(owner, *args[:3])
        elif name == "expandtabs":
            _check_product("\t" * owner.count("\t"), args[0] if args else kwargs.get("tabsize", 8))
        else:  # center, ljust, rjust, zfill...
            for value in (*args, *kwargs.values()):
                _check_count(value, "a width")
    for value in (*args, *kwargs.values()):
        check_size(value)
    return args


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that refuses counts (widths, lengths) over the bound and results over it."""
    skip = 2 if _PassArg.from_obj(function) is not None else 1  # context, then the value

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        value, rest = args[skip - 1], args[skip:]
        if name == "replace":
            _check_replace(str(value), *rest[:3])
        elif name == "join":
            value = list(value)
            args = (*args[: skip - 1], value, *rest)
            _check_join(rest[0] if rest else kwargs.get("d", ""), value)
        elif name == "format":
            _check_printf(value, tuple(rest) or tuple(kwargs.values()))
        elif name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            size = len(width) if isinstance(width, str) else width
            if isinstance(size, int) and size * (str(value).count("\n") + 1) > MAX_CHARS:
                raise RenderLimitError(f"filter indent: more than {MAX_CHARS:,} characters of indent")
        elif name in _COUNT_FILTERS:
            for count in (*rest, *kwargs.values()):
                _check_count(count, f"filter {name}: an argument")
        return check_size(function(*args, **kwargs))

    return bounded


class BoundedNamespace(Namespace):
    """``namespace()``, whose attributes obey the size bounds (``ns.s = ns.s ~ ns.s`` doubles)."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, check_size(value))


class BoundedBuffer(list[str]):
    """The output a template buffers (a macro's body, ``{% filter %}``, ``{% set %}`` blocks),
    counted as it grows."""

    __slots__ = ("_chars",)

    def __init__(self) -> None:
        super().__init__()
        self._chars = 0

    def append(self, text: str) -> None:
        self._chars += len(text)
        if self._chars > MAX_CHARS:
            raise RenderLimitError(f"a block's output passed {MAX_CHARS:,} characters")
        super().append(text)

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.append(text)


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles buffered output into a :class:`BoundedBuffer` instead of a plain list."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.bounded_buffer()")


class Sandbox(SandboxedEnvironment):
    """Jinja's sandbox with the bounds of this module (see the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    bounded_buffer = BoundedBuffer

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        del self.globals["lipsum"]
        self.globals["namespace"] = BoundedNamespace
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_product(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+":
            if _size(left) + _size(right) > (MAX_ITEMS if isinstance(left, _SIZED) else MAX_CHARS):
                raise RenderLimitError(f"a sum of {_size(left) + _size(right):,} characters or items")
        elif operator == "%":
            _check_printf(left, right)
        return check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        args = _check_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, _SIZED):  # list.append, dict.update...: the container grew
            check_size(owner)
        return check_size(result)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text: str = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format_spec(text, (*args, *kwargs.values()))
            return wrapped(*args, **kwargs)

        return checked


def join_bounded(chunks: Iterable[str]) -> str:
    """The output a template streams, joined, or RenderLimitError once it passes :data:`MAX_CHARS`."""
    parts: list[str] = []
    append = parts.append
    size = 0
    limit = MAX_CHARS
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RenderLimitError(f"the output passed {MAX_CHARS:,} characters")
        append(chunk)
    return "".join(parts)


class RenderTimeoutError(RenderLimitError):
    """A row took more than :data:`MAX_CPU_SECONDS` of CPU to render."""


class CpuDeadline:
    """Stops a row that renders for more than :data:`MAX_CPU_SECONDS` of CPU time.

    A loop that yields no output and calls nothing (``{% for i in range(10**5) %}``
    nested) can only be stopped by a signal. While rows render, an interval
    timer of the process's CPU time (``ITIMER_PROF``) ticks every :data:`TICK`
    seconds; a tick that finds the same row (``serial``) rendering for more than
    the limit raises :class:`RenderTimeoutError` in it, so a row is stopped
    after 2 to 2.25 s. A row costs a thread check and two attribute writes, not a system call; the
    timer stops itself after two ticks without rendering.

    Python runs signal handlers in the main thread only: rows rendered in another
    thread (and where another SIGPROF handler is set, a profiler's) have only
    the size bounds.
    """

    TICK = 0.25

    def __init__(self) -> None:
        self.thread = threading.main_thread().ident  # the one thread whose rows are timed
        self.serial = 0  # the row being rendered, counted
        self.rendering = False
        self.ticking = False
        self._usable: bool | None = None
        self._seen = -1
        self._ticks = 0
        self._idle = 0

    def start(self) -> None:
        """Start the timer; :meth:`mergekit.render.Template.render` calls it from :attr:`thread`."""
        if self._usable is None:
            self._usable = self._install()
        if self._usable:
            self.ticking = True
            self._idle = 0
            signal.setitimer(signal.ITIMER_PROF, self.TICK, self.TICK)

    def stop(self) -> None:
        """Stop the timer: after two ticks without rendering, and at exit (Python puts back the
        default SIGPROF action as it finalizes, and that action ends the process)."""
        if self.ticking:
            self.ticking = False
            signal.setitimer(signal.ITIMER_PROF, 0)

    def _install(self) -> bool:
        if not hasattr(signal, "setitimer"):
            return False
        current = signal.getsignal(signal.SIGPROF)
        if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return False
        signal.signal(signal.SIGPROF, self._tick)
        return True

    def _tick(self, signum: int, frame: FrameType | None) -> None:
        if not self.rendering:
            self._idle += 1
            if self._idle >= 2:
                self.stop()
            return
        self._idle = 0
        if self.serial != self._seen:
            self._seen, self._ticks = self.serial, 0
        self._ticks += 1
        if self._ticks > MAX_CPU_SECONDS / self.TICK:
            self.rendering = False
            raise RenderTimeoutError(f"rendering took more than {MAX_CPU_SECONDS:g} s of CPU")

    def _forked(self) -> None:
        self.ticking = False  # a child does not inherit its parent's timers
        self.thread = threading.get_ident()  # the forking thread is the child's main thread


deadline = CpuDeadline()
os.register_at_fork(after_in_child=deadline._forked)
atexit.register(deadline.stop)
