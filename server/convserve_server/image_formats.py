"""Which image formats the server decodes, told from a file's first bytes without running any decoder.

Pillow opens some containers by decoding them: an ICO holding a 12000×12000 PNG is decoded inside
``Image.open``, before any size check could run, and an ICNS declares 1024×1024 and then holds a larger
image.  So the server decodes an allow-list of formats whose header states the size that is decoded,
and tells a file's format from its magic bytes with Pillow's own ``accept`` tests, which only compare
bytes.  The PNG header (IHDR) is also read here: it tells the in-process fast path how large a PNG is.
"""

from __future__ import annotations

import functools
import struct
from typing import Callable, NamedTuple

ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
"""Pillow format names the server decodes: the web's image formats and TIFF.  Their header states the
size that is decoded, and Pillow reads no pixel in ``Image.open`` for them.  A JPEG holding several
pictures (MPO) is a JPEG; only its first picture is used."""

PREFIX_BYTES = 16
"""How many leading bytes Pillow's format tests look at (``Image.open`` reads as many)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that may come before IDAT in a PNG that the fast path takes: each is small and parsed without
# decompression (zTXt, iTXt and iCCP inflate, eXIf is parsed as TIFF; such files go to a decode process).
_PLAIN_PNG_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs", b"bKGD",
                               b"tEXt", b"tIME", b"acTL", b"fcTL"})
_MAX_PNG_CHUNKS_READ = 32  # before IDAT; a PNG with more is not plain (this runs on the event loop)


class PngHeader(NamedTuple):
    """What a PNG's chunks before its pixel data say: its size, and whether they are all plain."""

    width: int
    height: int
    plain: bool


@functools.cache
def _format_tests() -> tuple[tuple[str, Callable[[bytes], object]], ...]:
    """(format, accept test) of every Pillow plugin that has a test, in the order ``Image.open`` tries them."""
    from PIL import Image

    Image.init()
    return tuple((name, Image.OPEN[name][1]) for name in Image.ID if Image.OPEN[name][1] is not None)


def load_plugins() -> None:
    """Register Pillow's plugins, which :func:`sniff_format` needs (0.1 s the first time: call it off the loop)."""
    _format_tests()


def sniff_format(data: bytes) -> str | None:
    """The format a file's magic bytes claim: an accepted one if any accepted format's test passes, else the
    first other format Pillow recognises (one to refuse by name), else None."""
    prefix = data[:PREFIX_BYTES]
    others = []
    for name, accept in _format_tests():
        if _passes(accept, prefix):
            if name in ACCEPTED_FORMATS:
                return name
            others.append(name)
    return others[0] if others else None


def _passes(accept: Callable[[bytes], object], prefix: bytes) -> bool:
    """Whether a plugin's test accepts ``prefix``; a test that fails on short input, as in ``Image.open``, does not."""
    try:
        return bool(accept(prefix))
    except (SyntaxError, IndexError, TypeError, struct.error):
        return False


def png_header(data: bytes) -> PngHeader | None:
    """Size and plainness of a PNG, from its chunks up to the first IDAT; None if ``data`` is no PNG or its
    chunks are broken (Pillow's own parser then decides, in a decode process)."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    offset, plain, size = len(_PNG_SIGNATURE), True, None
    for _ in range(_MAX_PNG_CHUNKS_READ):
        if offset + 8 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, offset)
        if size is None:
            if kind != b"IHDR" or length != 13 or offset + 16 > len(data):
                return None
            size = struct.unpack_from(">II", data, offset + 8)
        if kind == b"IDAT":
            return PngHeader(size[0], size[1], plain)
        plain = plain and kind in _PLAIN_PNG_CHUNKS
        offset += 12 + length  # length, type, data, CRC
    return PngHeader(size[0], size[1], plain=False) if size is not None else None
