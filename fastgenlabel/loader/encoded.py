"""Structure checks of encoded JPEG and PNG files, without decoding them: declared size and completeness.

A JPEG is walked from SOI through its marker segments (by their lengths) and over each scan's
entropy-coded data to its first EOI; a PNG chunk by chunk from its signature to IEND. A file that
ends first is truncated. Bytes after the end marker (phone motion photos, vendor trailers,
padding) are ignored, as the decoders ignore them. Both give the declared width and height (JPEG
SOF, PNG IHDR), so that a decompression bomb is refused before a decoder allocates its pixels.
"""
from __future__ import annotations

import numpy as np

_RST = range(0xD0, 0xD8)
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _buffer(data) -> bytes:
    return data if isinstance(data, bytes) else np.ascontiguousarray(data, np.uint8).tobytes()


def jpeg_structure(data) -> tuple[str | None, int, int]:
    """(problem or None, width, height) of an encoded JPEG (that starts with SOI)."""
    b = _buffer(data)
    n = len(b)
    pos, width, height, scans = 2, 0, 0, 0
    while True:
        if pos + 1 >= n:
            return "the file ends before the JPEG's end-of-image marker (truncated)", width, height
        if b[pos] != 0xFF:  # stray bytes before a marker: decoders skip them with a warning
            pos = b.find(b"\xff", pos)
            if pos < 0:
                pos = n
            continue
        m = b[pos + 1]
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        pos += 2
        if m == 0xD9:
            if scans == 0:
                return "a JPEG end-of-image marker before any image data", width, height
            return None, width, height
        if m in (0x00, 0x01, 0xD8) or m in _RST:
            continue
        if pos + 2 > n:
            return "the file ends inside a JPEG marker segment (truncated)", width, height
        end = pos + int.from_bytes(b[pos:pos + 2], "big")
        if end > n:
            return "the file ends inside a JPEG marker segment (truncated)", width, height
        if m in _SOF and end - pos >= 7:
            height, width = int.from_bytes(b[pos + 3:pos + 5], "big"), int.from_bytes(b[pos + 5:pos + 7], "big")
        pos = end
        if m == 0xDA:  # a scan: its entropy-coded data run to the next marker that is not 0xFF00 or RSTn
            scans += 1
            while True:
                pos = b.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return "the file ends inside the JPEG's entropy-coded data (truncated)", width, height
                nxt = b[pos + 1]
                if nxt == 0 or nxt in _RST or nxt == 0xFF:
                    pos += 1 if nxt == 0xFF else 2
                    continue
                break


def png_structure(data) -> tuple[str | None, int, int]:
    """(problem or None, width, height) of an encoded PNG (that starts with the PNG signature)."""
    b = _buffer(data)
    n = len(b)
    pos, width, height = 8, 0, 0
    while True:
        if pos + 8 > n:
            return "the file ends before the PNG's IEND chunk (truncated)", width, height
        size = int.from_bytes(b[pos:pos + 4], "big")
        kind = b[pos + 4:pos + 8]
        if pos + 12 + size > n:
            return f"the PNG's {kind.decode('latin-1')!r} chunk runs past the end of the file (truncated)", \
                width, height
        if pos == 8:
            if kind != b"IHDR" or size < 8:
                return "a PNG whose first chunk is not IHDR (corrupt)", width, height
            width, height = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
        if kind == b"IEND":
            return None, width, height
        pos += 12 + size
