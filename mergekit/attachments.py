"""Per-row attachments: resolve an ``Attachment:`` header value to a file, safely, once.

A value is a path relative to the attachments folder (the template's folder, or
``--attachments-dir``). It is resolved with every symlink followed, and refused
unless the result is a regular file inside that folder: ``../../etc/passwd``,
an absolute path elsewhere, or a symlink pointing out all become the row's
``invalid`` reason, so a CSV can never make mergekit read an arbitrary file.

Files are cached by resolved path, size and modification time, so a file that
many rows share (a brochure, a price list) is read and base64-encoded once for
the whole run, not once per recipient; the cache is bounded by
:data:`CACHE_BYTES` and evicts the least recently used files.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .transports.base import Attachment

# Encoded attachments kept in memory between rows; bounds the cache, not a file's size.
CACHE_BYTES = 64 * 1024 * 1024
# Characters of a parameter value per header line (RFC 2231 3 continuations past this).
_PARAMETER_CHUNK = 40


class AttachmentRefused(ValueError):
    """The value names no file mergekit may attach; the message is the row's reason."""


@dataclass(frozen=True, slots=True)
class LoadedAttachment:
    """An attachment with its MIME part ready for the wire (headers and base64 body, CRLF)."""

    attachment: Attachment
    part: bytes
    body: bytes  # the base64 lines alone, for an inline part with its own headers

    def inline_part(self, content_id: str) -> bytes:
        """The part as an inline image referenced by ``cid:content_id`` (RFC 2392)."""
        name = self.attachment.filename
        headers = (
            f"Content-Type: {self.attachment.content_type};\r\n {_parameter('name', name)}\r\n"
            f"Content-Disposition: inline;\r\n {_parameter('filename', name)}\r\n"
            f"Content-ID: <{content_id}>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        )
        return headers.encode("ascii") + self.body


class AttachmentFolder:
    """Resolves and caches the attachments under one folder."""

    def __init__(self, folder: str | Path, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.folder = Path(folder)
        self._real = Path(os.path.realpath(folder))
        self._cache: OrderedDict[tuple[str, int, int], LoadedAttachment] = OrderedDict()
        self._cached_bytes = 0
        self._cache_limit = cache_bytes
        self.reads = 0  # files actually read (the rest came from the cache): for tests and stats

    def load(self, value: str) -> LoadedAttachment:
        """The attachment named by ``value``.

        :raises AttachmentRefused: empty, outside the folder (after symlinks),
            missing, not a regular file, or unreadable.
        """
        name = value.strip()
        if not name:
            raise AttachmentRefused("the Attachment: header is empty")
        if "\x00" in name:
            raise AttachmentRefused(f"attachment {name!r}: the path contains NUL")
        candidate = os.path.join(self._real, os.path.expanduser(name) if name.startswith("~") else name)
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, self._real]) != str(self._real):
            raise AttachmentRefused(
                f"attachment {name!r} is outside the attachments folder {self.folder} "
                "(set --attachments-dir to allow another folder)"
            )
        try:
            info = os.stat(real)
        except FileNotFoundError:
            raise AttachmentRefused(f"attachment {name!r} not found in {self.folder}") from None
        except OSError as err:
            raise AttachmentRefused(f"attachment {name!r}: {err.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise AttachmentRefused(f"attachment {name!r} is not a regular file")
        key = (real, info.st_size, info.st_mtime_ns)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        try:
            with open(real, "rb") as file:
                content = file.read()
        except OSError as err:
            raise AttachmentRefused(f"attachment {name!r} cannot be read: {err.strerror}") from None
        self.reads += 1
        loaded = _load(os.path.basename(real), content)
        self._remember(key, loaded)
        return loaded

    def _remember(self, key: tuple[str, int, int], loaded: LoadedAttachment) -> None:
        size = len(loaded.part) + len(loaded.body)
        if size > self._cache_limit:
            return
        self._cache[key] = loaded
        self._cached_bytes += size
        while self._cached_bytes > self._cache_limit:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= len(evicted.part) + len(evicted.body)


def content_type_for(filename: str) -> str:
    """The MIME type guessed from the file name; ``application/octet-stream`` if unknown."""
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def _load(filename: str, content: bytes) -> LoadedAttachment:
    content_type = content_type_for(filename)
    encoded = base64.encodebytes(content)  # 76-character lines, LF-terminated
    headers = (
        # Parameters on their own folded lines keep every line within 78 characters.
        f"Content-Type: {content_type};\r\n {_parameter('name', filename)}\r\n"
        f"Content-Disposition: attachment;\r\n {_parameter('filename', filename)}\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    body = encoded.replace(b"\n", b"\r\n")
    return LoadedAttachment(Attachment(filename, content_type, content), headers.encode("ascii") + body, body)


def _parameter(name: str, value: str) -> str:
    """``name="value"``, or RFC 2231 ``name*=utf-8''%XX`` for names that are not plain ASCII.

    Long values are split into RFC 2231 continuations (``name*0*=…;`` folded
    onto new lines) so no header line passes 78 characters.
    """
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        if len(value) <= _PARAMETER_CHUNK:
            return f'{name}="{value}"'
        chunks = [value[i : i + _PARAMETER_CHUNK] for i in range(0, len(value), _PARAMETER_CHUNK)]
        return ";\r\n ".join(f'{name}*{n}="{chunk}"' for n, chunk in enumerate(chunks))
    encoded = quote(value, safe="")
    if len(encoded) <= _PARAMETER_CHUNK:
        return f"{name}*=utf-8''{encoded}"
    # Split between %XX escapes, never inside one.
    pieces = re.findall(r"%[0-9A-F]{2}|[^%]", encoded)
    chunks, current = [], ""
    for piece in pieces:
        if len(current) + len(piece) > _PARAMETER_CHUNK:
            chunks.append(current)
            current = ""
        current += piece
    chunks.append(current)
    first = f"{name}*0*=utf-8''{chunks[0]}"
    return ";\r\n ".join([first] + [f"{name}*{n}*={chunk}" for n, chunk in enumerate(chunks[1:], start=1)])
