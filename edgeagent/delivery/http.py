"""HTTP(S) downloads with Range resume, on the standard library only.

A download appends to ``<sha256>.hpart``; after a crash, a dropped connection or a server
that stopped mid-file, the next try asks for ``Range: bytes=<what is on disk>-``. With the
index's block hashes, every complete block is checked as it lands (and the blocks already on
disk when resuming): a block that differs truncates the file to its start and fails this
source. A server that sends more than the expected size is refused (oversized) without
writing past it. After a power cut the blocks on disk are checked again before a resume.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import threading
import urllib.error
import urllib.request
from http.client import HTTPResponse
from pathlib import Path

from edgeagent.errors import HashMismatch, SizeLimitExceeded, TransferError
from edgeagent.storage import hash_file
from edgeagent.transfer import Wanted

CHUNK = 256 * 1024  # read size without block hashes (a whole bundle by its URL)


class HttpSourceError(TransferError):
    """The server could not be reached, refused, or stopped: try the next source, or later."""


def download(
    url: str,
    want: Wanted,
    part: Path,
    *,
    timeout_s: float = 30.0,
    stop: threading.Event | None = None,
    context: ssl.SSLContext | None = None,
) -> Path:
    """Fetch ``url`` into ``part`` (resuming), check it against ``want``; return the finished path."""
    done = part.with_suffix(want.suffix)
    if done.exists() and done.stat().st_size == want.size:
        return done
    have = _verified_prefix(part, want)
    if have < want.size:
        _fetch_range(url, want, part, have, timeout_s, stop, context)
    # With the index's block hashes every byte on disk was checked block by block (on arrival,
    # or again before a resume): hashing the whole file once more would only halve throughput.
    digest = want.sha256 if _all_blocks_checked(want) else hash_file(part)[1]
    if digest != want.sha256:
        part.unlink(missing_ok=True)
        raise HashMismatch(f"{url} served bytes with sha256 {digest[:12]}…, expected {want.sha256[:12]}…")
    part.replace(done)
    return done


def _all_blocks_checked(want: Wanted) -> bool:
    return bool(want.block_hashes) and want.block_size is not None


def _verified_prefix(part: Path, want: Wanted) -> int:
    """Bytes of ``part`` to keep: whole blocks that match their hashes (all of it without hashes)."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return 0
    if size > want.size:
        part.unlink()
        return 0
    if not want.block_hashes or not want.block_size:
        return size
    keep = 0
    with part.open("rb") as fh:
        for expected in want.block_hashes:
            block = fh.read(want.block_size)
            full = len(block) == want.block_size or keep + len(block) == want.size
            if not block or not full or hashlib.sha256(block).hexdigest() != expected:
                break
            keep += len(block)
    if keep != size:
        os.truncate(part, keep)
    return keep


def _fetch_range(
    url: str,
    want: Wanted,
    part: Path,
    have: int,
    timeout_s: float,
    stop: threading.Event | None,
    context: ssl.SSLContext | None,
) -> None:
    headers = {"Range": f"bytes={have}-"} if have else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - http(s) URLs only
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s, context=context)  # noqa: S310
    except urllib.error.HTTPError as exc:
        raise HttpSourceError(f"{_safe(url)}: the server answered {exc.code}", sha256=want.sha256) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise HttpSourceError(f"{_safe(url)}: {getattr(exc, 'reason', exc)}", sha256=want.sha256) from exc
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        if length is not None and have + int(length) > want.size:
            raise SizeLimitExceeded(f"{_safe(url)} is {have + int(length)} bytes; expected {want.size}")
        _copy(response, want, part, have, stop, url)


def _copy(
    response: HTTPResponse, want: Wanted, part: Path, have: int, stop: threading.Event | None, url: str
) -> None:
    block = want.block_size or CHUNK
    # One block per read, into one reused buffer: no copy between the socket, the hash and the
    # file, and every verified block is on disk before the next is read (a slow link resumes
    # where it stopped). Throughput is the sha256's (bench/RESULTS.md).
    buf = memoryview(bytearray(block))
    written = have
    with part.open("r+b" if have else "wb") as out:
        out.seek(have)
        out.truncate()
        try:
            while written < want.size:
                if stop is not None and stop.is_set():
                    raise HttpSourceError("transfer stopped; will resume later", sha256=want.sha256)
                piece = buf[: min(block, want.size - written)]
                if _fill(response, piece) < len(piece):
                    break  # the server stopped mid-block: what is on disk is whole blocks
                _check_block(want, written // block, piece, url)
                out.write(piece)
                out.flush()  # on disk for a resume after a kill (re-checked then)
                written += len(piece)
            if written == want.size and response.read(1):
                raise SizeLimitExceeded(f"{_safe(url)} sends more than the expected {want.size} bytes")
        except (OSError, urllib.error.URLError) as exc:
            lost = f"{_safe(url)}: lost at byte {written} ({exc}); will resume later"
            raise HttpSourceError(lost, sha256=want.sha256) from exc
        finally:
            out.flush()
            os.fsync(out.fileno())
    if written != want.size:
        stopped = f"{_safe(url)} stopped at byte {written} of {want.size}; will resume later"
        raise HttpSourceError(stopped, sha256=want.sha256)


def _fill(response: HTTPResponse, view: memoryview) -> int:
    """Read into ``view`` until it is full or the response ends; return the bytes read."""
    got = 0
    while got < len(view):
        n = response.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _check_block(want: Wanted, i: int, data: bytes | memoryview, url: str) -> None:
    if want.block_hashes and want.block_size and hashlib.sha256(data).hexdigest() != want.block_hashes[i]:
        raise HashMismatch(f"{_safe(url)}: block {i} differs from the index; this source is refused")


def _safe(url: str) -> str:
    """A URL for messages without its query (presigned URLs carry credentials there)."""
    return url.split("?", 1)[0]
