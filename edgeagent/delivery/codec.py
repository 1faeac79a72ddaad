"""Wire encodings of delivery objects, and decoding with a bound.

``xz`` (the standard library's lzma) is the compressed encoding: bench/codec.py measured it
against zstd, and zstd would add a dependency to every device (Python has no zstd before
3.14). Decoding streams in 1 MiB chunks with liblzma's memory limit set, and stops as soon as
the output passes the size the index declares: a decompression bomb is refused after at most
one chunk more than the declared size, never inflated.
"""

from __future__ import annotations

import hashlib
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from edgeagent.errors import DecompressionBomb, HashMismatch, SizeMismatch, TruncatedBundle

Encoding = Literal["identity", "xz"]
ENCODINGS: tuple[str, ...] = ("identity", "xz")
CHUNK = 1 << 20
#: liblzma's decoder memory bound (bytes). preset 6's dictionary is 8 MiB (about 9 MiB to
#: decode); a stream that needs more was not made by ``edgectl registry publish``.
XZ_MEMLIMIT = 64 << 20
XZ_PRESET = 6
#: Smaller gains than this are not worth a decode on the device: the file travels as is.
MIN_SAVING = 0.05


def encode(data: bytes) -> tuple[Encoding, bytes]:
    """The wire form of ``data``: xz when it saves at least 5 %, else the bytes as they are."""
    # The decoder allocates the dictionary the stream names: no bigger than the file, so a
    # small file costs a device kilobytes to decode, not preset 6's 8 MiB.
    dict_size = max(4096, min(8 << 20, len(data)))
    filters = [{"id": lzma.FILTER_LZMA2, "preset": XZ_PRESET, "dict_size": dict_size}]
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    if len(packed) <= len(data) * (1 - MIN_SAVING):
        return "xz", packed
    return "identity", data


def decode_file(src: Path, dest: BinaryIO, encoding: str, *, size: int, sha256: str, name: str) -> None:
    """Decode ``src`` into ``dest``; the output must be exactly ``size`` bytes with ``sha256``.

    Raises DecompressionBomb (more output than ``size``), SizeMismatch/TruncatedBundle
    (less), HashMismatch (other bytes), or TruncatedBundle (a corrupt stream).
    """
    digest = hashlib.sha256()
    written = 0
    with src.open("rb") as fh:
        for chunk in _decoded_chunks(fh, encoding, size, name):
            written += len(chunk)
            if written > size:
                raise DecompressionBomb(
                    f"{name} inflates past the {size} bytes the index declares; refused", member=name
                )
            digest.update(chunk)
            dest.write(chunk)
    if written != size:
        raise SizeMismatch(f"{name} decodes to {written} bytes, the index says {size}", member=name)
    if digest.hexdigest() != sha256:
        raise HashMismatch(
            f"{name} decodes to sha256 {digest.hexdigest()[:12]}…, the manifest says {sha256[:12]}…",
            member=name,
        )
    dest.flush()
    os.fsync(dest.fileno())


def _decoded_chunks(fh: BinaryIO, encoding: str, size: int, name: str) -> Iterator[bytes]:
    if encoding == "identity":
        while chunk := fh.read(CHUNK):
            yield chunk
        return
    if encoding != "xz":
        raise TruncatedBundle(f"{name} has unknown encoding {encoding!r}", member=name)
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    try:
        while not decoder.eof:
            # Ask for at most one chunk of output per call: memory stays bounded whatever
            # the ratio, and a bomb is seen after one chunk past the declared size.
            data = b"" if decoder.needs_input is False else fh.read(64 * 1024)
            if not data and decoder.needs_input:
                raise TruncatedBundle(f"{name}: the xz stream ends early", member=name)
            yield decoder.decompress(data, max_length=min(CHUNK, size + 1))
    except lzma.LZMAError as exc:
        raise TruncatedBundle(f"{name}: corrupt xz stream ({exc})", member=name) from exc
    if fh.read(1) or decoder.unused_data:
        raise TruncatedBundle(f"{name}: bytes after the end of the xz stream", member=name)
